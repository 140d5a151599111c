"""comfy-kitchen adapter: nibble as a CPU backend of the kitchen's three int4 ops.

Importing this module (or calling ``register()``) registers a backend named "nibble" in
comfy-kitchen's backend registry for ``gemv_awq_w4a16``, ``quantize_svdquant_w4a4`` and
``scaled_mm_svdquant_w4a4``, restricted to CPU tensors, and puts it just ahead of "eager" in the
priority list. ComfyUI's calls (``torch.ops.comfy_kitchen.*`` → registry) on CPU tensors then run
nibble's fused kernels instead of the eager PyTorch reference; CUDA tensors keep their backends,
and anything nibble's constraints do not cover falls through to eager.

Registration is honest: ``register()`` returns False and logs a warning saying why when
comfy-kitchen (or torch) cannot be imported — comfy-kitchen 0.2.40 imports ``packaging`` without
declaring it — or when its registry API is not the one this file was written against.
``registered`` / ``is_registered()`` / ``status()`` tell the truth afterwards.

The registry (``comfy_kitchen.registry.registry``: ``register``, ``enable``, ``disable``,
``set_priority``, ``is_available``, the private ``_priority`` list; ``comfy_kitchen.constraints``:
``FunctionConstraints(params, default_devices)``, ``ParamConstraint(dtypes, shape_rules)``,
``ExactDims``) is comfy-kitchen's internal API, read from comfy-kitchen 0.2.31-0.2.40; every use
of it is in this file and checked by ``_check_api`` before use.

Prepared-weight cache: the weight side of ``scaled_mm_svdquant_w4a4`` (the micro-kernel packing)
and of ``gemv_awq_w4a16`` (the tiled GEMV stream) is derived once per weight tensor and kept in a
cache keyed to that tensor object (checked per call against its data pointer, version counter,
shape, strides and dtype, and the identity/version of the scale and low-rank tensors). An entry
never references the weights themselves and dies with the weight tensor (weakref callback); the
cache is bounded (``set_cache_limit``; env ``NIBBLE_KITCHEN_CACHE_MB``; least recently used
entries are dropped first) and reported by ``cache_info()``. Trailing activation rows that are
provably padding (every ascale and every lora_act of the row is zero, so the row's output is
exactly ``0 + bias``) are not computed.

Result dtypes follow the kitchen ops' declared (fake-tensor) dtypes: gemv → wscales' dtype,
quantize → (int8, x's dtype, float32 lora_act), scaled_mm → lora_up's dtype.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import os
import threading
import weakref

import nibble
from nibble import _core

BACKEND = "nibble"
OPS = ("gemv_awq_w4a16", "quantize_svdquant_w4a4", "scaled_mm_svdquant_w4a4")
# What this file was written against (comfy-kitchen versions whose registry API was read).
KITCHEN_API_READ_FROM = "comfy-kitchen 0.2.31-0.2.40"

log = logging.getLogger("nibble.kitchen")

registered = False          # True only while nibble sits in a working kitchen registry
reason = "register() not called yet"   # why not registered (or "registered")
served_ops: tuple = ()      # the kitchen ops nibble serves (those the installed kitchen declares)


# ---------------------------------------------------------------- prepared-weight cache
def _default_cache_limit() -> int:
    env = os.environ.get("NIBBLE_KITCHEN_CACHE_MB")
    if env:
        try:
            return max(0, int(float(env) * 2**20))
        except ValueError:
            log.warning("nibble.kitchen: NIBBLE_KITCHEN_CACHE_MB=%r is not a number; using the default", env)
    try:  # half the physical memory: prepared weights are about the size of the int4 weights
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _version(t):
    try:
        return t._version
    except RuntimeError:  # inference tensors (ComfyUI runs under torch.inference_mode) have none
        return "inference"


def _sig(t):
    """What must not change for a prepared entry to stay valid (None for an absent tensor).
    Inference tensors track no version counter: an in-place write to one under inference mode is
    not seen (call clear_cache() after such a write)."""
    if t is None:
        return None
    return (t.data_ptr(), _version(t), tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device))


class _Entry:
    __slots__ = ("ref", "sigs", "refs", "copies", "prepared", "nbytes")


def _same_content(copies, others) -> bool:
    """The side tensors (scales, low-rank factors) equal the entry's copies: a caller that hands
    fresh clones of the same scales on every call (ComfyUI's QuantizedTensor.to(dtype) clones its
    params when the activation dtype differs from the layer's) still hits."""
    import torch

    for c, o in zip(copies, others):
        if (c is None) != (o is None):
            return False
        if c is not None and (c.shape != o.shape or c.dtype != o.dtype or not torch.equal(c, o)):
            return False
    return True


class _Cache:
    """Prepared weights keyed to the weight tensor object; entries die with it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self.limit = _default_cache_limit()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.bypassed = 0

    def _drop_locked(self, key):
        e = self._entries.pop(key, None)
        if e is not None:
            self.bytes -= e.nbytes

    def _on_death(self, key, ref):
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.ref is ref:
                self._drop_locked(key)

    def get(self, weight, others, make):
        """The prepared object for `weight` (a torch tensor) and the side tensors `others`;
        `make()` builds it on a miss. None when the cache is disabled (limit 0)."""
        if self.limit <= 0:
            self.bypassed += 1
            return None
        key = id(weight)
        sigs = (_sig(weight),) + tuple(_sig(o) for o in others)
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.ref() is weight and e.sigs[0] == sigs[0]:
                if e.sigs == sigs and all((r is None and o is None) or (r is not None and r() is o)
                                          for r, o in zip(e.refs, others)):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return e.prepared
                if _same_content(e.copies, others):  # same weights, equal side tensors
                    e.sigs = sigs
                    e.refs = tuple(None if o is None else weakref.ref(o) for o in others)
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return e.prepared
            self.misses += 1
        prepared = make()
        e = _Entry()
        e.sigs = sigs
        e.refs = tuple(None if o is None else weakref.ref(o) for o in others)
        e.copies = tuple(None if o is None else o.detach().clone() for o in others)
        e.prepared = prepared
        nbytes = int(prepared.nbytes) + sum(0 if c is None else c.numel() * c.element_size()
                                            for c in e.copies)
        e.nbytes = nbytes
        with self._lock:
            e.ref = weakref.ref(weight, lambda r, k=key: self._on_death(k, r))
            self._drop_locked(key)
            if nbytes > self.limit:
                return prepared          # too large to keep: used once
            while self._entries and self.bytes + nbytes > self.limit:
                self._drop_locked(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = e
            self.bytes += nbytes
        return prepared

    def clear(self):
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def info(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "limit": self.limit,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "bypassed": self.bypassed}


_cache = _Cache()


def cache_info() -> dict:
    """Prepared-weight cache: entries, bytes held, limit (bytes), hits, misses, evictions."""
    return _cache.info()


def set_cache_limit(nbytes: int) -> None:
    """Bounds the prepared-weight cache (bytes; 0 disables it: every call repacks)."""
    _cache.limit = max(0, int(nbytes))
    with _cache._lock:
        while _cache._entries and _cache.bytes > _cache.limit:
            _cache._drop_locked(next(iter(_cache._entries)))
            _cache.evictions += 1


def clear_cache() -> None:
    _cache.clear()


def _cacheable(*tensors) -> bool:
    # the scalar ISA runs the reference oracles on the stored layout: nothing to prepare
    return all(t is None or hasattr(t, "data_ptr") for t in tensors) and nibble.isa() != "scalar"


# ---------------------------------------------------------------- the backend object
class _Backend:
    """The object the registry calls: ``getattr(backend, op)(**kwargs)`` with torch tensors."""

    @staticmethod
    def gemv_awq_w4a16(x, qweight, wscales, wzeros, bias=None, group_size=64):
        prepared = None
        if _cacheable(qweight, wscales, wzeros):
            prepared = _cache.get(qweight, (wscales, wzeros), lambda: _core.prepare_gemv_awq_w4a16(
                qweight, wscales, wzeros, int(group_size)))
        return nibble._like(_core.gemv_awq_w4a16(x, qweight, wscales, wzeros, bias, int(group_size),
                                                 None, prepared), x)

    @staticmethod
    def quantize_svdquant_w4a4(x, smooth, lora_down, pad_size=256, act_unsigned=False,
                               lora_x=None):
        # float32 lora_act: what the kitchen op declares (its fake kernel) and the eager returns.
        return nibble.quantize_svdquant_w4a4(x, smooth, lora_down, pad_size, act_unsigned, lora_x,
                                             lora_act_dtype="float32")

    @staticmethod
    def scaled_mm_svdquant_w4a4(act, wgt, ascales, wscales, lora_act_in, lora_up, bias=None,
                                act_unsigned=False):
        prepared = None
        if _cacheable(wgt, wscales, lora_up):
            prepared = _cache.get(wgt, (wscales, lora_up), lambda: _core.prepare_scaled_mm_svdquant_w4a4(
                wgt, wscales, lora_up))
        # padding rows are only skipped with prepared weights (their finiteness is checked once)
        return nibble._like(_core.scaled_mm_svdquant_w4a4(act, wgt, ascales, wscales, lora_act_in,
                                                          lora_up, bias, bool(act_unsigned), None,
                                                          prepared, prepared is not None), act)


# ---------------------------------------------------------------- the kitchen's registry API
@dataclasses.dataclass
class _Api:
    kitchen: object
    registry: object
    constraints: object
    torch: object
    version: str


def _kitchen_version() -> str:
    try:
        from importlib.metadata import version
        return version("comfy-kitchen")
    except Exception:
        return "unknown version"


def _check_api():
    """(api, None) if comfy-kitchen is importable and its registry API is the one this file
    uses, else (None, reason)."""
    try:
        import importlib

        import torch
        import comfy_kitchen
        # import_module: the package attribute `comfy_kitchen.registry` is the registry object
        # (its __init__ imports it over the submodule's name)
        constraints = importlib.import_module("comfy_kitchen.constraints")
        registry_mod = importlib.import_module("comfy_kitchen.registry")
    except Exception as e:  # ImportError, or anything its import chain raises
        return None, f"comfy-kitchen cannot be imported ({type(e).__name__}: {e})"
    ver = _kitchen_version()
    problems = []
    registry = getattr(registry_mod, "registry", None)
    if registry is None:
        problems.append("comfy_kitchen.registry.registry is missing")
    else:
        for m in ("register", "enable", "disable", "set_priority", "is_available"):
            if not callable(getattr(registry, m, None)):
                problems.append(f"registry.{m}() is missing")
        if not isinstance(getattr(registry, "_priority", None), list):
            problems.append("registry._priority is not a list")
        reg = getattr(registry, "register", None)
        if callable(reg):
            try:
                params = set(inspect.signature(reg).parameters)
                if not {"name", "module", "capabilities"} <= params:
                    problems.append(f"registry.register{inspect.signature(reg)} does not take "
                                    "(name, module, capabilities)")
            except (TypeError, ValueError):
                pass
    for cls, fields in (("FunctionConstraints", {"params", "default_devices"}),
                        ("ParamConstraint", {"dtypes", "shape_rules"}),
                        ("ExactDims", {"ndim"})):
        c = getattr(constraints, cls, None)
        if c is None:
            problems.append(f"comfy_kitchen.constraints.{cls} is missing")
        elif dataclasses.is_dataclass(c):
            have = {f.name for f in dataclasses.fields(c)}
            if not fields <= have:
                problems.append(f"constraints.{cls} lacks fields {sorted(fields - have)}")
    if problems:
        return None, (f"comfy-kitchen {ver} has a registry API other than the one nibble was "
                      f"written against ({KITCHEN_API_READ_FROM}): " + "; ".join(problems))
    return _Api(comfy_kitchen, registry, constraints, torch, ver), None


def _kitchen_ops(api) -> tuple:
    """The int4 ops the installed kitchen declares (torch.ops.comfy_kitchen.*)."""
    ns = getattr(getattr(api.torch, "ops", None), "comfy_kitchen", None)
    have = []
    for op in OPS:
        try:
            if ns is not None and getattr(ns, op, None) is not None:
                have.append(op)
        except (AttributeError, RuntimeError):
            pass
    return tuple(have)


def _constraints(api, ops):
    torch = api.torch
    ExactDims = api.constraints.ExactDims
    FunctionConstraints = api.constraints.FunctionConstraints
    ParamConstraint = api.constraints.ParamConstraint

    floats = frozenset({torch.float32, torch.float16, torch.bfloat16})
    halves = frozenset({torch.float16, torch.bfloat16})
    int8 = frozenset({torch.int8})
    bytes_ = frozenset({torch.int8, torch.uint8})
    cpu = frozenset({"cpu"})
    two_d = (ExactDims(2),)
    table = {
        "gemv_awq_w4a16": FunctionConstraints(
            params={
                "x": ParamConstraint(dtypes=floats),
                "qweight": ParamConstraint(dtypes=bytes_, shape_rules=two_d),
                "wscales": ParamConstraint(dtypes=halves, shape_rules=two_d),
                "wzeros": ParamConstraint(dtypes=halves, shape_rules=two_d),
                "bias": ParamConstraint(dtypes=floats),
            },
            default_devices=cpu),
        "quantize_svdquant_w4a4": FunctionConstraints(
            params={
                "x": ParamConstraint(dtypes=floats, shape_rules=two_d),
                "smooth": ParamConstraint(dtypes=floats, shape_rules=(ExactDims(1),)),
                "lora_down": ParamConstraint(dtypes=floats, shape_rules=two_d),
                "lora_x": ParamConstraint(dtypes=floats, shape_rules=two_d),
            },
            default_devices=cpu),
        "scaled_mm_svdquant_w4a4": FunctionConstraints(
            params={
                "act": ParamConstraint(dtypes=bytes_, shape_rules=two_d),
                "wgt": ParamConstraint(dtypes=int8),
                "ascales": ParamConstraint(dtypes=floats, shape_rules=two_d),
                "wscales": ParamConstraint(dtypes=floats),
                "lora_act_in": ParamConstraint(dtypes=floats, shape_rules=two_d),
                "lora_up": ParamConstraint(dtypes=floats),
                "bias": ParamConstraint(dtypes=floats),
            },
            default_devices=cpu),
    }
    return {op: table[op] for op in ops}


def _set_state(ok: bool, why: str, ops: tuple = ()):
    global registered, reason, served_ops
    registered, reason, served_ops = ok, why, ops


def register() -> bool:
    """Registers (or re-registers) the nibble backend ahead of eager. Returns False — and logs a
    warning saying why — if comfy-kitchen cannot be imported or its registry API differs from
    the one this adapter was written against."""
    api, why = _check_api()
    if api is None:
        log.warning("nibble.kitchen: not registered: %s", why)
        _set_state(False, why)
        return False
    ops = _kitchen_ops(api)
    if not ops:
        why = (f"comfy-kitchen {api.version} declares none of the int4 ops nibble serves "
               f"({', '.join(OPS)})")
        log.warning("nibble.kitchen: not registered: %s", why)
        _set_state(False, why)
        return False
    try:
        registry = api.registry
        registry.register(name=BACKEND, module=_Backend(), capabilities=_constraints(api, ops))
        registry.enable(BACKEND)
        priority = [b for b in registry._priority if b != BACKEND]
        at = priority.index("eager") if "eager" in priority else len(priority)
        registry.set_priority(priority[:at] + [BACKEND] + priority[at:])
    except Exception as e:  # an API that passed the checks but behaves differently
        why = f"registering in comfy-kitchen {api.version} failed ({type(e).__name__}: {e})"
        log.warning("nibble.kitchen: not registered: %s", why)
        _set_state(False, why)
        return False
    ok = is_registered()
    _set_state(ok, "registered" if ok else "the registry did not keep the nibble backend", ops if ok else ())
    if not ok:
        log.warning("nibble.kitchen: not registered: %s", reason)
    return ok


def unregister() -> None:
    """Takes nibble out of the priority list and disables it (the registry cannot forget it)."""
    api, why = _check_api()
    if api is not None:
        api.registry.set_priority([b for b in api.registry._priority if b != BACKEND])
        api.registry.disable(BACKEND)
    _set_state(False, "unregister() was called")


def is_registered() -> bool:
    """True if nibble is in the kitchen's priority list and enabled (asks the registry)."""
    api, _ = _check_api()
    if api is None:
        return False
    registry = api.registry
    try:
        return BACKEND in registry._priority and bool(registry.is_available(BACKEND))
    except Exception:
        return False


def status() -> dict:
    """What the adapter did: registered, reason, the ops served, the kitchen version, cache."""
    return {"registered": registered, "reason": reason, "ops": list(served_ops),
            "kitchen": _kitchen_version() if registered else None, "cache": cache_info()}


register()
