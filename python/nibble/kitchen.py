"""comfy-kitchen adapter: nibble as a CPU backend of the kitchen's three int4 ops.

Importing this module (or calling ``register()``) registers a backend named "nibble" in
comfy-kitchen's backend registry for ``gemv_awq_w4a16``, ``quantize_svdquant_w4a4`` and
``scaled_mm_svdquant_w4a4``, restricted to CPU tensors, and puts it just ahead of "eager" in the
priority list. ComfyUI's calls (``torch.ops.comfy_kitchen.*`` → registry) on CPU tensors then run
nibble's fused kernels instead of the eager PyTorch reference; CUDA tensors keep their backends,
and anything nibble's constraints do not cover falls through to eager.

The registry (``comfy_kitchen.registry.registry``, ``register``, ``set_priority``, the private
``_priority`` list and ``FunctionConstraints``) is comfy-kitchen's internal API, read from
comfy-kitchen 0.2.31-0.2.40; every use of it is in this file. If comfy-kitchen is not importable,
importing this module does nothing and ``register()`` returns False.

Result dtypes follow the kitchen ops' declared (fake-tensor) dtypes: gemv → wscales' dtype,
quantize → (int8, x's dtype, float32 lora_act), scaled_mm → lora_up's dtype.
"""
from __future__ import annotations

import nibble

BACKEND = "nibble"
OPS = ("gemv_awq_w4a16", "quantize_svdquant_w4a4", "scaled_mm_svdquant_w4a4")


class _Backend:
    """The object the registry calls: ``getattr(backend, op)(**kwargs)`` with torch tensors."""

    @staticmethod
    def gemv_awq_w4a16(x, qweight, wscales, wzeros, bias=None, group_size=64):
        return nibble.gemv_awq_w4a16(x, qweight, wscales, wzeros, bias, group_size)

    @staticmethod
    def quantize_svdquant_w4a4(x, smooth, lora_down, pad_size=256, act_unsigned=False,
                               lora_x=None):
        # float32 lora_act: what the kitchen op declares (its fake kernel) and the eager returns.
        return nibble.quantize_svdquant_w4a4(x, smooth, lora_down, pad_size, act_unsigned, lora_x,
                                             lora_act_dtype="float32")

    @staticmethod
    def scaled_mm_svdquant_w4a4(act, wgt, ascales, wscales, lora_act_in, lora_up, bias=None,
                                act_unsigned=False):
        return nibble.scaled_mm_svdquant_w4a4(act, wgt, ascales, wscales, lora_act_in, lora_up,
                                              bias, act_unsigned)


def _constraints():
    import torch
    from comfy_kitchen.constraints import ExactDims, FunctionConstraints, ParamConstraint

    floats = frozenset({torch.float32, torch.float16, torch.bfloat16})
    halves = frozenset({torch.float16, torch.bfloat16})
    int8 = frozenset({torch.int8})
    bytes_ = frozenset({torch.int8, torch.uint8})
    cpu = frozenset({"cpu"})
    two_d = (ExactDims(2),)
    return {
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


def _registry():
    try:
        from comfy_kitchen.registry import registry
    except ImportError:
        return None
    return registry


def register() -> bool:
    """Registers (or re-registers) the nibble backend ahead of eager. False if comfy-kitchen is
    not importable."""
    registry = _registry()
    if registry is None:
        return False
    registry.register(name=BACKEND, module=_Backend(), capabilities=_constraints())
    registry.enable(BACKEND)
    priority = [b for b in registry._priority if b != BACKEND]
    at = priority.index("eager") if "eager" in priority else len(priority)
    registry.set_priority(priority[:at] + [BACKEND] + priority[at:])
    return True


def unregister() -> None:
    """Takes nibble out of the priority list and disables it (the registry cannot forget it)."""
    registry = _registry()
    if registry is None:
        return
    registry.set_priority([b for b in registry._priority if b != BACKEND])
    registry.disable(BACKEND)


def is_registered() -> bool:
    registry = _registry()
    return (registry is not None and BACKEND in registry._priority
            and registry.is_available(BACKEND))


registered = register()
