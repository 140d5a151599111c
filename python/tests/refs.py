"""numpy implementations of the three kitchen ops, written from FORMATS.md (not from nibble).

Everything is computed in float64 from the exact (upcast) input values, except where the spec
prescribes fp32 arithmetic (the activation quantizer, §3.3), which is replayed in float32 step by
step. Each reference also returns the magnitude bound the tolerance derivation needs.
"""
import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

# Unit roundoff (half an ulp at 1) of each output dtype.
UNIT_ROUNDOFF = {BF16: 2.0**-8, F16: 2.0**-11, F32: 2.0**-24}
U32 = 2.0**-24


def gamma(n):
    """Higham's γ_n = n·u/(1−n·u) for fp32: bound of the relative error of an n-term sum."""
    return n * U32 / (1 - n * U32)


def f64(a):
    return np.asarray(a).astype(np.float64)


# ---------------------------------------------------------------- nibble packing (spec §1)
def pack_nibbles(codes):
    """(..., K) ints in −8..15 → (..., K/2) int8; low nibble = even column."""
    c = np.asarray(codes).astype(np.int64) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8).view(np.int8)


def unpack_signed(packed):
    b = np.asarray(packed).view(np.uint8).astype(np.int64)
    lo, hi = b & 0xF, b >> 4
    out = np.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], -1)
    return np.where(out < 8, out, out - 16)


def unpack_unsigned(packed):
    b = np.asarray(packed).view(np.uint8).astype(np.int64)
    return np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)


# ---------------------------------------------------------------- awq_w4a16 (spec §2)
def awq_ref(x, qweight, wscales, wzeros, bias, group_size):
    """Returns (y float64 (..., N), bound (..., N)): Σ_k |x_k|·(|s|·|q−8| + |z|) + |bias|."""
    xs = f64(x)
    x2 = xs.reshape(-1, xs.shape[-1])
    q = unpack_unsigned(qweight) - 8                       # (N, K)
    s = np.repeat(f64(wscales).T, group_size, axis=1)      # (N, K)
    z = np.repeat(f64(wzeros).T, group_size, axis=1)
    w = q * s + z
    y = x2 @ w.T
    bound = np.abs(x2) @ (np.abs(q * s) + np.abs(z)).T
    if bias is not None:
        y = y + f64(bias)
        bound = bound + np.abs(f64(bias))
    n = qweight.shape[0]
    return y.reshape(*xs.shape[:-1], n), bound.reshape(*xs.shape[:-1], n)


# ---------------------------------------------------------------- svdquant_w4a4 quantize (spec §3.3)
def quantize_ref(x, smooth, lora_down, pad_size, act_unsigned, lora_x=None):
    """CUDA semantics in float32: returns q codes (M_pad, K) int, ascales_f32 (K/64, M_pad) (the
    fp32 scales before the cast), lora_act float64 (M_pad, R) and its bound."""
    x32 = np.asarray(x).astype(np.float32)
    m, k = x32.shape
    s32 = np.asarray(smooth).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_s = np.where(np.abs(s32) > np.float32(1e-10), np.float32(1) / s32, np.float32(0))
    y = (x32 * inv_s).astype(np.float32)
    g = y.reshape(m, k // 64, 64)
    amax = np.abs(g).max(axis=-1)
    qmax = np.float32(15 if act_unsigned else 7)
    scale = np.maximum((amax / qmax).astype(np.float32), np.float32(1e-10)).astype(np.float32)
    rcp = (np.float32(1) / scale).astype(np.float32)
    q = np.rint((g * rcp[..., None]).astype(np.float32))
    q = np.clip(q, 0, 15) if act_unsigned else np.clip(q, -7, 7)
    q = q.reshape(m, k).astype(np.int64)
    m_pad = -(-m // pad_size) * pad_size
    codes = np.zeros((m_pad, k), np.int64)
    codes[:m] = q
    ascales = np.zeros((k // 64, m_pad), np.float32)
    ascales[:, :m] = scale.T
    src = f64(x if lora_x is None else lora_x)
    d = f64(lora_down)
    la = np.zeros((m_pad, d.shape[1]))
    la_bound = np.zeros_like(la)
    la[:m] = src @ d
    la_bound[:m] = np.abs(src) @ np.abs(d)
    return codes, ascales, la, la_bound


# ---------------------------------------------------------------- svdquant_w4a4 GEMM (spec §3.4)
def scaled_mm_ref(act, wgt, ascales, wscales, lora_act, lora_up, bias, act_unsigned):
    """Natural layout only. Returns (y float64 (M, N), bound (M, N))."""
    a = unpack_unsigned(act) if act_unsigned else unpack_signed(act)   # (M, K)
    w = unpack_signed(wgt)                                              # (N, K)
    m, k = a.shape
    n = w.shape[0]
    groups = k // 64
    d = np.einsum("mgk,ngk->mng", a.reshape(m, groups, 64), w.reshape(n, groups, 64))  # exact
    terms = d * f64(ascales).T[:, None, :] * f64(wscales).T[None, :, :]
    lora = f64(lora_act) @ f64(lora_up).T
    y = terms.sum(axis=-1) + lora
    bound = np.abs(terms).sum(axis=-1) + np.abs(f64(lora_act)) @ np.abs(f64(lora_up)).T
    if bias is not None:
        y = y + f64(bias)
        bound = bound + np.abs(f64(bias))
    return y, bound


# ---------------------------------------------------------------- tile layout (spec §3.2)
def tile_weight(w_nat):
    n, kh = w_nat.shape
    return np.ascontiguousarray(w_nat.reshape(n // 128, 128, kh // 32, 32).transpose(0, 2, 1, 3)
                                .reshape(n // 128, kh // 32, 32, 128))


def tile_wscales(s_nat):
    g, n = s_nat.shape
    return np.ascontiguousarray(s_nat.reshape(g, n // 128, 128).transpose(1, 0, 2))


def tile_proj_up(u_nat):
    n, r = u_nat.shape
    return np.ascontiguousarray(u_nat.reshape(n // 128, 128, r).transpose(0, 2, 1))


def assert_within(actual, ref, tol, what):
    """|actual − ref| ≤ tol elementwise; no NaN passes; the failure names the worst element."""
    a = f64(actual)
    assert a.shape == ref.shape, f"{what}: shape {a.shape} != {ref.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite output"
    err = np.abs(a - ref)
    bad = ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - tol, -np.inf)), err.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.size} elements out of tolerance; "
                             f"worst at {i}: got {a[i]!r}, expected {ref[i]!r} ± {tol[i]!r}")
