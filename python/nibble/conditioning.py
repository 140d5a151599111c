"""The files ``nibble run`` reads and writes, from Python (formats: docs/sampling.md, latent.h).

``.latent`` — ComfyUI's SaveLatent / LoadLatent format: a safetensors file with the samples under
``latent_tensor`` and an empty ``latent_format_version_0`` version marker (LoadLatent rescales
files without it by 1/0.18215: old SD1.x latents; nibble refuses them).

Conditioning — nibble's file for a ComfyUI CONDITIONING: ``context`` (B, L, 3584),
optional ``attention_mask`` (B, L: integer/bool nonzero = keep, or float added to the attention
scores, as in ComfyUI) and optional ``reference_latents.<i>`` (edit models).

    import nibble
    nibble.save_conditioning("pos.safetensors", conditioning)   # in a ComfyUI node / script
    nibble.save_latent("in.latent", {"samples": latent})        # a LATENT dict or an array
    x = nibble.load_latent("out.latent")                        # float32 numpy array

Arrays may be numpy arrays or torch tensors (any float dtype; stored as float32).
"""
from __future__ import annotations

import numpy as _np

from . import _core

LATENT_KEY = "latent_tensor"
LATENT_VERSION_KEY = "latent_format_version_0"
REF_PREFIX = "reference_latents."
QWEN_IMAGE_JOINT_DIM = 3584
QWEN_IMAGE_LATENT_CHANNELS = 16


def _to_numpy(a, what):
    """numpy / torch / array-like → a C-contiguous numpy array (torch bf16 goes through float32)."""
    if type(a).__module__.startswith("torch"):
        t = a.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return _np.ascontiguousarray(t.numpy())
    try:
        arr = _np.asarray(a)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise _core.InputError(f"{what}: expected an array or a torch tensor, got {type(a).__name__}") from e
    if arr.dtype == object:
        raise _core.InputError(f"{what}: expected an array or a torch tensor, got {type(a).__name__}")
    return _np.ascontiguousarray(arr)


def _float32(arr, what):
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise _core.InputError(f"{what}: expected a float array, got {arr.dtype}")
    return _np.ascontiguousarray(arr.astype(_np.float32))


def _latent_array(a, what, channels=QWEN_IMAGE_LATENT_CHANNELS):
    arr = _float32(_to_numpy(a, what), what)
    if arr.ndim not in (4, 5):
        raise _core.InputError(f"{what}: expected a latent (B, C, H, W) or (B, C, T, H, W), got shape {arr.shape}")
    if channels and arr.shape[1] != channels:
        raise _core.InputError(f"{what}: expected {channels} latent channels (dim 1; Qwen-Image uses the 16-channel "
                          f"Wan 2.1 VAE), got {arr.shape[1]} in shape {arr.shape}")
    if 0 in arr.shape:
        raise _core.InputError(f"{what}: empty latent, shape {arr.shape}")
    return arr


# ---------------------------------------------------------------- .latent
def save_latent(path, latent) -> None:
    """Write a ComfyUI ``.latent`` (what SaveLatent writes): ``latent`` is a LATENT dict
    (``{"samples": tensor}``), a torch tensor or a numpy array (B, 16, [T,] H, W). Atomic."""
    if isinstance(latent, dict):
        if "samples" not in latent:
            raise _core.InputError(f"save_latent {path}: a LATENT dict needs 'samples', got keys {sorted(latent)}")
        latent = latent["samples"]
    arr = _latent_array(latent, f"save_latent {path}", channels=0)
    _core.save_file({LATENT_KEY: arr, LATENT_VERSION_KEY: _np.zeros((0,), _np.float32)}, str(path),
                    {"format": "pt", "nibble": "latent"})


def load_latent(path, channels: int = QWEN_IMAGE_LATENT_CHANNELS):
    """Read a ComfyUI ``.latent`` as a float32 numpy array (B, C, [T,] H, W). Raises nibble.Error
    naming the file for a missing key, a missing version marker or the wrong channel count
    (``channels=0`` accepts any)."""
    d = _core.load_file(str(path))
    if LATENT_KEY not in d:
        raise _core.InputError(f"{path}: not a ComfyUI .latent file: no tensor '{LATENT_KEY}' (found: "
                          f"{', '.join(sorted(d)) or 'no tensors'})")
    if LATENT_VERSION_KEY not in d:
        raise _core.InputError(f"{path}: .latent without the version marker '{LATENT_VERSION_KEY}': a pre-2023 (SD1.x) "
                          "latent that ComfyUI's LoadLatent would rescale by 1/0.18215, not a Qwen-Image latent")
    return _latent_array(d[LATENT_KEY], f"{path}: tensor '{LATENT_KEY}'", channels).copy()


# ---------------------------------------------------------------- conditioning
def _split_conditioning(cond):
    """(context, extras dict) from a ComfyUI CONDITIONING ([[tensor, dict], ...]) or a bare tensor."""
    if isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], (list, tuple)):
        if len(cond) != 1:
            raise _core.InputError(f"save_conditioning: a CONDITIONING with {len(cond)} entries (combined or area "
                              "conditionings) is not supported; pass one entry")
        entry = cond[0]
        if len(entry) < 1:
            raise _core.InputError("save_conditioning: empty CONDITIONING entry")
        extras = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        return entry[0], extras
    return cond, {}


def save_conditioning(path, cond, attention_mask=None, reference_latents=None,
                      joint_dim: int = QWEN_IMAGE_JOINT_DIM) -> None:
    """Write the conditioning file of ``nibble run --context/--negative``.

    ``cond``: a ComfyUI CONDITIONING (``[[context, {"attention_mask": ..., "reference_latents":
    [...]}]]``, as CLIPTextEncode / TextEncodeQwenImageEdit give) or the context itself, a torch
    tensor or numpy array (B, L, joint_dim) or (L, joint_dim). ``attention_mask`` (B, L) and
    ``reference_latents`` (raw VAE latents, like a .latent's samples) override the dict's. The
    context is stored as float32; ``joint_dim=0`` skips the width check. Atomic."""
    context, extras = _split_conditioning(cond)
    what = f"save_conditioning {path}"
    ctx = _float32(_to_numpy(context, f"{what}: context"), f"{what}: context")
    if ctx.ndim == 2:
        ctx = ctx[None]
    if ctx.ndim != 3 or ctx.shape[0] == 0 or ctx.shape[1] == 0:
        raise _core.InputError(f"{what}: context must be (B, L, {joint_dim or 'D'}) or (L, D), got shape {ctx.shape}")
    if joint_dim and ctx.shape[2] != joint_dim:
        raise _core.InputError(f"{what}: context width must be {joint_dim} (Qwen-Image's text encoder), got {ctx.shape[2]} "
                          f"in shape {ctx.shape}")
    tensors = {"context": ctx}
    mask = attention_mask if attention_mask is not None else extras.get("attention_mask")
    if mask is not None:
        m = _to_numpy(mask, f"{what}: attention_mask")
        if m.ndim == 1:
            m = m[None]
        if m.shape != ctx.shape[:2]:
            raise _core.InputError(f"{what}: attention_mask must be {tuple(ctx.shape[:2])} to match the context, got {m.shape}")
        if m.dtype.kind == "f" or m.dtype.name == "bfloat16":  # additive (ComfyUI's float masks)
            tensors["attention_mask"] = _np.ascontiguousarray(m.astype(_np.float32))
        else:  # integer / bool: nonzero = keep
            tensors["attention_mask"] = _np.ascontiguousarray((m != 0).astype(_np.uint8))
    refs = reference_latents if reference_latents is not None else extras.get("reference_latents") or []
    for i, r in enumerate(refs):
        tensors[f"{REF_PREFIX}{i}"] = _latent_array(r, f"{what}: reference latent {i}")
    _core.save_file(tensors, str(path), {"format": "pt", "nibble": "conditioning"})


def load_conditioning(path, joint_dim: int = QWEN_IMAGE_JOINT_DIM) -> dict:
    """Read a conditioning file: ``{"context": (B, L, D) float32, "attention_mask": (B, L) uint8
    (keep mask) or float32 (additive mask) or None, "reference_latents": [float32 arrays]}``."""
    d = _core.load_file(str(path))
    if "context" not in d:
        raise _core.InputError(f"{path}: not a conditioning file: no tensor 'context' (found: "
                          f"{', '.join(sorted(d)) or 'no tensors'})")
    ctx = _float32(_np.asarray(d["context"]), f"{path}: context")
    if ctx.ndim == 2:
        ctx = ctx[None]
    if ctx.ndim != 3 or (joint_dim and ctx.shape[2] != joint_dim):
        raise _core.InputError(f"{path}: tensor 'context': expected (B, L, {joint_dim or 'D'}), got {ctx.shape}")
    mask = d.get("attention_mask")
    refs = []
    i = 0
    while f"{REF_PREFIX}{i}" in d:
        refs.append(_latent_array(d[f"{REF_PREFIX}{i}"], f"{path}: reference latent {i}").copy())
        i += 1
    if mask is not None:
        mask = _np.asarray(mask)
        mask = mask.astype(_np.float32) if mask.dtype.kind == "f" or mask.dtype.name == "bfloat16" else (mask != 0).astype(_np.uint8)
    return {"context": ctx.copy(), "attention_mask": mask,
            "reference_latents": refs}
