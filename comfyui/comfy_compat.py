"""Every ComfyUI internal the nibble node pack uses, in one place.

Read from ComfyUI master 4f874c5e (2026-07-29; comfy/quant_ops.py, comfy/ops.py,
comfy/model_detection.py, comfy/sd.py, folder_paths.py, nodes.py) with comfy-kitchen 0.2.40.
The kitchen-native int4 loading behaviour added here is the one of the project's spec
(FORMATS.md §2.2, §3.6-3.7, §4.1: the unmerged ComfyUI PR #13580 loader, with the review's fixes).

Used internals (checked by `check()` before anything is touched; a change raises
`ComfyInternalsChanged` naming what differs):
  comfy.quant_ops.QUANT_ALGOS            dict format → {storage_t, parameters, comfy_tensor_layout, ...}
  comfy.quant_ops.QuantizedTensor, get_layout_class, register_layout_class  (comfy-kitchen's)
  comfy.ops.QUANT_ALGOS                  the same dict object (imported by name)
  comfy.ops._load_quantized_module(module, super_load, state_dict, prefix, local_metadata, strict,
                                   missing_keys, unexpected_keys, error_msgs, load_extra_params)
      the per-layer loader MixedPrecisionOps.Linear._load_from_state_dict calls by global name;
      module attributes it relies on: factory_kwargs {device, dtype}, _orig_shape,
      _disabled_formats, _full_precision_mm, quant_format, layout_type, _full_precision_mm_config
  folder_paths.get_folder_paths / get_filename_list / get_full_path_or_raise
  a loaded MODEL: model.model.diffusion_model (its state_dict())
"""
from __future__ import annotations

import inspect
import json
import logging

log = logging.getLogger("nibble.comfyui")

READ_FROM = "ComfyUI master 4f874c5e (2026-07-29) with comfy-kitchen 0.2.40"

INT4_FORMATS = ("awq_w4a16", "svdquant_w4a4")
LAYOUTS = {"awq_w4a16": "TensorCoreAWQW4A16Layout", "svdquant_w4a4": "TensorCoreSVDQuantW4A4Layout"}
# post-GELU fc2 layers (spec §3.7; the converter's list): act_unsigned when the config has no key
ACT_UNSIGNED_SUFFIXES = (".img_mlp.net.2", ".txt_mlp.net.2", ".ff.net.2")
LOADER_PARAMS = ["module", "super_load", "state_dict", "prefix", "local_metadata", "strict",
                 "missing_keys", "unexpected_keys", "error_msgs", "load_extra_params"]


class ComfyInternalsChanged(RuntimeError):
    """ComfyUI's internals differ from the ones this node pack was written against."""


def _changed(what: str) -> ComfyInternalsChanged:
    return ComfyInternalsChanged(
        f"nibble node pack: ComfyUI internals changed: {what} (written against {READ_FROM}); "
        "kitchen-native int4 loading was not added — update the nibble node pack")


def _modules():
    try:
        import comfy.ops as ops
        import comfy.quant_ops as quant_ops
    except Exception as e:
        raise _changed(f"cannot import comfy.ops / comfy.quant_ops ({type(e).__name__}: {e})")
    return quant_ops, ops


def check():
    """(quant_ops, ops) if the internals are the expected ones, else ComfyInternalsChanged."""
    quant_ops, ops = _modules()
    algos = getattr(quant_ops, "QUANT_ALGOS", None)
    if not isinstance(algos, dict):
        raise _changed("comfy.quant_ops.QUANT_ALGOS is not a dict")
    for name in ("QuantizedTensor", "get_layout_class", "register_layout_class"):
        if getattr(quant_ops, name, None) is None:
            raise _changed(f"comfy.quant_ops.{name} is missing")
    if getattr(ops, "QUANT_ALGOS", None) is not algos:
        raise _changed("comfy.ops.QUANT_ALGOS is not comfy.quant_ops.QUANT_ALGOS")
    loader = getattr(ops, "_load_quantized_module", None)
    if not callable(loader):
        raise _changed("comfy.ops._load_quantized_module is missing")
    params = list(inspect.signature(getattr(loader, "__nibble_wrapped__", loader)).parameters)
    if params != LOADER_PARAMS:
        raise _changed(f"comfy.ops._load_quantized_module{tuple(params)} is not "
                       f"{tuple(LOADER_PARAMS)}")
    for fmt, conf in algos.items():
        if not isinstance(conf, dict) or "comfy_tensor_layout" not in conf:
            raise _changed(f"QUANT_ALGOS[{fmt!r}] has no 'comfy_tensor_layout'")
    return quant_ops, ops


# ---------------------------------------------------------------- the int4 layer parsing (pure)
def _pop_one(state_dict, prefix, names, layer, fmt, what):
    """Pops the tensor stored under one of `names` (the two spellings of spec §2.2 / §3.7)."""
    present = [n for n in names if f"{prefix}{n}" in state_dict]
    if len(present) > 1:
        raise ValueError(f"{fmt} layer {layer}: both {' and '.join(prefix + n for n in present)} "
                         f"are present ({what}); keep one spelling")
    if not present:
        return None, None
    key = f"{prefix}{present[0]}"
    return state_dict.pop(key), key


def act_unsigned_of(conf: dict, layer: str):
    """(act_unsigned, inferred): the config's key wins; the name fallback only when it is absent."""
    if "act_unsigned" in conf:
        return bool(conf["act_unsigned"]), False
    if layer.endswith(ACT_UNSIGNED_SUFFIXES):
        return True, True
    return False, False


def parse_int4_layer(fmt, conf, state_dict, prefix):
    """Pops the side tensors of an awq_w4a16 / svdquant_w4a4 layer from `state_dict` (the weight
    itself stays) and returns (params kwargs for the kitchen layout's Params, popped keys).
    Raises ValueError naming the layer for missing or doubly spelled tensors."""
    layer = prefix.rstrip(".")
    keys = []

    def need(names, what):
        t, key = _pop_one(state_dict, prefix, names, layer, fmt, what)
        if t is None:
            return None
        keys.append(key)
        return t

    if fmt == "awq_w4a16":
        scale = need(("weight_scale",), "scales")
        zeros = need(("weight_zeros", "weight_zero"), "zeros")
        if scale is None or zeros is None:
            missing = [n for n, t in (("weight_scale", scale), ("weight_zeros|weight_zero", zeros))
                       if t is None]
            raise ValueError(f"Missing AWQ W4A16 scale/zeros for layer {layer}: {', '.join(missing)}")
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        gs = int(conf.get("group_size", params.get("group_size", 64)))
        return {"scale": scale, "zeros": zeros, "group_size": gs}, keys
    if fmt == "svdquant_w4a4":
        scale = need(("weight_scale",), "scales")
        smooth = need(("smooth_factor", "weight_smooth_factor"), "smooth factor")
        down = need(("proj_down", "weight_proj_down"), "low-rank down projection")
        up = need(("proj_up", "weight_proj_up"), "low-rank up projection")
        missing = [n for n, t in (("weight_scale", scale), ("smooth_factor", smooth),
                                  ("proj_down", down), ("proj_up", up)) if t is None]
        if missing:
            raise ValueError(f"Missing SVDQuant W4A4 parameters for layer {layer}: "
                             f"{', '.join(missing)} (either spelling: X or weight_X)")
        basis = conf.get("lowrank_branch_input_basis", "raw")
        if basis == "post_smoothing":  # the kitchen runs the raw basis: fold (spec §3.6)
            down = (down.float() / smooth.float()[:, None]).to(down.dtype) if hasattr(down, "float") \
                else (down / smooth[:, None]).astype(down.dtype)
        elif basis != "raw":
            raise ValueError(f"svdquant_w4a4 layer {layer}: lowrank_branch_input_basis "
                             f"{basis!r} is neither 'raw' nor 'post_smoothing'")
        unsigned, inferred = act_unsigned_of(conf, layer)
        if inferred:
            log.info("nibble: %s has no 'act_unsigned' in its config; inferred true from the name", layer)
        return {"scale": scale, "smooth_factor": smooth, "proj_down": down, "proj_up": up,
                "act_unsigned": unsigned}, keys
    raise ValueError(f"not an int4 format: {fmt}")


def unknown_format_error(fmt, layer, algos) -> ValueError:
    return ValueError(f"Unknown quantization format {fmt!r} for layer {layer}; this ComfyUI "
                      f"(with the nibble node pack) supports: {', '.join(sorted(algos))}")


# ---------------------------------------------------------------- installing into ComfyUI
_state = {"added": (), "wrapped": False}


def added_formats() -> tuple:
    return _state["added"]


def install() -> tuple:
    """Adds awq_w4a16 / svdquant_w4a4 to ComfyUI's mixed-precision loader when it does not know
    them (layout classes, QUANT_ALGOS entries, a loader branch); touches nothing when it does.
    Returns the formats added. Raises ComfyInternalsChanged if the internals differ."""
    quant_ops, ops = check()
    algos = quant_ops.QUANT_ALGOS
    missing = tuple(f for f in INT4_FORMATS if f not in algos)
    if not missing:
        log.info("nibble: ComfyUI already loads %s; its loader is left as is", ", ".join(INT4_FORMATS))
        return ()
    import torch

    for fmt in missing:
        name = LAYOUTS[fmt]
        if quant_ops.get_layout_class(name) is None:
            try:
                import comfy_kitchen.tensor as ckt
                cls = getattr(ckt, name)
            except Exception as e:
                raise _changed(f"comfy-kitchen has no layout class {name} ({type(e).__name__}: {e})")
            quant_ops.register_layout_class(name, cls)
        if quant_ops.get_layout_class(name) is None:
            raise _changed(f"register_layout_class({name!r}) did not register it")
    for fmt in missing:
        algos[fmt] = {
            "storage_t": torch.int8,
            "parameters": ({"weight_scale", "weight_zeros"} if fmt == "awq_w4a16" else
                           {"weight_scale", "smooth_factor", "proj_down", "proj_up"}),
            "comfy_tensor_layout": LAYOUTS[fmt],
            "quantize_input": False,   # the kitchen ops take the float activation
            **({"group_size": 64} if fmt == "awq_w4a16" else {}),
        }
    _wrap_loader(ops, quant_ops, missing)
    _state["added"] = tuple(sorted(set(_state["added"]) | set(missing)))
    return missing


def _wrap_loader(ops, quant_ops, formats):
    original = getattr(ops._load_quantized_module, "__nibble_wrapped__", ops._load_quantized_module)
    handled = set(formats) | set(_state["added"])
    algos = quant_ops.QUANT_ALGOS

    def load_quantized_module(module, super_load, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs, load_extra_params=False):
        conf_t = state_dict.get(f"{prefix}comfy_quant")
        fmt = None
        if conf_t is not None:
            conf = json.loads(bytes(conf_t.numpy().tobytes()) if hasattr(conf_t, "numpy")
                              else bytes(conf_t))
            fmt = conf.get("format")
            if fmt is not None and fmt not in algos:
                raise unknown_format_error(fmt, prefix.rstrip("."), algos)
        if fmt not in handled or state_dict.get(f"{prefix}weight") is None:
            return original(module, super_load, state_dict, prefix, local_metadata, strict,
                            missing_keys, unexpected_keys, error_msgs, load_extra_params)
        _load_int4(module, super_load, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs, conf, fmt, quant_ops, algos)

    load_quantized_module.__nibble_wrapped__ = original
    load_quantized_module.__signature__ = inspect.signature(original)
    ops._load_quantized_module = load_quantized_module
    _state["wrapped"] = True


def _load_int4(module, super_load, state_dict, prefix, local_metadata, strict, missing_keys,
               unexpected_keys, error_msgs, conf, fmt, quant_ops, algos):
    import torch

    device = module.factory_kwargs["device"]
    compute_dtype = module.factory_kwargs["dtype"]
    state_dict.pop(f"{prefix}comfy_quant")
    weight = state_dict.pop(f"{prefix}weight")
    loaded = [f"{prefix}weight"]
    kwargs, keys = parse_int4_layer(fmt, conf, state_dict, prefix)
    loaded += keys
    for k, v in list(kwargs.items()):
        if hasattr(v, "to"):
            kwargs[k] = v.to(device=device)
    up = kwargs.get("proj_up")
    floats = [getattr(torch, n, None) for n in ("float32", "float16", "bfloat16")]
    if up is not None and compute_dtype is not None and compute_dtype in floats \
            and up.dtype != compute_dtype:
        # The kitchen's svdquant layer returns proj_up's dtype. On CPU ComfyUI computes in fp32
        # (manual cast) while checkpoints store proj_up in bf16: left as is, every svdquant
        # output is bf16, the next linear sees an input dtype other than its orig_dtype and
        # ComfyUI's QuantizedTensor.to() clones all its params on every call. proj_up in the
        # compute dtype keeps the block in that dtype like any other ComfyUI linear (N×R: small).
        kwargs["proj_up"] = up.to(dtype=compute_dtype)
    module.quant_format = fmt
    module._full_precision_mm_config = bool(conf.get("full_precision_matrix_mult", False))
    if not module._full_precision_mm:
        module._full_precision_mm = module._full_precision_mm_config
    if fmt in module._disabled_formats:
        module._full_precision_mm = True
    qconfig = algos[fmt]
    module.layout_type = qconfig["comfy_tensor_layout"]
    layout_cls = quant_ops.get_layout_class(module.layout_type)
    params = layout_cls.Params(orig_dtype=compute_dtype, orig_shape=module._orig_shape, **kwargs)
    module.weight = torch.nn.Parameter(
        quant_ops.QuantizedTensor(weight.to(device=device, dtype=qconfig["storage_t"]),
                                  module.layout_type, params),
        requires_grad=False)
    super_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    for key in loaded:
        if key in missing_keys:
            missing_keys.remove(key)


# ---------------------------------------------------------------- paths and models
def _folder_paths():
    try:
        import folder_paths
    except Exception as e:
        raise _changed(f"cannot import folder_paths ({type(e).__name__}: {e})")
    for name in ("get_folder_paths", "get_filename_list", "get_full_path_or_raise"):
        if not callable(getattr(folder_paths, name, None)):
            raise _changed(f"folder_paths.{name} is missing")
    return folder_paths


def list_files(kind: str) -> list:
    """File names ComfyUI lists for a model folder ("diffusion_models", "loras")."""
    return list(_folder_paths().get_filename_list(kind))


def full_path(kind: str, name: str) -> str:
    return _folder_paths().get_full_path_or_raise(kind, name)


def output_dir(kind: str = "diffusion_models") -> str:
    """The first folder ComfyUI reads `kind` from (where the nodes write)."""
    paths = _folder_paths().get_folder_paths(kind)
    if not paths:
        raise _changed(f"folder_paths has no folder for {kind!r}")
    return paths[0]


def diffusion_model_state_dict(model) -> dict:
    """The diffusion model's float weights of a loaded MODEL (ModelPatcher → BaseModel)."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None or not hasattr(inner, "state_dict"):
        raise _changed("a MODEL has no .model.diffusion_model module")
    return inner.state_dict()
