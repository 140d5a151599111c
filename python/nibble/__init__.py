"""nibble — 4-bit quantized linear layers of diffusion transformers on the CPU.

The kitchen ops (comfy-kitchen signatures, FORMATS.md §6)::

    nibble.gemv_awq_w4a16(x, qweight, wscales, wzeros, bias=None, group_size=64)
    nibble.quantize_svdquant_w4a4(x, smooth, lora_down, pad_size=256, act_unsigned=False, lora_x=None)
    nibble.scaled_mm_svdquant_w4a4(act, wgt, ascales, wscales, lora_act_in, lora_up, bias=None,
                                   act_unsigned=False)

Arrays go in as numpy arrays (bfloat16 via ml_dtypes), torch CPU tensors or any DLPack / buffer
protocol object, zero-copy when C-contiguous. Results are numpy arrays owning the library's
buffers, or torch tensors (zero-copy) when the first array argument was a torch tensor.

Errors: everything the library raises derives from nibble.Error. Bad input (argument, shape,
dtype, format, file content) raises nibble.InputError, a ValueError naming the argument and what
was expected; a file that cannot be opened, read or written, or is truncated, raises
nibble.FileError, an OSError (``.errno`` set when the OS reported one).

Checkpoints: nibble.load(path) → Model (``.layers``: name → callable Layer), nibble.inspect(path),
nibble.convert(...), nibble.load_file / save_file (safetensors). Runtime: nibble.isa(),
nibble.set_isa("scalar" | "avx2" | ... | "auto"), nibble.set_num_threads(n).
"""
from __future__ import annotations

import numpy as _np

from . import _core
from ._core import (  # noqa: F401  (re-exported)
    Error,
    FileError,
    InputError,
    Layer,
    Model,
    compiled_isas,
    cpu_features,
    isa,
    num_threads,
    set_isa,
    set_num_threads,
    supported_isas,
)

__version__ = _core.__version__

from .conditioning import load_conditioning, load_latent, save_conditioning, save_latent  # noqa: E402,F401

__all__ = [
    "Error", "FileError", "InputError", "Layer", "Model", "__version__",
    "gemv_awq_w4a16", "quantize_svdquant_w4a4", "scaled_mm_svdquant_w4a4", "linear",
    "load", "inspect", "convert", "write_sample_checkpoint", "load_file", "save_file", "read_metadata",
    "isa", "set_isa", "supported_isas", "compiled_isas", "cpu_features",
    "num_threads", "set_num_threads",
    "save_conditioning", "load_conditioning", "save_latent", "load_latent",
]


# ---------------------------------------------------------------- framework round trip
def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "__dlpack__")


def _to_torch(arr):
    """numpy result → torch tensor sharing its memory (bf16/fp8 through a same-width view)."""
    import torch

    if arr is None:
        return None
    name = arr.dtype.name
    special = {"bfloat16": (_np.uint16, torch.bfloat16),
               "float8_e4m3fn": (_np.uint8, torch.float8_e4m3fn),
               "float8_e5m2": (_np.uint8, torch.float8_e5m2)}
    if not arr.flags.writeable:  # torch wants writable memory; results of the ops are writable
        arr = arr.copy()
    if name in special:
        raw, tdt = special[name]
        return torch.from_numpy(arr.view(raw)).view(tdt)
    return torch.from_numpy(arr)


def _like(result, like):
    if not _is_torch(like):
        return result
    if isinstance(result, tuple):
        return tuple(_to_torch(r) for r in result)
    return _to_torch(result)


def _dtype_name(dtype):
    """Accept str, numpy/ml_dtypes dtypes and scalar types, torch dtypes."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    if type(dtype).__module__.startswith("torch"):
        return str(dtype)
    return _np.dtype(dtype).name


# ---------------------------------------------------------------- the kitchen ops
def gemv_awq_w4a16(x, qweight, wscales, wzeros, bias=None, group_size=64, *, out_dtype=None):
    """AWQ W4A16 linear (spec §2): y = x·Wᵀ + bias with W[n,k] = (q−8)·s[k/G,n] + z[k/G,n].

    x (..., K) float32/bfloat16/float16; qweight (N, K/2) int8 (uint8 accepted: same bytes);
    wscales, wzeros (K/G, N) bfloat16/float16; bias (N) optional. Returns (..., N) in wscales'
    dtype (kitchen semantics) unless ``out_dtype`` is given. fp32 accumulation.
    """
    return _like(_core.gemv_awq_w4a16(x, qweight, wscales, wzeros, bias, int(group_size),
                                      _dtype_name(out_dtype)), x)


def quantize_svdquant_w4a4(x, smooth, lora_down, pad_size=256, act_unsigned=False, lora_x=None,
                           *, lora_act_dtype=None):
    """SVDQuant activation quantization (spec §3.3, the CUDA kernel's fp32 semantics).

    x (M, K) float, K % 64 == 0; smooth (K); lora_down (K, R); lora_x (M, K) optional LoRA input
    (defaults to x). Returns (q_x (M_pad, K/2) int8, ascales (K/64, M_pad) in x's dtype,
    lora_act (M_pad, R) in x's dtype unless ``lora_act_dtype``), M_pad = ceil(M/pad)·pad.
    """
    return _like(_core.quantize_svdquant_w4a4(x, smooth, lora_down, int(pad_size),
                                              bool(act_unsigned), lora_x,
                                              _dtype_name(lora_act_dtype)), x)


def scaled_mm_svdquant_w4a4(act, wgt, ascales, wscales, lora_act_in, lora_up, bias=None,
                            act_unsigned=False, *, out_dtype=None):
    """SVDQuant W4A4 GEMM + low-rank branch + bias (spec §3.4).

    act (M, K/2) int8 packed codes; wgt natural (N, K/2) or tile-packed (N/128, K/64, 32, 128);
    ascales (K/64, M); wscales (K/64, N) or tile (N/128, K/64, 128); lora_act_in (M, R);
    lora_up (N, R) or tile (N/128, R, 128); bias (N) optional. Returns (M, N) in lora_up's dtype
    unless ``out_dtype``. Exact int32 group sums, fp32 scale math.
    """
    return _like(_core.scaled_mm_svdquant_w4a4(act, wgt, ascales, wscales, lora_act_in, lora_up,
                                               bias, bool(act_unsigned), _dtype_name(out_dtype)),
                 act if _is_torch(act) else lora_up)


def linear(x, weight, bias=None):
    """Dense fp32 y = x·Wᵀ + bias (the library's float baseline). Returns float32."""
    return _like(_core.linear_f32(x, weight, bias), x)


# ---------------------------------------------------------------- checkpoints
def load(path, loras=None, partial=False) -> Model:
    """Map a checkpoint (.safetensors, .safetensors.index.json or a shard directory) and bind
    every linear layer (nibble's runtime). ``model.layers[name](x)`` or ``model[name](x)`` runs
    the layer: x (..., K) → (..., N) in x's dtype (float32 / bfloat16 / float16) unless
    ``out_dtype`` is given; the layer computes in fp32.

    ``loras``: ``[(file, strength), ...]`` (or bare file names, strength 1) applied at load,
    nothing written: svdquant_w4a4 layers grow their low-rank branch exactly, awq_w4a16 layers are
    requantized, float layers merged (docs/lora.md). ``partial``: skip LoRA modules that match no
    layer instead of raising."""
    specs = [(str(l), 1.0) if isinstance(l, (str, bytes)) or hasattr(l, "__fspath__")
             else (str(l[0]), float(l[1])) for l in (loras or [])]
    return _core.load(str(path), specs, bool(partial))


def import_checkpoint(format, input, output, *, group_size=0, out_group_size=0, scale_dtype="",
                      arch="", hidden=0, mod_scale_shift=True, flux_linear2="svdquant") -> dict:
    """``nibble import FORMAT IN -o OUT``: AutoAWQ (``"autoawq"``, GEMM packing) or nunchaku
    (``"nunchaku"``, SVDQuant INT4 Qwen-Image and FLUX.1) → kitchen-native awq_w4a16 / svdquant_w4a4,
    codes copied bit-exactly (docs/import.md). ``flux_linear2``: ``"svdquant"`` or ``"bf16"`` for
    FLUX single blocks' linear2. Returns the report (dict). Written atomically."""
    import json

    return json.loads(_core.import_checkpoint(str(format), str(input), str(output), int(group_size),
                                              int(out_group_size), str(scale_dtype), str(arch),
                                              int(hidden), bool(mod_scale_shift), str(flux_linear2)))


def apply_loras(ckpt, loras, output, *, partial=False) -> dict:
    """``nibble lora CKPT LORA[:S]... -o OUT``: bake LoRAs ``[(file, strength), ...]`` into a
    checkpoint (docs/lora.md). Returns the statistics (dict, with the unmatched modules)."""
    import json

    specs = [(str(l), 1.0) if isinstance(l, (str, bytes)) or hasattr(l, "__fspath__")
             else (str(l[0]), float(l[1])) for l in loras]
    return json.loads(_core.apply_loras(str(ckpt), specs, str(output), bool(partial)))


def inspect(path, filter: str = "", as_text: bool = False):
    """The report of ``nibble inspect PATH [--filter REGEX] [--json]``: a dict parsed from the
    CLI's JSON document (or its table as a string with ``as_text=True``). Binds every layer, so an
    invalid layer raises nibble.Error naming it."""
    if as_text:
        return _core.inspect_text(str(path), filter)
    import json

    return json.loads(_core.inspect_json(str(path), filter))


def convert(input, output=None, *, format=None, preset="", rules=(), exclude=(), rank=32,
            group_size=64, tile=False, svd="randomized", refine=2, calib=None,
            allow_requantize=False, mem_budget=0, shard_size=0, threads=0, dry_run=False,
            progress=None, share=(), strict=False, force=False, gptq=False):
    """Convert float linears of a checkpoint to awq_w4a16 / svdquant_w4a4 (``nibble convert``).

    ``format``: quantize every eligible linear to this format (the rule ``.*=FORMAT``);
    ``rules``: ``"REGEX=FORMAT[:opt=v,...]"`` strings (``--tensor-type``), first match wins;
    ``preset``: ``"qwen-image"`` (the kitchen Qwen-Image-Edit map, spec §7); ``exclude``: regexes
    of layers copied unchanged. ``rank`` / ``group_size`` / ``tile`` (tile-packed svdquant) /
    ``svd`` ("randomized" | "exact") / ``refine`` / ``calib`` (statistics file, see
    ``nibble.calib.Recorder``) / ``share`` (regexes of layers reading one input) / ``strict`` /
    ``force`` / ``gptq`` (GPTQ from the statistics' sample rows) as in the CLI. Embedding tables, norms, convolutions and the pooler are never
    quantized by ``format``; a rule or preset matching nothing raises nibble.Error.
    ``progress(dict)`` is called per written tensor. Returns the report (dict, as ``--json``),
    or with ``dry_run=True`` the plan, writing nothing. The output is written atomically.
    """
    result = _core.convert(str(input), None if output is None else str(output), format, preset,
                           list(rules), list(exclude), int(rank), int(group_size), bool(tile),
                           svd, int(refine), None if calib is None else str(calib),
                           bool(allow_requantize), int(mem_budget), int(shard_size),
                           int(threads), bool(dry_run), progress, list(share), bool(strict),
                           bool(force), bool(gptq))
    if isinstance(result, str):
        import json

        return json.loads(result)
    return result


def write_sample_checkpoint(path, seed=20261123, hidden=256, rank=16, prefix="",
                            configs_in_metadata=False) -> None:
    """A small seeded kitchen-style checkpoint (the one of ``nibble sample``): one Qwen-Image-shaped
    block scaled to ``hidden`` with awq_w4a16, svdquant_w4a4 (natural, tile, act_unsigned), float
    layers and one layer of every other kitchen format."""
    _core.write_sample_checkpoint(str(path), int(seed), int(hidden), int(rank), prefix,
                                  bool(configs_in_metadata))


def load_file(path) -> dict:
    """All tensors of a safetensors checkpoint as read-only numpy arrays (zero-copy, mmap)."""
    return _core.load_file(str(path))


def read_metadata(path) -> dict:
    """The ``__metadata__`` strings of a checkpoint (merged with an index's metadata)."""
    return _core.read_metadata(str(path))


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write arrays (numpy incl. ml_dtypes bfloat16 / float8, torch CPU tensors) to a
    .safetensors file, atomically, in dict order."""
    _core.save_file(dict(tensors), str(path), metadata)
