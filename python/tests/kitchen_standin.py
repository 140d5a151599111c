"""A stand-in for comfy-kitchen's backend registry (and the few torch names it needs).

Not comfy-kitchen's code: a minimal registry with the API shape nibble.kitchen was written
against (register / enable / disable / set_priority / is_available / _priority, and the
constraint dataclasses), so the adapter's registration logic is tested without torch.
`install(monkeypatch, **changes)` puts it into sys.modules; `changes` break parts of the API.
"""
import dataclasses
import sys
import types


@dataclasses.dataclass(frozen=True)
class ExactDims:
    ndim: int


@dataclasses.dataclass(frozen=True)
class ParamConstraint:
    dtypes: frozenset = frozenset()
    shape_rules: tuple = ()


@dataclasses.dataclass(frozen=True)
class FunctionConstraints:
    params: dict = dataclasses.field(default_factory=dict)
    default_devices: frozenset = frozenset({"cuda"})


class Registry:
    def __init__(self):
        self._backends, self._caps, self._disabled = {}, {}, set()
        self._priority = ["cuda", "triton", "eager"]
        self.fail_register = False

    def register(self, name, module, capabilities):
        if self.fail_register:
            raise RuntimeError("registry is frozen")
        self._backends[name] = module
        self._caps[name] = dict(capabilities)

    def enable(self, name):
        self._disabled.discard(name)

    def disable(self, name):
        self._disabled.add(name)

    def set_priority(self, priority):
        self._priority = list(priority)

    def is_available(self, name):
        return name in self._backends and name not in self._disabled


class _Ops:
    def __init__(self, names):
        for n in names:
            setattr(self, n, object())


def install(monkeypatch, ops=("gemv_awq_w4a16", "quantize_svdquant_w4a4", "scaled_mm_svdquant_w4a4"),
            drop=(), register_sig=None, constraint_fields=True):
    """Stand-in `torch` (dtypes, torch.ops.comfy_kitchen) and `comfy_kitchen` modules.
    drop: registry methods to remove; register_sig: a replacement register function."""
    torch = types.ModuleType("torch")
    for dt in ("float32", "float16", "bfloat16", "int8", "uint8"):
        setattr(torch, dt, f"torch.{dt}")
    torch.ops = types.SimpleNamespace(comfy_kitchen=_Ops(ops))
    ck = types.ModuleType("comfy_kitchen")
    ck.__path__ = []
    reg_mod = types.ModuleType("comfy_kitchen.registry")
    registry = Registry()
    for m in drop:
        setattr(registry, m, None)
    if register_sig is not None:
        registry.register = register_sig
    reg_mod.registry = registry
    cons = types.ModuleType("comfy_kitchen.constraints")
    cons.ExactDims, cons.ParamConstraint = ExactDims, ParamConstraint
    if constraint_fields:
        cons.FunctionConstraints = FunctionConstraints
    else:
        @dataclasses.dataclass(frozen=True)
        class Renamed:
            params: dict = dataclasses.field(default_factory=dict)
            devices: frozenset = frozenset()
        cons.FunctionConstraints = Renamed
    ck.registry, ck.constraints = reg_mod, cons
    for name, mod in (("torch", torch), ("comfy_kitchen", ck), ("comfy_kitchen.registry", reg_mod),
                      ("comfy_kitchen.constraints", cons)):
        monkeypatch.setitem(sys.modules, name, mod)
    return registry
