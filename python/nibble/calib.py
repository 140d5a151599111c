"""Calibration statistics for ``nibble convert --calib`` recorded during real forward passes.

Hook a model, run it on real inputs (a ComfyUI sampling run, a diffusers pipeline, a plain torch
model), and the inputs of every linear layer are summarised into the statistics file the converter
reads (docs/convert.md, ``nibble_calib_v1``)::

    import nibble.calib
    with nibble.calib.Recorder(model, "calib.safetensors", sample_rows=256) as rec:
        for batch in loader:
            rec.mask = batch["attention_mask"]      # optional: drop padding tokens
            model(**batch)
    # → calib.safetensors, then: nibble convert IN -o OUT --preset ... --calib calib.safetensors

Hooked: every ``torch.nn.Linear`` and every module whose class is named ``Linear`` and has
``in_features`` (ComfyUI's ``comfy.ops`` classes, e.g. ``disable_weight_init.Linear``,
``manual_cast.Linear`` and ``MixedPrecisionOps.Linear``, which is a plain ``nn.Module``). Layer
names are the module names of ``module.named_modules()`` with ``prefix`` prepended; the converter
matches them to checkpoint names exactly or up to a leading prefix (``model.diffusion_model.``).

Per layer and input channel k the file holds ``max_abs``, ``mean_abs``, ``mean_sq``, ``min``, ``max``
over every recorded row, and ``sample``: ``sample_rows`` rows chosen uniformly at random among all
rows of all calls (reservoir sampling, seeded), exactly ``sample_rows`` when that many were seen
— there is no other cap. A row is one token: the input reshaped to ``(-1, in_features)``.

``mask``: a boolean array (numpy or torch) over the leading dimensions of the inputs, e.g. the
``(batch, tokens)`` attention mask; rows where it is False are not recorded. It applies to inputs
whose leading shape equals the mask's shape; other inputs (modulation linears fed ``(batch, dim)``)
are recorded whole. Set it per batch (``rec.mask = ...``) or pass it to ``record``.

Without torch: ``Recorder(None)`` and ``rec.record(name, x)`` with numpy arrays (the test path).
"""
from __future__ import annotations

import json
import struct

import numpy as np

__all__ = ["Recorder", "LayerStats", "write_stats"]


class LayerStats:
    """Running per-channel statistics and a reservoir sample of the rows of one layer's input."""

    def __init__(self, k: int, sample_rows: int, rng: np.random.Generator):
        self.k = k
        self.count = 0
        self.sum_abs = np.zeros(k, np.float64)
        self.sum_sq = np.zeros(k, np.float64)
        self.max_abs = np.zeros(k, np.float32)
        self.min = np.full(k, np.inf, np.float32)
        self.max = np.full(k, -np.inf, np.float32)
        self.capacity = int(sample_rows)
        self.sample = np.empty((self.capacity, k), np.float32)
        self.kept = 0
        self.rng = rng

    def add(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        m = rows.shape[0]
        if m == 0:
            return
        a = np.abs(rows)
        self.sum_abs += a.sum(0, dtype=np.float64)
        self.sum_sq += np.square(rows, dtype=np.float64).sum(0)
        np.maximum(self.max_abs, a.max(0), out=self.max_abs)
        np.minimum(self.min, rows.min(0), out=self.min)
        np.maximum(self.max, rows.max(0), out=self.max)
        # Reservoir (algorithm R): row number t (0-based over all calls) replaces a random slot
        # j ∈ [0, t] when j < capacity, so every row seen is kept with probability capacity / count.
        t0 = self.count
        fill = min(max(self.capacity - self.kept, 0), m)
        if fill:
            self.sample[self.kept:self.kept + fill] = rows[:fill]
            self.kept += fill
        if fill < m and self.capacity > 0:
            t = np.arange(t0 + fill, t0 + m, dtype=np.int64)
            j = self.rng.integers(0, t + 1)
            for i in np.nonzero(j < self.capacity)[0]:  # in order: later rows win, as sequentially
                self.sample[j[i]] = rows[fill + i]
        self.count += m

    def tensors(self) -> dict:
        n = max(self.count, 1)
        out = {
            "max_abs": self.max_abs.copy(),
            "mean_abs": (self.sum_abs / n).astype(np.float32),
            "mean_sq": (self.sum_sq / n).astype(np.float32),
            "min": np.where(np.isfinite(self.min), self.min, 0).astype(np.float32),
            "max": np.where(np.isfinite(self.max), self.max, 0).astype(np.float32),
        }
        if self.kept:
            out["sample"] = self.sample[:self.kept].copy()
        return out


def write_stats(path, stats: dict) -> None:
    """Write ``{layer: {stat: float32 array}}`` as a ``nibble_calib_v1`` safetensors file (plain
    Python: header JSON + little-endian F32 data; written to a temporary name, then renamed)."""
    import os

    header, blobs, offset = {"__metadata__": {"format": "nibble_calib_v1"}}, [], 0
    for layer in sorted(stats):
        for stat, arr in stats[layer].items():
            arr = np.ascontiguousarray(arr, dtype="<f4")
            header[f"{layer}.{stat}"] = {"dtype": "F32", "shape": list(arr.shape),
                                         "data_offsets": [offset, offset + arr.nbytes]}
            blobs.append(arr.tobytes())
            offset += arr.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _is_linear(module) -> bool:
    try:
        import torch

        if isinstance(module, torch.nn.Linear):
            return True
    except ImportError:  # pragma: no cover
        pass
    return type(module).__name__ == "Linear" and hasattr(module, "in_features")


class Recorder:
    """Context manager recording the inputs of linear layers into a calibration statistics file.

    ``module``: a torch module to hook (``None``: record by hand with :meth:`record`);
    ``path``: the statistics file written on exit (``None``: call :meth:`save` yourself);
    ``sample_rows``: rows kept per layer (uniform over all rows recorded; default 256);
    ``include`` / ``exclude``: regexes on layer names (search); ``prefix``: prepended to names;
    ``seed``: of the row sample; ``mask``: initial row mask (see the module docstring).
    """

    def __init__(self, module=None, path=None, *, sample_rows: int = 256, include=None, exclude=None,
                 prefix: str = "", seed: int = 0x5EED, mask=None):
        import re

        if sample_rows < 0:
            raise ValueError(f"sample_rows must be >= 0, got {sample_rows}")
        self.module, self.path, self.sample_rows, self.prefix = module, path, int(sample_rows), prefix
        self.include = re.compile(include) if include else None
        self.exclude = re.compile(exclude) if exclude else None
        self.mask = mask
        self.layers: dict[str, LayerStats] = {}
        self._seed = int(seed)
        self._handles = []

    # ---------------------------------------------------------------- recording
    def _wanted(self, name: str) -> bool:
        if self.include is not None and not self.include.search(name):
            return False
        return not (self.exclude is not None and self.exclude.search(name))

    def record(self, name: str, x, mask=None) -> None:
        """Add the input rows ``x`` (``(..., K)``) of layer ``name``; ``mask`` (default: the
        recorder's) over the leading dimensions drops rows where False."""
        x = _to_numpy(x)
        if x.ndim < 1:
            raise ValueError(f"calib: input of {name} must have a channel dimension, got a scalar")
        mask = self.mask if mask is None else mask
        k = x.shape[-1]
        if mask is not None:
            m = _to_numpy(mask).astype(bool)
            if m.shape == x.shape[:-1]:
                x = x[m]
        rows = x.reshape(-1, k)
        st = self.layers.get(name)
        if st is None:
            seed = (self._seed * 1000003 + sum(name.encode()) * 7919 + len(self.layers)) % (2**63)
            st = self.layers[name] = LayerStats(k, self.sample_rows, np.random.default_rng(seed))
        elif st.k != k:
            raise ValueError(f"calib: {name} had {st.k} input channels, now {k}")
        st.add(rows)

    def _hook(self, name):
        def pre_hook(module, args, kwargs=None):
            if args:
                self.record(name, args[0])
            elif kwargs and "input" in kwargs:
                self.record(name, kwargs["input"])
        return pre_hook

    # ---------------------------------------------------------------- context manager
    def __enter__(self):
        if self.module is not None:
            for n, m in self.module.named_modules():
                name = self.prefix + n
                if n and _is_linear(m) and self._wanted(name):
                    self._handles.append(m.register_forward_pre_hook(self._hook(name)))
            if not self._handles:
                raise ValueError("calib.Recorder: the module has no Linear layers to hook"
                                 + (" matching include/exclude" if self.include or self.exclude else ""))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc_type is None and self.path is not None:
            self.save(self.path)
        return False

    # ---------------------------------------------------------------- output
    def stats(self) -> dict:
        """``{layer: {"max_abs", "mean_abs", "mean_sq", "min", "max", "sample"}}`` (float32)."""
        return {name: st.tensors() for name, st in self.layers.items() if st.count > 0}

    def save(self, path) -> None:
        st = self.stats()
        if not st:
            raise ValueError("calib.Recorder: nothing was recorded (did the forward passes run inside "
                             "the `with` block?)")
        write_stats(path, st)

    def summary(self) -> str:
        return "\n".join(f"{n}: {s.count} rows seen, {s.kept} sampled, K={s.k}" for n, s in self.layers.items())
