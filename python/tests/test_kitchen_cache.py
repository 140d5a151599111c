"""The kitchen adapter's prepared-weight paths and cache.

numpy part (always runs): scaled_mm with prepared weights and the padding-row skip, and gemv with a
prepared stream, are bit-identical to the plain ops (a skipped row's output is exactly 0 + bias);
a row is skipped only when every ascale and lora_act of it is zero.
torch part (skipped without torch; the opt-in `make test-kitchen` has it): the cache keyed to the
weight tensor — hits, invalidation by the version counter, entries dying with the tensor, the
memory bound — and the registry-routed ops equal the plain ones.
"""
import gc

import numpy as np
import pytest

import nibble
from nibble import _core
from refs import BF16, F16, F32, awq_ref, gamma, pack_nibbles, tile_proj_up, tile_wscales, tile_weight


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32)


def padded_case(rng, m, n, k, r, dt, unsigned, bias, pad=256):
    x = rng.standard_normal((m, k)).astype(dt)
    if unsigned:
        x = (np.abs(x.astype(np.float32)) + 0.171875).astype(dt)
    smooth = rng.uniform(0.5, 1.5, size=k).astype(dt)
    down = (rng.standard_normal((k, r)) * 0.1).astype(dt)
    q, asc, la = nibble.quantize_svdquant_w4a4(x, smooth, down, pad, unsigned, lora_act_dtype="float32")
    w = pack_nibbles(rng.integers(-8, 8, size=(n, k)))
    ws = rng.uniform(0.001, 0.02, size=(k // 64, n)).astype(dt)
    up = (rng.standard_normal((n, r)) * 0.1).astype(dt)
    b = (rng.standard_normal(n) * 0.1).astype(dt) if bias else None
    return q, w, asc, ws, la, up, b


@pytest.mark.parametrize("m,n,k,r,dt,unsigned,bias,tile", [
    (5, 256, 128, 16, BF16, False, True, False),
    (64, 128, 192, 32, F16, True, False, False),
    (300, 256, 256, 16, BF16, False, True, True),
    (256, 128, 64, 1, F16, False, True, True),      # no padding at all
])
def test_scaled_mm_prepared_and_padding_skip_are_exact(rng, m, n, k, r, dt, unsigned, bias, tile):
    q, w, asc, ws, la, up, b = padded_case(rng, m, n, k, r, dt, unsigned, bias)
    if tile:
        w, ws, up = tile_weight(w), tile_wscales(ws), tile_proj_up(up)
    plain = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b, unsigned)
    prep = _core.prepare_scaled_mm_svdquant_w4a4(w, ws, up)
    assert prep.nbytes > 0 and prep.finite and prep.op == "scaled_mm_svdquant_w4a4"
    for skip in (False, True):
        y = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b, unsigned, None, prep, skip)
        assert y.shape == plain.shape and np.array_equal(bits(y), bits(plain)), f"skip={skip}"
    for od in ("float32", "bfloat16"):
        y0 = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b, unsigned, od)
        y1 = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b, unsigned, od, prep, True)
        assert np.array_equal(bits(y0), bits(y1))


def test_only_provable_padding_is_skipped(rng):
    m, n, k, r = 3, 128, 128, 16
    q, w, asc, ws, la, up, b = padded_case(rng, m, n, k, r, BF16, False, True, pad=8)
    # a trailing row with zero ascales but a non-zero low-rank input is not padding
    asc, la = asc.copy(), la.copy()
    asc[:, 7] = 0
    la[7, 3] = 1.5
    plain = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
    prep = _core.prepare_scaled_mm_svdquant_w4a4(w, ws, up)
    y = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b, False, None, prep, True)
    assert np.array_equal(bits(y), bits(plain))
    assert not np.array_equal(bits(y[7]), bits(b))       # that row really carries the low-rank term
    assert np.array_equal(bits(y[3:7]), bits(np.broadcast_to(b, (4, n))))  # padding = bias
    # non-finite weight scales: nothing is skipped (0 · inf would be NaN in the GEMM)
    ws_inf = ws.copy()
    ws_inf[0, 5] = np.inf
    prep_inf = _core.prepare_scaled_mm_svdquant_w4a4(w, ws_inf, up)
    assert not prep_inf.finite
    y0 = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws_inf, la, up, b)
    y1 = _core.scaled_mm_svdquant_w4a4(q, w, asc, ws_inf, la, up, b, False, None, prep_inf, True)
    assert np.array_equal(bits(y0), bits(y1))


def test_prepared_shapes_must_match(rng):
    q, w, asc, ws, la, up, b = padded_case(rng, 4, 128, 128, 16, BF16, False, False)
    other = _core.prepare_scaled_mm_svdquant_w4a4(pack_nibbles(rng.integers(-8, 8, size=(256, 128))),
                                                  np.ones((2, 256), BF16), np.zeros((256, 16), BF16))
    with pytest.raises(ValueError, match="prepared weights"):
        _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b, False, None, other, True)
    awq = _core.prepare_gemv_awq_w4a16(pack_nibbles(rng.integers(0, 16, size=(8, 128))),
                                       np.ones((2, 8), BF16), np.zeros((2, 8), BF16))
    with pytest.raises(ValueError, match="other op"):
        _core.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b, False, None, awq, True)


@pytest.mark.parametrize("m,dt", [(1, BF16), (3, F16), (8, F16), (40, BF16)])
def test_gemv_prepared_equals_nibble_load_path(rng, m, dt):
    n, k, g = 136, 256, 64
    x = rng.standard_normal((m, k)).astype(dt)
    qw = pack_nibbles(rng.integers(0, 16, size=(n, k)))
    ws = rng.uniform(0.005, 0.02, size=(k // g, n)).astype(dt)
    wz = (rng.standard_normal((k // g, n)) * 0.05).astype(dt)
    b = (rng.standard_normal(n) * 0.1).astype(dt)
    prep = _core.prepare_gemv_awq_w4a16(qw, ws, wz, g)
    assert prep.op == "gemv_awq_w4a16"
    y = _core.gemv_awq_w4a16(x, qw, ws, wz, b, g, None, prep)
    plain = _core.gemv_awq_w4a16(x, qw, ws, wz, b, g)
    # the prepared (tiled) GEMV sums in another order than the stored-layout one, and the bf16
    # GEMM tier (M > 8) may round the weight to bf16: each is within u·|y| (final rounding) +
    # (u + γ_K)·Σ|x·w| (weight rounding, fp32 sum) of the exact result
    _, bound = awq_ref(x, qw, ws, wz, b, g)
    u = 2.0**-8 if dt == BF16 else 2.0**-11
    y64, p64 = y.astype(np.float64), plain.astype(np.float64)
    assert np.all(np.abs(y64 - p64) <= u * (np.abs(y64) + np.abs(p64)) + 2 * (u + gamma(k)) * bound)
    assert np.array_equal(bits(y), bits(_core.gemv_awq_w4a16(x, qw, ws, wz, b, g, None, prep)))


# ---------------------------------------------------------------- torch: the cache itself
def _torch():
    return pytest.importorskip("torch", reason="torch not installed (the cache keys torch tensors; "
                                               "run by make test-kitchen / test-comfyui)")


def _tcase(torch, n=256, k=256, r=16, m=40, tile=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16)
    down = (torch.randn(k, r, generator=g) * 0.1).to(torch.bfloat16)
    wq = torch.randint(-8, 8, (n, k), generator=g)
    w = ((wq[:, 0::2] & 0xF) | ((wq[:, 1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8)
    ws = (torch.rand(k // 64, n, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    up = (torch.randn(n, r, generator=g) * 0.1).to(torch.bfloat16)
    b = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16)
    if tile:
        w = torch.from_numpy(tile_weight(w.numpy()))
        ws = torch.from_numpy(tile_wscales(ws.view(torch.int16).numpy())).view(torch.bfloat16)
        up = torch.from_numpy(tile_proj_up(up.view(torch.int16).numpy())).view(torch.bfloat16)
    return x, smooth, down, w, ws, up, b


@pytest.fixture
def kitchen_cache():
    import nibble.kitchen as nk
    limit = nk.cache_info()["limit"]
    nk.clear_cache()
    yield nk
    nk.set_cache_limit(limit)
    nk.clear_cache()


def test_cache_hits_invalidates_and_dies_with_tensor(kitchen_cache):
    torch = _torch()
    nk = kitchen_cache
    x, smooth, down, w, ws, up, b = _tcase(torch)
    q, asc, la = nibble.quantize_svdquant_w4a4(x, smooth, down, 256, False, lora_act_dtype="float32")
    be = nk._Backend()
    plain = nibble.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
    i0 = nk.cache_info()
    y1 = be.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
    y2 = be.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
    i1 = nk.cache_info()
    assert torch.equal(y1, plain) and torch.equal(y2, plain)
    assert i1["misses"] == i0["misses"] + 1 and i1["hits"] == i0["hits"] + 1
    assert i1["entries"] == 1 and i1["bytes"] > 0
    # an in-place change of the weights bumps the version counter: re-prepared, new result
    w.view(torch.uint8)[0, :] ^= 0x11
    y3 = be.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
    assert torch.equal(y3, nibble.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b))
    assert not torch.equal(y3, plain) and nk.cache_info()["misses"] == i1["misses"] + 1
    # equal scales handed as a fresh clone (ComfyUI's .to(dtype) clones params): still a hit
    h = nk.cache_info()["hits"]
    y_clone = be.scaled_mm_svdquant_w4a4(q, w, asc, ws.clone(), la, up.clone(), b)
    assert torch.equal(y_clone, y3) and nk.cache_info()["hits"] == h + 1
    # other scales (a new tensor) are not served from the old entry
    ws2 = ws * 2
    y4 = be.scaled_mm_svdquant_w4a4(q, w, asc, ws2, la, up, b)
    assert torch.equal(y4, nibble.scaled_mm_svdquant_w4a4(q, w, asc, ws2, la, up, b))
    # the entry dies with the weight tensor
    assert nk.cache_info()["entries"] == 1
    del w, y1, y2, y3, y4, y_clone
    gc.collect()
    assert nk.cache_info()["entries"] == 0 and nk.cache_info()["bytes"] == 0


def test_cache_is_bounded(kitchen_cache):
    torch = _torch()
    nk = kitchen_cache
    be = nk._Backend()
    cases = [_tcase(torch, seed=s, tile=bool(s % 2)) for s in range(4)]
    per_entry = _core.prepare_scaled_mm_svdquant_w4a4(cases[0][3], cases[0][4], cases[0][5]).nbytes
    nk.set_cache_limit(2 * per_entry)
    for x, smooth, down, w, ws, up, b in cases:
        q, asc, la = nibble.quantize_svdquant_w4a4(x, smooth, down, 256, False, lora_act_dtype="float32")
        y = be.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
        assert torch.equal(y, nibble.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b))
        info = nk.cache_info()
        assert info["bytes"] <= info["limit"] and info["entries"] <= 2
    assert nk.cache_info()["evictions"] >= 2
    nk.set_cache_limit(0)  # disabled: nothing kept, still correct
    assert nk.cache_info()["entries"] == 0
    x, smooth, down, w, ws, up, b = cases[0]
    q, asc, la = nibble.quantize_svdquant_w4a4(x, smooth, down, 256, False, lora_act_dtype="float32")
    assert torch.equal(be.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b),
                       nibble.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b))


def test_awq_cache_entry(kitchen_cache):
    torch = _torch()
    nk = kitchen_cache
    g = torch.Generator().manual_seed(3)
    n, k = 256, 512
    qw = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int8)
    ws = (torch.rand(k // 64, n, generator=g) * 0.01).to(torch.bfloat16)
    wz = (torch.randn(k // 64, n, generator=g) * 0.01).to(torch.bfloat16)
    be = nk._Backend()
    for m in (1, 64):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        y = be.gemv_awq_w4a16(x, qw, ws, wz, None, 64)
        ref = nibble._like(_core.gemv_awq_w4a16(x, qw, ws, wz, None, 64, None,
                                                _core.prepare_gemv_awq_w4a16(qw, ws, wz, 64)), x)
        assert torch.equal(y, ref)
    assert nk.cache_info()["entries"] == 1 and nk.cache_info()["hits"] >= 1


def test_inference_tensors(kitchen_cache):
    """ComfyUI runs under torch.inference_mode: its tensors have no version counter."""
    torch = _torch()
    nk = kitchen_cache
    with torch.inference_mode():
        x, smooth, down, w, ws, up, b = _tcase(torch)
        q, asc, la = nibble.quantize_svdquant_w4a4(x, smooth, down, 256, False, lora_act_dtype="float32")
        be = nk._Backend()
        h0 = nk.cache_info()["hits"]
        y1 = be.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
        y2 = be.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b)
        assert torch.equal(y1, nibble.scaled_mm_svdquant_w4a4(q, w, asc, ws, la, up, b))
        assert torch.equal(y1, y2) and nk.cache_info()["hits"] == h0 + 1

