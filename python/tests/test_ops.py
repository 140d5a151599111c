"""The three kitchen ops against the numpy references of refs.py, on every supported ISA.

Tolerances are derived from the arithmetic the spec prescribes (see each test): fp32 sums bound
by γ_n·Σ|terms| (Higham), one rounding to the output dtype (unit roundoff u), integer parts exact.
"""
import threading

import ml_dtypes
import numpy as np
import pytest

import nibble
from conftest import SEED
from refs import (BF16, F16, F32, UNIT_ROUNDOFF, assert_within, awq_ref, f64, gamma,
                  pack_nibbles, quantize_ref, scaled_mm_ref, tile_proj_up, tile_wscales,
                  tile_weight, unpack_signed, unpack_unsigned)

FLOATS = [F32, BF16, F16]
HALF = [BF16, F16]


def random_cases(n, draw, seed):
    gen = np.random.default_rng([SEED, seed])
    return [draw(gen) for _ in range(n)]


# ---------------------------------------------------------------- awq_w4a16
def _awq_case(gen):
    g = int(gen.choice([32, 64, 128]))
    k = g * int(gen.integers(1, 4))
    return dict(lead=[(1,), (3,), (8,), (17,), (2, 5)][int(gen.integers(5))],
                n=int(gen.choice([1, 8, 24, 136])), k=k, g=g,
                xdt=FLOATS[gen.integers(3)], sdt=HALF[gen.integers(2)],
                bias=bool(gen.integers(2)))


AWQ_CASES = random_cases(10, _awq_case, 1) + [
    dict(lead=(1,), n=128, k=256, g=64, xdt=BF16, sdt=BF16, bias=True),    # the modulation GEMV
    dict(lead=(33,), n=40, k=192, g=64, xdt=F32, sdt=F16, bias=False),     # past the GEMV tier
]


def make_awq(rng, lead, n, k, g, xdt, sdt, bias):
    x = rng.standard_normal((*lead, k)).astype(xdt)
    q = rng.integers(0, 16, size=(n, k))
    wscales = rng.uniform(0.005, 0.02, size=(k // g, n)).astype(sdt)
    wzeros = (rng.standard_normal((k // g, n)) * 0.05).astype(sdt)
    b = (rng.standard_normal(n) * 0.1).astype(sdt) if bias else None
    return x, pack_nibbles(q), wscales, wzeros, b


@pytest.mark.parametrize("case", AWQ_CASES, ids=lambda c: "M{lead}_N{n}_K{k}_G{g}_{xdt}_{sdt}".format(**c))
def test_awq_matches_reference(case, rng, each_isa):
    x, qw, s, z, b = make_awq(rng, **case)
    y = nibble.gemv_awq_w4a16(x, qw, s, z, bias=b, group_size=case["g"])
    ref, bound = awq_ref(x, qw, s, z, b, case["g"])
    assert y.dtype == s.dtype, "output dtype must be wscales' dtype (kitchen semantics)"
    assert y.shape == (*case["lead"], case["n"])
    # fp32 accumulation of K products (×3 when the bf16 path splits x into three bf16 parts)
    # plus the per-group zero fold, then one rounding to the output dtype (+ one more if the bias
    # is added after it).
    # The avx512bf16 GEMM tier (M > 8, docs/awq.md) rounds the dequantized weight to bf16 like the
    # kitchen's MMA tier: one more relative error of 2^-8 per weight element.
    k = case["k"]
    m = int(np.prod(case["lead"]))
    w_round = 2.0**-8 if (each_isa == "avx512bf16" and m > 8) else 0.0
    tol = (2 * UNIT_ROUNDOFF[s.dtype] + w_round) * bound + gamma(3 * k + k // case["g"] + 4) * bound
    assert_within(y, ref, tol, f"awq {case} isa={each_isa}")


def test_awq_out_dtype_f32_and_threads(rng):
    x, qw, s, z, b = make_awq(rng, (4,), 64, 128, 64, BF16, BF16, True)
    y32 = nibble.gemv_awq_w4a16(x, qw, s, z, b, 64, out_dtype="float32")
    assert y32.dtype == np.float32
    ref, bound = awq_ref(x, qw, s, z, b, 64)
    assert_within(y32, ref, gamma(3 * 128 + 6) * bound + 1e-30, "awq out_dtype=float32")
    # Work is split over output tiles: bit-identical for any thread count.
    before = nibble.num_threads()
    try:
        nibble.set_num_threads(1)
        y1 = nibble.gemv_awq_w4a16(x, qw, s, z, b, 64, out_dtype="float32")
    finally:
        nibble.set_num_threads(before)
    assert np.array_equal(y1.view(np.uint32), y32.view(np.uint32))


def test_awq_accepts_uint8_and_noncontiguous(rng):
    x, qw, s, z, _ = make_awq(rng, (6,), 32, 128, 64, F32, BF16, False)
    y = nibble.gemv_awq_w4a16(x, qw, s, z)
    big = np.zeros((6, 2 * 128), np.float32)
    big[:, ::2] = x                                   # strided view: copied to contiguous
    y2 = nibble.gemv_awq_w4a16(big[:, ::2], qw.view(np.uint8), s, z)
    assert np.array_equal(y.view(np.uint16), y2.view(np.uint16))


def misaligned_copy(a):
    """The same values as `a`, in an array whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64 + 1
    odd = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    odd[...] = a
    assert odd.ctypes.data % a.itemsize != 0 and not odd.flags.aligned
    return odd


@pytest.mark.parametrize("xdt", [F32, BF16], ids=["f32", "bf16"])
def test_misaligned_arrays_are_copied(xdt, rng, each_isa):
    """f32 / bf16 views at an odd byte offset are copied into aligned arrays, never viewed (the
    kernels' typed and vector loads assume element alignment): same bits as the aligned call."""
    x, qw, s, z, b = make_awq(rng, (5,), 24, 128, 64, xdt, BF16, True)
    want = nibble.gemv_awq_w4a16(x, qw, s, z, b, out_dtype="float32")
    got = nibble.gemv_awq_w4a16(misaligned_copy(x), qw, misaligned_copy(s), misaligned_copy(z),
                                misaligned_copy(b), out_dtype="float32")
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    xw = rng.standard_normal((3, 64)).astype(F32)
    w = rng.standard_normal((16, 64)).astype(F32)
    assert np.array_equal(nibble.linear(misaligned_copy(xw), misaligned_copy(w)).view(np.uint32),
                          nibble.linear(xw, w).view(np.uint32))


def test_awq_gil_released_concurrent_calls(rng):
    x, qw, s, z, b = make_awq(rng, (3,), 256, 512, 64, BF16, BF16, True)
    want = nibble.gemv_awq_w4a16(x, qw, s, z, b)
    got, errors = [None] * 4, []

    def run(i):
        try:
            got[i] = nibble.gemv_awq_w4a16(x, qw, s, z, b)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g in got:
        assert np.array_equal(g.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("bad", ["k_not_multiple_of_g", "qweight_width", "qweight_dtype",
                                 "scales_shape", "zeros_dtype", "not_an_array", "bias_shape"])
def test_awq_errors(bad, rng):
    x, qw, s, z, b = make_awq(rng, (2,), 16, 128, 64, BF16, BF16, True)
    g = 64
    if bad == "k_not_multiple_of_g":
        g = 48
    elif bad == "qweight_width":
        qw = qw[:, :32].copy()
    elif bad == "qweight_dtype":
        qw = qw.astype(np.float32)
    elif bad == "scales_shape":
        s = s[:1].copy()
    elif bad == "zeros_dtype":
        z = z.astype(np.int32)
    elif bad == "not_an_array":
        x = [[1.0] * 128] * 2
    elif bad == "bias_shape":
        b = np.zeros(15, BF16)
    with pytest.raises(ValueError) as ei:
        nibble.gemv_awq_w4a16(x, qw, s, z, b, g)
    assert str(ei.value), "the error must say what was expected"


# ---------------------------------------------------------------- quantize_svdquant_w4a4
def _quant_case(gen):
    return dict(m=int(gen.choice([1, 5, 16, 31])), k=64 * int(gen.integers(1, 4)),
                r=int(gen.choice([1, 16, 32])), pad=int(gen.choice([1, 16, 256])),
                xdt=FLOATS[gen.integers(3)], unsigned=bool(gen.integers(2)),
                lora_x=bool(gen.integers(2)))


QUANT_CASES = random_cases(10, _quant_case, 2) + [
    dict(m=4, k=128, r=16, pad=256, xdt=BF16, unsigned=False, lora_x=False),
    dict(m=4, k=128, r=16, pad=16, xdt=BF16, unsigned=True, lora_x=True),
]


def make_quant(rng, m, k, r, xdt, unsigned, lora_x, **_):
    raw = rng.standard_normal((m, k)) * rng.uniform(0.5, 3)
    if unsigned:
        raw = np.abs(raw) + 0.171875
    raw[rng.integers(m), rng.integers(k)] *= 40          # an outlier
    x = raw.astype(xdt)
    smooth = rng.uniform(0.5, 2.0, size=k).astype(x.dtype if xdt != F32 else BF16)
    smooth[rng.integers(k)] = 0                           # |s| ≤ 1e-10 → inv_s = 0 (spec step 1)
    down = (rng.standard_normal((k, r)) * 0.1).astype(smooth.dtype)
    lx = rng.standard_normal((m, k)).astype(xdt) if lora_x else None
    return x, smooth, down, lx


@pytest.mark.parametrize("case", QUANT_CASES,
                         ids=lambda c: "M{m}_K{k}_R{r}_pad{pad}_{xdt}_u{unsigned}_lx{lora_x}".format(**c))
def test_quantize_matches_reference(case, rng, each_isa):
    x, smooth, down, lx = make_quant(rng, **case)
    q_x, ascales, lora_act = nibble.quantize_svdquant_w4a4(
        x, smooth, down, pad_size=case["pad"], act_unsigned=case["unsigned"], lora_x=lx)
    codes, asc32, la, la_bound = quantize_ref(x, smooth, down, case["pad"], case["unsigned"], lx)
    m_pad = codes.shape[0]
    assert q_x.dtype == np.int8 and q_x.shape == (m_pad, case["k"] // 2)
    assert ascales.dtype == x.dtype and ascales.shape == (case["k"] // 64, m_pad)
    assert lora_act.dtype == x.dtype and lora_act.shape == (m_pad, case["r"])
    got = unpack_unsigned(q_x) if case["unsigned"] else unpack_signed(q_x)
    # The quantizer is fp32 arithmetic the spec writes step by step: codes are exact.
    mism = np.argwhere(got != codes)
    assert mism.size == 0, f"{len(mism)} codes differ, first at {mism[0]}: {got[tuple(mism[0])]} vs {codes[tuple(mism[0])]}"
    # Stored scales: the fp32 scale rounded once to x's dtype.
    assert np.array_equal(f64(ascales), f64(asc32.astype(x.dtype)))
    # lora_act: fp32 sum of K products, one rounding to x's dtype; padding rows exactly 0. The bf16
    # low-rank branch (bf16 proj_down, fp32 input; docs/w4a4.md) first rounds the input to bf16:
    # |x̂ − x| ≤ u_bf16·|x|, so + u_bf16·Σ|x·d| (its fp32 sum over x̂ stays inside the γ term's spare).
    src = x if lx is None else lx
    x_round = UNIT_ROUNDOFF[BF16] if (down.dtype == BF16 and src.dtype == F32) else 0.0
    tol = UNIT_ROUNDOFF[x.dtype] * np.abs(la) + (gamma(3 * case["k"] + 2) + x_round) * la_bound
    assert_within(lora_act, la, tol, f"lora_act {case} isa={each_isa}")
    assert not np.any(f64(lora_act[case["m"]:]))


def test_quantize_clamp_contract(rng):
    # spec §5 "clamp contract": signed codes in [−7, 7] (−8 never emitted, the outlier hits −7);
    # unsigned codes in [0, 15].
    x = (rng.standard_normal((4, 128)) * 3).astype(BF16)
    x[1, 5] = -100
    smooth = np.ones(128, BF16)
    down = np.zeros((128, 16), BF16)
    q, _, _ = nibble.quantize_svdquant_w4a4(x, smooth, down, pad_size=16)
    codes = unpack_signed(q)
    assert codes.min() >= -7 and codes.max() <= 7 and codes[1, 5] == -7
    qu, _, _ = nibble.quantize_svdquant_w4a4(x, smooth, down, pad_size=16, act_unsigned=True)
    cu = unpack_unsigned(qu)
    assert cu.min() >= 0 and cu.max() <= 15


def test_quantize_lora_x_default_is_x(rng):
    x, smooth, down, _ = make_quant(rng, 4, 128, 16, BF16, False, False)
    a = nibble.quantize_svdquant_w4a4(x, smooth, down, 16)
    b = nibble.quantize_svdquant_w4a4(x, smooth, down, 16, False, x)
    for u, v in zip(a, b):
        assert np.array_equal(u.view(np.uint8), v.view(np.uint8))


@pytest.mark.parametrize("bad", ["k_not_multiple_of_64", "x_3d", "smooth_length", "down_rows",
                                 "lora_x_shape", "pad_zero"])
def test_quantize_errors(bad, rng):
    x, smooth, down, _ = make_quant(rng, 4, 128, 16, BF16, False, False)
    lx, pad = None, 256
    if bad == "k_not_multiple_of_64":
        x, smooth, down = x[:, :96].copy(), smooth[:96].copy(), down[:96].copy()
    elif bad == "x_3d":
        x = x.reshape(2, 2, 128)
    elif bad == "smooth_length":
        smooth = smooth[:64].copy()
    elif bad == "down_rows":
        down = down[:64].copy()
    elif bad == "lora_x_shape":
        lx = x[:3].copy()
    elif bad == "pad_zero":
        pad = 0
    with pytest.raises(ValueError):
        nibble.quantize_svdquant_w4a4(x, smooth, down, pad, False, lx)


# ---------------------------------------------------------------- scaled_mm_svdquant_w4a4
def _mm_case(gen):
    return dict(m=int(gen.choice([1, 7, 16, 40])), n=int(gen.choice([8, 128, 136, 256])),
                k=64 * int(gen.integers(1, 4)), r=int(gen.choice([1, 16, 32])),
                dt=HALF[gen.integers(2)], ladt=FLOATS[gen.integers(3)],
                unsigned=bool(gen.integers(2)), bias=bool(gen.integers(2)))


MM_CASES = random_cases(10, _mm_case, 3) + [
    dict(m=16, n=8, k=64, r=16, dt=BF16, ladt=BF16, unsigned=True, bias=False),
    dict(m=64, n=256, k=256, r=32, dt=BF16, ladt=BF16, unsigned=False, bias=True),
]


def make_mm(rng, m, n, k, r, dt, ladt, unsigned, bias):
    a = rng.integers(0, 16, size=(m, k)) if unsigned else rng.integers(-7, 8, size=(m, k))
    w = rng.integers(-8, 8, size=(n, k))
    ascales = rng.uniform(0.01, 0.5, size=(k // 64, m)).astype(dt)
    wscales = rng.uniform(0.001, 0.02, size=(k // 64, n)).astype(dt)
    lora_act = rng.standard_normal((m, r)).astype(ladt)
    lora_up = (rng.standard_normal((n, r)) * 0.1).astype(dt)
    b = (rng.standard_normal(n) * 0.1).astype(dt) if bias else None
    return pack_nibbles(a), pack_nibbles(w), ascales, wscales, lora_act, lora_up, b


@pytest.mark.parametrize("case", MM_CASES,
                         ids=lambda c: "M{m}_N{n}_K{k}_R{r}_{dt}_la{ladt}_u{unsigned}".format(**c))
def test_scaled_mm_matches_reference(case, rng, each_isa):
    args = make_mm(rng, **case)
    y = nibble.scaled_mm_svdquant_w4a4(*args, act_unsigned=case["unsigned"])
    ref, bound = scaled_mm_ref(*args, case["unsigned"])
    assert y.dtype == case["dt"] and y.shape == (case["m"], case["n"])
    # Exact int32 group sums; fp32 sum of K/64 scaled group terms (2 roundings each) + R LoRA
    # products + bias; one rounding to the output dtype, one more if the LoRA term is added
    # unfused in the output dtype (bounded by u·Σ|terms|).
    groups = case["k"] // 64
    u = UNIT_ROUNDOFF[case["dt"]]
    tol = u * (np.abs(ref) + bound) + gamma(2 * groups + 3 * case["r"] + 4) * bound
    assert_within(y, ref, tol, f"scaled_mm {case} isa={each_isa}")

    if case["n"] % 128 == 0:
        # The tile-packed layout is a permutation of the same bytes: identical output (spec §3.2).
        a, w, asc, ws, la, up, b = args
        yt = nibble.scaled_mm_svdquant_w4a4(a, tile_weight(w), asc, tile_wscales(ws), la,
                                            tile_proj_up(up), b, case["unsigned"])
        assert np.array_equal(y.view(np.uint16), yt.view(np.uint16))


def test_act_unsigned_dispatch():
    # spec §5: act bytes 0xFF, weight bytes 0x11, unit scales, m,n,k,r = 16,8,64,16:
    # signed → 64·(−1·1) = −64, unsigned → 64·15 = 960.
    act = np.full((16, 32), 0xFF, np.uint8)
    wgt = np.full((8, 32), 0x11, np.uint8).view(np.int8)
    ones_a, ones_w = np.ones((1, 16), BF16), np.ones((1, 8), BF16)
    la, up = np.zeros((16, 16), BF16), np.zeros((8, 16), BF16)
    ys = nibble.scaled_mm_svdquant_w4a4(act, wgt, ones_a, ones_w, la, up)
    yu = nibble.scaled_mm_svdquant_w4a4(act, wgt, ones_a, ones_w, la, up, act_unsigned=True)
    assert np.all(f64(ys) == -64) and np.all(f64(yu) == 960)


def test_quantize_then_mm_chain(rng):
    """The layer path of spec §3.4 against a dense float64 evaluation of the same codes."""
    m, n, k, r = 5, 128, 192, 16
    x, smooth, down, _ = make_quant(rng, m, k, r, BF16, False, False)
    w = rng.integers(-8, 8, size=(n, k))
    wscales = rng.uniform(0.001, 0.02, size=(k // 64, n)).astype(BF16)
    up = (rng.standard_normal((n, r)) * 0.1).astype(BF16)
    q, asc, la = nibble.quantize_svdquant_w4a4(x, smooth, down, 16)
    y = nibble.scaled_mm_svdquant_w4a4(q, pack_nibbles(w), asc, wscales, la, up)[:m]
    ref, bound = scaled_mm_ref(q, pack_nibbles(w), asc, wscales, la, up, None, False)
    u = UNIT_ROUNDOFF[BF16]
    assert_within(y, ref[:m], u * (np.abs(ref[:m]) + bound[:m]) + gamma(2 * 3 + 3 * r + 4) * bound[:m],
                  "quantize → scaled_mm")


@pytest.mark.parametrize("bad", ["act_dtype", "ascales_shape", "wscales_shape", "lora_rank",
                                 "bias_shape", "act_1d"])
def test_scaled_mm_errors(bad, rng):
    a, w, asc, ws, la, up, b = make_mm(rng, 8, 16, 128, 16, BF16, BF16, False, True)
    if bad == "act_dtype":
        a = a.astype(np.float32)
    elif bad == "ascales_shape":
        asc = asc[:, :4].copy()
    elif bad == "wscales_shape":
        ws = ws[:1].copy()
    elif bad == "lora_rank":
        la = la[:, :8].copy()
    elif bad == "bias_shape":
        b = b[:3].copy()
    elif bad == "act_1d":
        a = a.reshape(-1)
    with pytest.raises(ValueError):
        nibble.scaled_mm_svdquant_w4a4(a, w, asc, ws, la, up, b)


# ---------------------------------------------------------------- runtime settings
def test_isa_roundtrip():
    before = nibble.isa()
    for name in nibble.supported_isas():
        nibble.set_isa(name)
        assert nibble.isa() == name
    nibble.set_isa("auto")
    assert nibble.isa() == nibble.supported_isas()[-1]
    nibble.set_isa(before)
    with pytest.raises(ValueError):
        nibble.set_isa("avx9000")
