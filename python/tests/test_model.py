"""nibble.load / nibble.inspect on the seeded sample checkpoint (nibble/sample.h).

Each layer's output is checked against a float64 evaluation of its own effective weight:
exact-weight paths (float, awq, dequantize fallback) within fp32 accumulation bounds; svdquant
layers within the activation-quantization bound derived from spec §3.3 (each smoothed activation
is off by at most half its group's scale).
"""
import errno

import ml_dtypes
import numpy as np
import pytest

import nibble
from refs import BF16, UNIT_ROUNDOFF, assert_within, f64, gamma, quantize_ref, unpack_signed

# Kitchen formats that are not row-separable: nibble decodes them to bf16 once at load.
BF16_DECODED = {"nvfp4", "mxfp8", "convrot_w4a4", "asym_w4a8_int8"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "sample.safetensors"
    nibble.write_sample_checkpoint(path, hidden=256, rank=16)
    return path


def untile_weight(t):
    nt, g, _, _ = t.shape
    return t.reshape(nt, g, 128, 32).transpose(0, 2, 1, 3).reshape(nt * 128, g * 32)


def untile_wscales(t):
    nt, g, _ = t.shape
    return t.transpose(1, 0, 2).reshape(g, nt * 128)


def svdquant_bound(layer, x_main):
    """Σ_g (ascale/2)·Σ_k |q_w|·wscale: the main path's error from rounding activations."""
    p = layer.params
    w = p["weight"]
    s = p["weight_scale"] if "weight_scale" in p else p["wscales"]
    if w.ndim == 4:
        w, s = untile_weight(w), untile_wscales(s)
    smooth = p["smooth_factor"] if "smooth_factor" in p else p["smooth"]
    _, asc, _, _ = quantize_ref(x_main, smooth, np.zeros((w.shape[1] * 2, 1), np.float32),
                                1, layer.act_unsigned)
    qw = np.abs(unpack_signed(w)).reshape(w.shape[0], -1, 64).sum(-1)   # (N, G)
    return (f64(asc).T / 2) @ (qw.T * f64(s))                             # (M, N)


def test_load_and_run_every_layer(sample, rng):
    model = nibble.load(sample)
    assert len(model) == len(model.layers) > 0
    formats = {layer.format for layer in model.layers.values()}
    assert {"awq_w4a16", "svdquant_w4a4"} <= formats, formats
    for name, layer in model.layers.items():
        k, n = layer.in_features, layer.out_features
        x = rng.standard_normal((3, k)).astype(np.float32)
        if layer.act_unsigned:
            x = np.abs(x)                         # post-GELU inputs
        y = layer(x)
        assert y.shape == (3, n) and y.dtype == np.float32, name
        w = f64(layer.dequantize())
        b = f64(layer.effective_bias()) if layer.effective_bias() is not None else 0
        ref = f64(x) @ w.T + b
        dense_bound = np.abs(f64(x)) @ np.abs(w).T + np.abs(b)
        tol = gamma(3 * k + 8) * dense_bound * 2
        if layer.format in BF16_DECODED:
            # decoded to bf16 at load, bf16 dense GEMM (docs/model.md, Memory): x and W each
            # rounded to bf16 (u = 2^-8), exact products summed in fp32
            tol = (2 * UNIT_ROUNDOFF[BF16] + gamma(k + 2)) * dense_bound
        if layer.format == "awq_w4a16" and nibble.isa() == "avx512bf16":
            # the avx512bf16 GEMV rounds fp32 x once to bf16 like the kitchen (docs/awq.md):
            # |x̂ − x| ≤ 2^-8·|x|, weights exact, so at most 2^-8·Σ|x||w| more
            tol = tol + UNIT_ROUNDOFF[BF16] * dense_bound
        if layer.format == "svdquant_w4a4":
            x_main = (x + np.float32(0.171875)).astype(np.float32) if layer.act_unsigned else x
            # the smoothed activation is what the quantizer rounds; its error reaches y through
            # the stored residual codes · wscale. The low-rank branch is exact up to its own
            # rounding (lora_act may be kept in a 16-bit dtype: u_bf16 · Σ|x·down|·|up|).
            p = layer.params
            down = f64(p.get("proj_down", p.get("weight_proj_down")))
            up = f64(p.get("proj_up", p.get("weight_proj_up")))
            if up.ndim == 3:
                up = up.transpose(0, 2, 1).reshape(-1, up.shape[1])
            lora_bound = (np.abs(f64(x)) @ np.abs(down)) @ np.abs(up).T
            tol = tol + svdquant_bound(layer, x_main) + UNIT_ROUNDOFF[BF16] * lora_bound
        assert_within(y, ref, tol, f"layer {name} ({layer.format}, {layer.path})")


def test_layer_dtypes_and_shapes(sample, rng):
    model = nibble.load(sample)
    name = next(n for n, layer in model.layers.items() if layer.format == "awq_w4a16")
    layer = model[name]
    x = rng.standard_normal((2, 3, layer.in_features)).astype(BF16)
    y = layer(x)
    assert y.dtype == BF16 and y.shape == (2, 3, layer.out_features)
    y32 = layer(x, out_dtype="float32")
    assert y32.dtype == np.float32
    assert np.array_equal(y32.astype(BF16).view(np.uint16), y.view(np.uint16))
    with pytest.raises(ValueError):
        layer(np.zeros((2, layer.in_features + 1), np.float32))
    with pytest.raises(KeyError):
        model["no.such.layer"]


def test_prefix_and_metadata_configs(sample, tmp_path, rng):
    path = tmp_path / "prefixed.safetensors"
    nibble.write_sample_checkpoint(path, prefix="model.diffusion_model.", configs_in_metadata=True)
    model = nibble.load(path)
    assert model.prefix == "model.diffusion_model." and model.mixed
    name = model.names()[0]
    assert name in model and ("model.diffusion_model." + name) in model


def test_inspect_mirrors_cli(sample):
    rep = nibble.inspect(sample)
    assert isinstance(rep, dict)
    text = nibble.inspect(sample, as_text=True)
    assert "awq_w4a16" in text and "svdquant_w4a4" in text
    only = nibble.inspect(sample, filter="img_mod")
    assert "img_mod" in str(only) and "to_q" not in str(only)


def test_load_errors(tmp_path):
    with pytest.raises(nibble.FileError) as ei:
        nibble.load(tmp_path / "missing.safetensors")
    assert isinstance(ei.value, OSError) and isinstance(ei.value, nibble.Error)
    assert ei.value.errno == errno.ENOENT and "missing.safetensors" in str(ei.value)
    bad = tmp_path / "bad.safetensors"
    nibble.save_file({"l.weight": np.zeros((8, 32), np.int8),
                      "l.comfy_quant": np.frombuffer(b'{"format":"no_such_format"}', np.uint8).copy()},
                     bad)
    with pytest.raises(nibble.InputError) as ei:
        nibble.load(bad)
    assert isinstance(ei.value, ValueError) and not isinstance(ei.value, OSError)
    assert "no_such_format" in str(ei.value)
