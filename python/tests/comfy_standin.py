"""A stand-in for the parts of ComfyUI the nibble node pack touches (not ComfyUI's code).

`install(monkeypatch, tmp_path, knows=(), ...)` puts into sys.modules:
  comfy.quant_ops  QUANT_ALGOS (a float8 entry plus the formats in `knows`), a layout-class
                   registry (register_layout_class / get_layout_class) and QuantizedTensor;
  comfy.ops        the same QUANT_ALGOS and a per-layer `_load_quantized_module` with ComfyUI's
                   signature that, like ComfyUI master, raises KeyError for a format it lacks;
  folder_paths     diffusion_models / loras folders under tmp_path;
  torch            a few names (int8, nn.Parameter) — the tests run without torch;
  comfy_kitchen.tensor  the kitchen's two int4 layout classes (stand-ins with their Params).
Tensors are `T`, numpy arrays with a `.to()` that does nothing.
"""
import dataclasses
import json
import sys
import types

import numpy as np


class T(np.ndarray):
    def to(self, device=None, dtype=None):
        if dtype in ("float32", "float16"):  # the stand-in torch's dtypes are their names
            return self.astype(dtype).view(T)
        return self


def t(a):
    return np.asarray(a).view(T)


def conf_tensor(conf: dict):
    return t(np.frombuffer(json.dumps(conf).encode(), np.uint8).copy())


class QuantizedTensor:
    def __init__(self, qdata, layout, params):
        self._qdata, self._layout_cls, self._params = qdata, layout, params


class AWQLayout:
    @dataclasses.dataclass(frozen=True)
    class Params:
        scale: object
        orig_dtype: object
        orig_shape: tuple
        zeros: object
        group_size: int = 64
        transposed: bool = False


class SVDLayout:
    @dataclasses.dataclass(frozen=True)
    class Params:
        scale: object
        orig_dtype: object
        orig_shape: tuple
        proj_down: object
        proj_up: object
        smooth_factor: object
        act_unsigned: bool = False
        transposed: bool = False


class Fp8Layout:
    @dataclasses.dataclass(frozen=True)
    class Params:
        scale: object
        orig_dtype: object
        orig_shape: tuple


class Linear:
    """What the loader sees of MixedPrecisionOps.Linear."""

    def __init__(self, out_features, in_features, dtype="bfloat16", disabled=()):
        self.factory_kwargs = {"device": None, "dtype": dtype}
        self._orig_shape = (out_features, in_features)
        self._disabled_formats = set(disabled)
        self._full_precision_mm = False
        self.weight = self.bias = None
        self.layout_type = None

    def super_load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs):
        self.bias = state_dict.pop(f"{prefix}bias", None)
        if self.weight is None:
            missing_keys.append(f"{prefix}weight")

    def load(self, ops, state_dict, prefix):
        missing, unexpected, errors = [], [], []
        ops._load_quantized_module(self, self.super_load, state_dict, prefix, {}, True, missing,
                                   unexpected, errors, load_extra_params=True)
        return missing


def install(monkeypatch, tmp_path, knows=(), registered=True, loader_sig_changed=False,
            algos_not_dict=False):
    torch = types.ModuleType("torch")
    torch.int8, torch.float8_e4m3fn = "int8", "float8_e4m3fn"
    torch.float32, torch.float16, torch.bfloat16 = "float32", "float16", "bfloat16"
    torch.nn = types.SimpleNamespace(Parameter=lambda x, requires_grad=False: x)
    torch.get_num_threads = lambda: 2

    layouts = {"TensorCoreFP8E4M3Layout": Fp8Layout}
    ck_tensor = types.ModuleType("comfy_kitchen.tensor")
    ck_tensor.TensorCoreAWQW4A16Layout, ck_tensor.TensorCoreSVDQuantW4A4Layout = AWQLayout, SVDLayout
    if registered:
        layouts.update(TensorCoreAWQW4A16Layout=AWQLayout, TensorCoreSVDQuantW4A4Layout=SVDLayout)

    qo = types.ModuleType("comfy.quant_ops")
    qo.QuantizedTensor = QuantizedTensor
    qo.register_layout_class = lambda name, cls: layouts.__setitem__(name, cls)
    qo.get_layout_class = lambda name: layouts.get(name)
    qo.QUANT_ALGOS = {"float8_e4m3fn": {"storage_t": "float8_e4m3fn", "parameters": {"weight_scale"},
                                         "comfy_tensor_layout": "TensorCoreFP8E4M3Layout"}}
    for f in knows:
        qo.QUANT_ALGOS[f] = {"storage_t": "int8", "parameters": {"weight_scale"},
                             "comfy_tensor_layout": {"awq_w4a16": "TensorCoreAWQW4A16Layout",
                                                     "svdquant_w4a4": "TensorCoreSVDQuantW4A4Layout"}[f]}
    if algos_not_dict:
        qo.QUANT_ALGOS = list(qo.QUANT_ALGOS)

    ops = types.ModuleType("comfy.ops")
    ops.QUANT_ALGOS = qo.QUANT_ALGOS
    ops.calls = []

    def _load_quantized_module(module, super_load, state_dict, prefix, local_metadata, strict,
                               missing_keys, unexpected_keys, error_msgs, load_extra_params=False):
        ops.calls.append(prefix)
        weight = state_dict.pop(f"{prefix}weight")
        conf = state_dict.pop(f"{prefix}comfy_quant", None)
        if conf is None:
            module.weight = weight
        else:
            fmt = json.loads(bytes(conf))["format"]
            q = ops.QUANT_ALGOS[fmt]          # KeyError for a format it does not know
            module.quant_format, module.layout_type = fmt, q["comfy_tensor_layout"]
            extra = {field: state_dict.pop(f"{prefix}{key}") for key, field in
                     (("weight_zeros", "zeros"), ("smooth_factor", "smooth_factor"),
                      ("proj_down", "proj_down"), ("proj_up", "proj_up")) if f"{prefix}{key}" in state_dict}
            params = layouts[q["comfy_tensor_layout"]].Params(
                scale=state_dict.pop(f"{prefix}weight_scale"), orig_dtype=module.factory_kwargs["dtype"],
                orig_shape=module._orig_shape, **extra)
            module.weight = QuantizedTensor(weight, module.layout_type, params)
        super_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    if loader_sig_changed:
        def _load_quantized_module(module, state_dict, prefix, **kw):  # noqa: F811
            raise AssertionError("must not be called")
    ops._load_quantized_module = _load_quantized_module

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    comfy.ops, comfy.quant_ops = ops, qo

    dirs = {"diffusion_models": tmp_path / "diffusion_models", "loras": tmp_path / "loras"}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    fp = types.ModuleType("folder_paths")
    fp.get_folder_paths = lambda kind: [str(dirs[kind])]
    fp.get_filename_list = lambda kind: sorted(p.name for p in dirs[kind].iterdir())

    def get_full_path_or_raise(kind, name):
        p = dirs[kind] / name
        if not p.exists():
            raise FileNotFoundError(f"Model in folder '{kind}' with filename '{name}' not found.")
        return str(p)
    fp.get_full_path_or_raise = get_full_path_or_raise

    ck = types.ModuleType("comfy_kitchen")
    ck.__path__ = []
    ck.tensor = ck_tensor
    for name, mod in (("torch", torch), ("comfy", comfy), ("comfy.ops", ops), ("comfy.quant_ops", qo),
                      ("folder_paths", fp), ("comfy_kitchen", ck), ("comfy_kitchen.tensor", ck_tensor)):
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(ops=ops, quant_ops=qo, layouts=layouts, dirs=dirs, torch=torch)
