// import_layers.cpp — one layer at a time: AutoAWQ GEMM, nunchaku AWQ W4A16 and nunchaku SVDQuant
// INT4 storage → kitchen-native typed params (nibble/import.h). Pure index maps: every code, scale
// and factor is moved, never recomputed; the only arithmetic is the AWQ zero re-expression
// z′ = (8 − z)·s resp. wzeros + 8·s and the −1 of nunchaku's folded modulation scale, each done
// in double and rounded once to the stored dtype. The maps are in ../shared/spec/FORMATS.md §9 and
// docs/import.md (verified against the real packers by tests/data/import_* fixtures).
#include <algorithm>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "nibble/import.h"
#include "nibble/thread_pool.h"

namespace nibble {

void ZeroRounding::merge(const ZeroRounding& o) {
  total += o.total;
  rounded += o.rounded;
  max_abs = std::max(max_abs, o.max_abs);
  max_rel_scale = std::max(max_rel_scale, o.max_rel_scale);
}

namespace {

float load_f(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::F32: return t.data<float>()[i];
    case DType::F16: return f16_to_f32(t.data<uint16_t>()[i]);
    case DType::BF16: return bf16_to_f32(t.data<uint16_t>()[i]);
    default: throw Error("internal: load_f on a non-float tensor");
  }
}
uint16_t enc16(DType d, double v) { return d == DType::F16 ? f32_to_f16(float(v)) : f32_to_bf16(float(v)); }
float dec16(DType d, uint16_t h) { return d == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h); }

void need(bool ok, const std::string& msg) {
  if (!ok) throw Error(msg);
}
void need_dtype(const Tensor& t, std::initializer_list<DType> ok, const std::string& what) {
  need(t.defined(), fmt::format("{}: missing", what));
  check_dtype(t, ok, what);
}
void need_dim(const Tensor& t, int64_t d, const std::string& what) {
  need(t.dim() == d, fmt::format("{}: expected a {}-D tensor, got shape {}", what, d, shape_str(t.shape())));
}

// Stores `v` in a 16-bit dtype, recording how far the stored value moved from the exact one.
uint16_t store_zero(DType d, double exact, double scale, ZeroRounding& zr) {
  const uint16_t h = enc16(d, exact);
  const double err = std::fabs(double(dec16(d, h)) - exact);
  ++zr.total;
  if (err != 0) {
    ++zr.rounded;
    zr.max_abs = std::max(zr.max_abs, err);
    if (scale != 0) zr.max_rel_scale = std::max(zr.max_rel_scale, err / std::fabs(scale));
  }
  return h;
}

// Interleave permutation of nunchaku's 1-D vectors (bias, smooth) and wscales columns inside a
// block of 128: stored index of logical i (spec §9.1).
inline int64_t vec_stored_index(int64_t i) {
  const int64_t t = i / 128, r = i % 128, a = r / 16, b = (r / 8) % 2, c = (r / 2) % 4, d = r % 2;
  return 128 * t + 16 * a + 4 * c + 2 * b + d;
}

}  // namespace

// ============================================================================ AutoAWQ GEMM
AwqW4A16Params import_autoawq_gemm(const Tensor& qweight, const Tensor& qzeros, const Tensor& scales,
                                   const Tensor& bias, int64_t out_group_size, DType sd, ZeroRounding* rounding,
                                   const std::string& what) {
  need(sd == DType::F16 || sd == DType::BF16, fmt::format("{}: scale dtype must be F16 or BF16", what));
  need_dtype(qweight, {DType::I32, DType::U32}, what + ".qweight");
  need_dtype(qzeros, {DType::I32, DType::U32}, what + ".qzeros");
  need_dtype(scales, {DType::F16, DType::BF16, DType::F32}, what + ".scales");
  need_dim(qweight, 2, what + ".qweight");
  need_dim(qzeros, 2, what + ".qzeros");
  need_dim(scales, 2, what + ".scales");
  const int64_t K = qweight.size(0), N = qweight.size(1) * 8, NG = scales.size(0);
  need(scales.size(1) == N,
       fmt::format("{}: scales {} do not match qweight {} of AutoAWQ's GEMM packing (qweight (K, N/8), scales (K/G, N)); "
                   "GEMV / GEMVFast packings are not supported",
                   what, shape_str(scales.shape()), shape_str(qweight.shape())));
  need(NG > 0 && K % NG == 0, fmt::format("{}: {} scale rows do not divide K = {}", what, NG, K));
  need(qzeros.size(0) == NG && qzeros.size(1) * 8 == N,
       fmt::format("{}.qzeros: expected ({}, {}), got {}", what, NG, N / 8, shape_str(qzeros.shape())));
  const int64_t G = K / NG;
  int64_t Go = out_group_size ? out_group_size : (G % 64 == 0 ? 64 : G);
  need(Go > 0 && Go % 2 == 0 && G % Go == 0,
       fmt::format("{}: output group size {} must be even and divide the source group size {}", what, Go, G));
  if (bias.defined()) {
    need_dtype(bias, {DType::F16, DType::BF16, DType::F32}, what + ".bias");
    need(bias.numel() == N, fmt::format("{}.bias: expected ({}), got {}", what, N, shape_str(bias.shape())));
  }
  static constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // nibble i of a word holds column 8c + kOrder[i]
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qweight.raw());
  const uint32_t* qz = reinterpret_cast<const uint32_t*>(qzeros.raw());
  AwqW4A16Params p;
  p.N = N;
  p.K = K;
  p.group_size = Go;
  p.qweight = Tensor::empty(DType::I8, {N, K / 2});
  uint8_t* out = reinterpret_cast<uint8_t*>(p.qweight.mutable_raw());
  for (int64_t k = 0; k < K; k += 2)
    for (int64_t c = 0; c < N / 8; ++c) {
      const uint32_t w0 = qw[k * (N / 8) + c], w1 = qw[(k + 1) * (N / 8) + c];
      for (int i = 0; i < 8; ++i) {
        const int64_t n = 8 * c + kOrder[i];
        out[n * (K / 2) + k / 2] = pack_nibbles(int((w0 >> (4 * i)) & 0xF), int((w1 >> (4 * i)) & 0xF));
      }
    }
  const int64_t NGo = K / Go, rep = G / Go;
  p.wscales = Tensor::empty(sd, {NGo, N});
  p.wzeros = Tensor::empty(sd, {NGo, N});
  uint16_t* ps = p.wscales.mutable_data<uint16_t>();
  uint16_t* pz = p.wzeros.mutable_data<uint16_t>();
  ZeroRounding zr;
  for (int64_t g = 0; g < NG; ++g)
    for (int64_t c = 0; c < N / 8; ++c) {
      const uint32_t wz = qz[g * (N / 8) + c];
      for (int i = 0; i < 8; ++i) {
        const int64_t n = 8 * c + kOrder[i];
        const int z = int((wz >> (4 * i)) & 0xF);
        const float s = load_f(scales, g * N + n);
        const uint16_t hs = enc16(sd, s);
        const double s_stored = dec16(sd, hs);
        const uint16_t hz = store_zero(sd, double(8 - z) * s_stored, s_stored, zr);
        for (int64_t r = 0; r < rep; ++r) {
          ps[(g * rep + r) * N + n] = hs;
          pz[(g * rep + r) * N + n] = hz;
        }
      }
    }
  if (bias.defined()) {
    p.bias = Tensor::empty(sd, {N});
    for (int64_t n = 0; n < N; ++n) p.bias.mutable_data<uint16_t>()[n] = enc16(sd, load_f(bias, n));
  }
  if (rounding) rounding->merge(zr);
  return p;
}

// ============================================================================ nunchaku AWQ W4A16
AwqW4A16Params import_nunchaku_awq(const Tensor& qweight, const Tensor& wscales, const Tensor& wzeros,
                                   const Tensor& bias, int S, bool minus_one, ZeroRounding* rounding,
                                   const std::string& what) {
  need_dtype(qweight, {DType::I32, DType::I16, DType::I8, DType::U8}, what + ".qweight");
  need_dtype(wscales, {DType::F16, DType::BF16}, what + ".wscales");
  need_dtype(wzeros, {wscales.dtype()}, what + ".wzeros");
  need_dim(qweight, 2, what + ".qweight");
  need_dim(wscales, 2, what + ".wscales");
  need_dim(wzeros, 2, what + ".wzeros");
  // int32 (N/4, K/2) ≡ int16 (N/4, K) ≡ bytes (N/4, 2K).
  const int64_t row_bytes = qweight.size(1) * int64_t(dtype_size(qweight.dtype()));
  const int64_t N = qweight.size(0) * 4, K = row_bytes / 2;
  constexpr int64_t G = 64;
  need(K > 0 && K % G == 0, fmt::format("{}.qweight {}: K = {} is not a multiple of 64 (nunchaku AWQ W4A16 is G = 64)",
                                        what, shape_str(qweight.shape()), K));
  const int64_t NG = K / G;
  need(wscales.size(1) == N && wscales.size(0) >= NG,
       fmt::format("{}.wscales: expected (≥{}, {}) for qweight {}, got {}", what, NG, N, shape_str(qweight.shape()),
                   shape_str(wscales.shape())));
  need(wzeros.shape() == wscales.shape(),
       fmt::format("{}.wzeros: expected {}, got {}", what, shape_str(wscales.shape()), shape_str(wzeros.shape())));
  for (int64_t g = NG; g < wscales.size(0); ++g)
    for (int64_t n = 0; n < N; ++n)
      if (load_f(wscales, g * N + n) != 0 || load_f(wzeros, g * N + n) != 0)
        throw Error(fmt::format("{}: padding group row {} of wscales/wzeros is not zero (K = {} has {} groups)", what, g, K, NG));
  need(S >= 1 && N % S == 0, fmt::format("{}: {} outputs do not split into {} chunks", what, N, S));
  if (bias.defined()) {
    need_dtype(bias, {DType::F16, DType::BF16, DType::F32}, what + ".bias");
    need(bias.numel() == N, fmt::format("{}.bias: expected ({}), got {}", what, N, shape_str(bias.shape())));
  }
  const int64_t D = N / S;
  auto kitchen_row = [&](int64_t o) { return S == 1 ? o : (o % S) * D + o / S; };  // stored o = S·d + c
  AwqW4A16Params p;
  p.N = N;
  p.K = K;
  p.group_size = G;
  p.qweight = Tensor::empty(DType::I8, {N, K / 2});
  uint8_t* out = reinterpret_cast<uint8_t*>(p.qweight.mutable_raw());
  const uint8_t* src = reinterpret_cast<const uint8_t*>(qweight.raw());
  // int16 [N/4][K/64][4 r][16 j], nibble t of int16 j is q[4·n4 + r, 64·kc + 32·(j/8) + j%8 + 8t].
  std::vector<uint8_t> codes(static_cast<size_t>(K));
  for (int64_t n4 = 0; n4 < N / 4; ++n4)
    for (int r = 0; r < 4; ++r) {
      for (int64_t kc = 0; kc < K / 64; ++kc)
        for (int j = 0; j < 16; ++j) {
          const uint8_t* h = src + ((n4 * (K / 64) + kc) * 64 + r * 16 + j) * 2;
          const uint16_t v = uint16_t(h[0] | (h[1] << 8));
          for (int t = 0; t < 4; ++t) codes[size_t(64 * kc + 32 * (j / 8) + j % 8 + 8 * t)] = uint8_t((v >> (4 * t)) & 0xF);
        }
      const int64_t n = kitchen_row(4 * n4 + r);
      for (int64_t k = 0; k < K; k += 2) out[n * (K / 2) + k / 2] = pack_nibbles(codes[size_t(k)], codes[size_t(k + 1)]);
    }
  const DType sd = wscales.dtype();
  p.wscales = Tensor::empty(sd, {NG, N});
  p.wzeros = Tensor::empty(sd, {NG, N});
  ZeroRounding zr;
  for (int64_t g = 0; g < NG; ++g)
    for (int64_t o = 0; o < N; ++o) {
      const int64_t n = kitchen_row(o);
      const uint16_t hs = wscales.data<uint16_t>()[g * N + o];
      const double s = dec16(sd, hs);
      p.wscales.mutable_data<uint16_t>()[g * N + n] = hs;
      p.wzeros.mutable_data<uint16_t>()[g * N + n] = store_zero(sd, double(load_f(wzeros, g * N + o)) + 8.0 * s, s, zr);
    }
  if (bias.defined()) {
    const DType bd = bias.dtype() == DType::F32 ? sd : bias.dtype();
    p.bias = Tensor::empty(bd, {N});
    for (int64_t o = 0; o < N; ++o) {
      const int64_t c = o % S;
      double b = load_f(bias, o);
      if (minus_one && S > 1 && (c == 1 || c == S - 2)) b -= 1.0;
      p.bias.mutable_data<uint16_t>()[kitchen_row(o)] = enc16(bd, b);
    }
  }
  if (rounding) rounding->merge(zr);
  return p;
}

// ============================================================================ nunchaku SVDQuant INT4
std::vector<SvdquantW4A4Params> import_nunchaku_w4a4(const NunchakuW4A4Source& s, int64_t N, int64_t K,
                                                     const std::vector<int64_t>& splits_in, int64_t rank,
                                                     bool act_unsigned, const std::string& what) {
  need_dtype(s.qweight, {DType::I8, DType::U8}, what + ".qweight");
  need_dtype(s.wscales, {DType::F16, DType::BF16}, what + ".wscales");
  const DType dt = s.wscales.dtype();
  for (auto [t, nm] : {std::pair{&s.smooth, "smooth_factor"}, {&s.proj_down, "proj_down"}, {&s.proj_up, "proj_up"}})
    need_dtype(*t, {dt}, fmt::format("{}.{} (must share wscales' dtype {})", what, nm, dtype_name(dt)));
  need_dim(s.qweight, 2, what + ".qweight");
  need_dim(s.wscales, 2, what + ".wscales");
  need_dim(s.proj_down, 2, what + ".proj_down");
  need_dim(s.proj_up, 2, what + ".proj_up");
  const int64_t Np = s.qweight.size(0), Kp = s.qweight.size(1) * 2;
  if (!N) N = Np;
  if (!K) K = Kp;
  need(Np % 128 == 0 && Kp % 128 == 0,
       fmt::format("{}.qweight {}: nunchaku packs (N, K) padded to multiples of 128", what, shape_str(s.qweight.shape())));
  need(N <= Np && Np - N < 128 && K <= Kp && Kp - K < 128 && K % 64 == 0,
       fmt::format("{}: logical size {}x{} does not fit the stored {}x{} (padding is < 128; K % 64 == 0)", what, N, K, Np,
                   Kp));
  const int64_t NG = K / 64, Gs = s.wscales.size(0);
  need(s.wscales.size(1) == Np && Gs >= NG && Gs * 64 <= Kp,
       fmt::format("{}.wscales: expected ({}..{}, {}), got {}", what, NG, Kp / 64, Np, shape_str(s.wscales.shape())));
  need(s.smooth.numel() == Kp, fmt::format("{}.smooth_factor: expected ({}), got {}", what, Kp, shape_str(s.smooth.shape())));
  const int64_t Rp = s.proj_down.size(1);
  need(s.proj_down.size(0) == Kp && Rp % 16 == 0,
       fmt::format("{}.proj_down: expected ({}, R) with R % 16 == 0, got {}", what, Kp, shape_str(s.proj_down.shape())));
  need(s.proj_up.size(0) == Np && s.proj_up.size(1) == Rp,
       fmt::format("{}.proj_up: expected ({}, {}), got {}", what, Np, Rp, shape_str(s.proj_up.shape())));
  if (s.bias.defined()) {
    need_dtype(s.bias, {DType::F16, DType::BF16, DType::F32}, what + ".bias");
    need(s.bias.numel() == Np, fmt::format("{}.bias: expected ({}), got {}", what, Np, shape_str(s.bias.shape())));
  }
  std::vector<int64_t> splits = splits_in.empty() ? std::vector<int64_t>{N} : splits_in;
  int64_t sum = 0;
  for (int64_t v : splits) sum += v;
  need(sum == N, fmt::format("{}: split sizes sum to {}, expected N = {}", what, sum, N));

  // Codes: little-endian int32 words [Np/128][Kp/64][8 np][8 nl][4 kl][2 nps][2 kps], nibble j is
  // W[128·nt + 16·np + 8·nps + nl, 64·kt + 32·kps + 8·kl + j].
  const int64_t KT = Kp / 64;
  std::vector<uint8_t> codes(size_t(N * K));  // raw nibbles, row-major (N, K)
  const uint8_t* qb = reinterpret_cast<const uint8_t*>(s.qweight.raw());
  for (int64_t w = 0; w < Np * Kp / 8; ++w) {
    int64_t x = w;
    const int64_t kps = x % 2; x /= 2;
    const int64_t nps = x % 2; x /= 2;
    const int64_t kl = x % 4; x /= 4;
    const int64_t nl = x % 8; x /= 8;
    const int64_t np = x % 8; x /= 8;
    const int64_t kt = x % KT, nt = x / KT;
    const int64_t n = 128 * nt + 16 * np + 8 * nps + nl;
    const int64_t k0 = 64 * kt + 32 * kps + 8 * kl;
    const uint8_t* b = qb + w * 4;
    const uint32_t v = uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16 | uint32_t(b[3]) << 24;
    for (int j = 0; j < 8; ++j) {
      const int nib = int((v >> (4 * j)) & 0xF);
      if (n < N && k0 + j < K) codes[size_t(n * K + k0 + j)] = uint8_t(nib);
      else if (nib != 0)  // (not need(): the message would be formatted for every padding code)
        throw Error(fmt::format("{}.qweight: padding code at ({}, {}) is {}, expected 0 (wrong logical size?)", what, n,
                                k0 + j, nib));
    }
  }
  // Low-rank: find the last rank column that is non-zero in proj_down or proj_up (pad columns are 0).
  auto lr_up = [&](int64_t n, int64_t r) {  // proj_up (Np, Rp) stored [Np/16][Rp/16][8 nl][4 kl][2 nps][2 kps][2 rk]
    const int64_t cp = n / 16, nps = (n % 16) / 8, nl = n % 8, rp = r / 16, kps = (r % 16) / 8, kl = (r % 8) / 2, rk = r % 2;
    return ((((((cp * (Rp / 16) + rp) * 8 + nl) * 4 + kl) * 2 + nps) * 2 + kps) * 2 + rk);
  };
  auto lr_down = [&](int64_t k, int64_t r) {  // proj_down (Kp, Rp): r in the n-role, k in the k-role
    const int64_t cp = k / 16, kps = (k % 16) / 8, kl = (k % 8) / 2, rk = k % 2, rp = r / 16, nps = (r % 16) / 8, nl = r % 8;
    return ((((((cp * (Rp / 16) + rp) * 8 + nl) * 4 + kl) * 2 + nps) * 2 + kps) * 2 + rk);
  };
  const uint16_t* up = s.proj_up.data<uint16_t>();
  const uint16_t* down = s.proj_down.data<uint16_t>();
  int64_t R = rank;
  if (R <= 0) {
    R = 0;
    for (int64_t r = 0; r < Rp; ++r) {
      bool nz = false;
      for (int64_t n = 0; n < N && !nz; ++n) nz = (up[lr_up(n, r)] & 0x7fff) != 0;
      for (int64_t k = 0; k < K && !nz; ++k) nz = (down[lr_down(k, r)] & 0x7fff) != 0;
      if (nz) R = r + 1;
    }
  }
  need(R <= Rp, fmt::format("{}: rank {} exceeds the stored rank {}", what, R, Rp));

  SvdquantW4A4Params shared;
  shared.smooth = Tensor::empty(dt, {K});
  for (int64_t k = 0; k < K; ++k) shared.smooth.mutable_data<uint16_t>()[k] = s.smooth.data<uint16_t>()[vec_stored_index(k)];
  shared.proj_down = Tensor::empty(dt, {K, R});
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) shared.proj_down.mutable_data<uint16_t>()[k * R + r] = down[lr_down(k, r)];

  std::vector<SvdquantW4A4Params> outs;
  int64_t n0 = 0;
  for (int64_t Nm : splits) {
    SvdquantW4A4Params p;
    p.N = Nm;
    p.K = K;
    p.R = R;
    p.act_unsigned = act_unsigned;
    p.smooth = shared.smooth;
    p.proj_down = shared.proj_down;
    p.qweight = Tensor::empty(DType::I8, {Nm, K / 2});
    uint8_t* q = reinterpret_cast<uint8_t*>(p.qweight.mutable_raw());
    for (int64_t n = 0; n < Nm; ++n)
      for (int64_t k = 0; k < K; k += 2)
        q[n * (K / 2) + k / 2] = pack_nibbles(codes[size_t((n0 + n) * K + k)], codes[size_t((n0 + n) * K + k + 1)]);
    // wscales (Gs, Np) flat [Np/128][Gs][a 8][c 4][b 2][d 2], n = 128·nt + 16a + 8b + 2c + d.
    p.wscales = Tensor::empty(dt, {NG, Nm});
    for (int64_t g = 0; g < NG; ++g)
      for (int64_t n = 0; n < Nm; ++n) {
        const int64_t gn = n0 + n, nt = gn / 128, r = gn % 128;
        const int64_t a = r / 16, b = (r / 8) % 2, c = (r / 2) % 4, d = r % 2;
        p.wscales.mutable_data<uint16_t>()[g * Nm + n] =
            s.wscales.data<uint16_t>()[(((nt * Gs + g) * 8 + a) * 4 + c) * 4 + b * 2 + d];
      }
    p.proj_up = Tensor::empty(dt, {Nm, R});
    for (int64_t n = 0; n < Nm; ++n)
      for (int64_t r = 0; r < R; ++r) p.proj_up.mutable_data<uint16_t>()[n * R + r] = up[lr_up(n0 + n, r)];
    if (s.bias.defined()) {
      p.bias = Tensor::empty(s.bias.dtype(), {Nm});
      const size_t es = dtype_size(s.bias.dtype());
      for (int64_t n = 0; n < Nm; ++n)
        std::memcpy(static_cast<uint8_t*>(p.bias.mutable_raw()) + n * es,
                    static_cast<const uint8_t*>(s.bias.raw()) + vec_stored_index(n0 + n) * es, es);
    }
    validate(p, what);
    outs.push_back(std::move(p));
    n0 += Nm;
  }
  return outs;
}

// ============================================================================ FLUX single-block fusions
namespace {

// Natural-layout svdquant params only (what import_nunchaku_w4a4 returns).
void need_natural(const SvdquantW4A4Params& p, const std::string& what) {
  need(!p.tile_packed && !p.proj_up_tile, fmt::format("{}: expected natural-layout svdquant params", what));
  validate(p, what);
}
int nibble_at(const uint8_t* row, int64_t k) { return k % 2 ? unpack_hi_signed(row[k / 2]) : unpack_lo_signed(row[k / 2]); }
double inv_smooth(const Tensor& sm, int64_t k) {
  const double v = load_f(sm, k);
  return std::fabs(v) > 1e-10 ? 1.0 / double(float(v)) : 0.0;  // the kitchen's guard (spec §3.3)
}

}  // namespace

double svdquant_unsigned_shift_term(const SvdquantW4A4Params& p, int64_t n) {
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight.raw()) + n * (p.K / 2);
  double acc = 0;
  for (int64_t k = 0; k < p.K; ++k)
    acc += double(nibble_at(q, k)) * double(load_f(p.wscales, (k / 64) * p.N + n)) * inv_smooth(p.smooth, k);
  return double(kSvdquantUnsignedShift) * acc;
}

SvdquantW4A4Params concat_svdquant_rows(const std::vector<SvdquantW4A4Params>& parts, const std::string& what) {
  need(!parts.empty(), fmt::format("{}: nothing to concatenate", what));
  const SvdquantW4A4Params& f = parts.front();
  const DType dt = f.wscales.dtype();
  int64_t N = 0, R = 0;
  bool any_bias = false;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    const std::string wi = fmt::format("{} (part {})", what, i);
    need_natural(p, wi);
    need(p.K == f.K, fmt::format("{}: input sizes differ ({} vs {}): rows can only be stacked for one input", wi, p.K, f.K));
    need(p.act_unsigned == f.act_unsigned, fmt::format("{}: parts differ in act_unsigned", wi));
    need(p.wscales.dtype() == dt && p.smooth.dtype() == dt && p.proj_down.dtype() == dt && p.proj_up.dtype() == dt,
         fmt::format("{}: parts differ in dtype", wi));
    need(p.smooth.nbytes() == f.smooth.nbytes() && std::memcmp(p.smooth.raw(), f.smooth.raw(), p.smooth.nbytes()) == 0,
         fmt::format("{}: the parts' smooth_factor differ; one layer has one smoothing vector, so the rows cannot be "
                     "stacked exactly",
                     wi));
    N += p.N;
    R += p.R;
    any_bias = any_bias || p.bias.defined();
  }
  const int64_t K = f.K;
  SvdquantW4A4Params o;
  o.N = N;
  o.K = K;
  o.R = R;
  o.act_unsigned = f.act_unsigned;
  o.smooth = f.smooth;
  o.qweight = Tensor::empty(DType::I8, {N, K / 2});
  o.wscales = Tensor::empty(dt, {K / 64, N});
  o.proj_down = Tensor::zeros(dt, {K, R});
  o.proj_up = Tensor::zeros(dt, {N, R});
  DType bd = dt;
  for (const auto& p : parts)
    if (p.bias.defined()) { bd = p.bias.dtype(); break; }
  if (any_bias) o.bias = Tensor::zeros(bd, {N});
  int64_t n0 = 0, r0 = 0;
  for (const auto& p : parts) {
    std::memcpy(static_cast<uint8_t*>(o.qweight.mutable_raw()) + n0 * (K / 2), p.qweight.raw(), size_t(p.N * K / 2));
    for (int64_t g = 0; g < K / 64; ++g)
      std::memcpy(o.wscales.mutable_data<uint16_t>() + g * N + n0, p.wscales.data<uint16_t>() + g * p.N, size_t(p.N) * 2);
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(o.proj_down.mutable_data<uint16_t>() + k * R + r0, p.proj_down.data<uint16_t>() + k * p.R, size_t(p.R) * 2);
    for (int64_t n = 0; n < p.N; ++n)
      std::memcpy(o.proj_up.mutable_data<uint16_t>() + (n0 + n) * R + r0, p.proj_up.data<uint16_t>() + n * p.R,
                  size_t(p.R) * 2);
    if (p.bias.defined()) {
      if (p.bias.dtype() == bd) {
        std::memcpy(static_cast<uint8_t*>(o.bias.mutable_raw()) + n0 * dtype_size(bd), p.bias.raw(), p.bias.nbytes());
      } else {
        for (int64_t n = 0; n < p.N; ++n) {
          const double v = load_f(p.bias, n);
          if (bd == DType::F32) o.bias.mutable_data<float>()[n0 + n] = float(v);
          else o.bias.mutable_data<uint16_t>()[n0 + n] = enc16(bd, v);
        }
      }
    }
    n0 += p.N;
    r0 += p.R;
  }
  validate(o, what);
  return o;
}

namespace {
struct KConcatPlan {
  int64_t N = 0, K = 0, R = 0;
  DType dt = DType::BF16, bd = DType::BF16;
};
KConcatPlan plan_k_concat(const std::vector<SvdquantW4A4Params>& parts, const std::string& what) {
  need(!parts.empty(), fmt::format("{}: nothing to concatenate", what));
  KConcatPlan pl;
  pl.N = parts.front().N;
  pl.dt = parts.front().wscales.dtype();
  pl.bd = pl.dt;
  bool bias_seen = false;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    const std::string wi = fmt::format("{} (part {})", what, i);
    need_natural(p, wi);
    need(p.N == pl.N, fmt::format("{}: output sizes differ ({} vs {}): inputs can only be joined for one output", wi, p.N, pl.N));
    need(p.K % 64 == 0, fmt::format("{}: K = {} is not a multiple of 64 (groups would straddle the parts)", wi, p.K));
    need(p.wscales.dtype() == pl.dt && p.smooth.dtype() == pl.dt && p.proj_down.dtype() == pl.dt &&
             p.proj_up.dtype() == pl.dt,
         fmt::format("{}: parts differ in dtype", wi));
    if (p.bias.defined() && !bias_seen) {
      pl.bd = p.bias.dtype();
      bias_seen = true;
    }
    pl.K += p.K;
    pl.R += p.R;
  }
  return pl;
}
// Σ of the parts' biases plus each act_unsigned part's shift term, in double.
std::vector<double> folded_bias(const std::vector<SvdquantW4A4Params>& parts, int64_t N) {
  std::vector<double> b(size_t(N), 0.0);
  for (const auto& p : parts) {
    if (p.bias.defined())
      for (int64_t n = 0; n < N; ++n) b[size_t(n)] += load_f(p.bias, n);
    if (p.act_unsigned)
      parallel_for_range(N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) b[size_t(n)] += svdquant_unsigned_shift_term(p, n);
      });
  }
  return b;
}
Tensor store_vector(const std::vector<double>& v, DType d) {
  Tensor t = Tensor::empty(d, {int64_t(v.size())});
  for (size_t i = 0; i < v.size(); ++i) {
    if (d == DType::F32) t.mutable_data<float>()[i] = float(v[i]);
    else t.mutable_data<uint16_t>()[i] = enc16(d, v[i]);
  }
  return t;
}
}  // namespace

SvdquantW4A4Params concat_svdquant_k(const std::vector<SvdquantW4A4Params>& parts, const std::string& what) {
  const KConcatPlan pl = plan_k_concat(parts, what);
  const int64_t N = pl.N, K = pl.K, R = pl.R;
  SvdquantW4A4Params o;
  o.N = N;
  o.K = K;
  o.R = R;
  o.act_unsigned = false;  // one activation grid for the whole input: the signed one
  o.qweight = Tensor::empty(DType::I8, {N, K / 2});
  o.wscales = Tensor::empty(pl.dt, {K / 64, N});
  o.smooth = Tensor::empty(pl.dt, {K});
  o.proj_down = Tensor::zeros(pl.dt, {K, R});
  o.proj_up = Tensor::empty(pl.dt, {N, R});
  int64_t k0 = 0, r0 = 0;
  for (const auto& p : parts) {
    for (int64_t n = 0; n < N; ++n)
      std::memcpy(static_cast<uint8_t*>(o.qweight.mutable_raw()) + n * (K / 2) + k0 / 2,
                  static_cast<const uint8_t*>(p.qweight.raw()) + n * (p.K / 2), size_t(p.K / 2));
    std::memcpy(o.wscales.mutable_data<uint16_t>() + (k0 / 64) * N, p.wscales.raw(), p.wscales.nbytes());
    std::memcpy(o.smooth.mutable_data<uint16_t>() + k0, p.smooth.raw(), p.smooth.nbytes());
    for (int64_t k = 0; k < p.K; ++k)
      std::memcpy(o.proj_down.mutable_data<uint16_t>() + (k0 + k) * R + r0, p.proj_down.data<uint16_t>() + k * p.R,
                  size_t(p.R) * 2);
    for (int64_t n = 0; n < N; ++n)
      std::memcpy(o.proj_up.mutable_data<uint16_t>() + n * R + r0, p.proj_up.data<uint16_t>() + n * p.R, size_t(p.R) * 2);
    k0 += p.K;
    r0 += p.R;
  }
  bool any_bias = false;
  for (const auto& p : parts) any_bias = any_bias || p.bias.defined() || p.act_unsigned;
  if (any_bias) o.bias = store_vector(folded_bias(parts, N), pl.bd);
  validate(o, what);
  return o;
}

std::pair<Tensor, Tensor> dense_svdquant_k(const std::vector<SvdquantW4A4Params>& parts, DType dtype,
                                           const std::string& what) {
  need(dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F32,
       fmt::format("{}: dense dtype must be bf16, f16 or f32", what));
  const KConcatPlan pl = plan_k_concat(parts, what);
  const int64_t N = pl.N, K = pl.K;
  Tensor w = Tensor::empty(dtype, {N, K});
  int64_t k0 = 0;
  for (const auto& p : parts) {
    std::vector<double> inv(size_t(p.K));
    for (int64_t k = 0; k < p.K; ++k) inv[size_t(k)] = inv_smooth(p.smooth, k);
    std::vector<double> down(size_t(p.K * p.R));
    for (int64_t i = 0; i < p.K * p.R; ++i) down[size_t(i)] = load_f(p.proj_down, i);
    parallel_for_range(N, 8, [&](int64_t n0, int64_t n1) {
      std::vector<double> up(size_t(p.R));
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight.raw()) + n * (p.K / 2);
        for (int64_t r = 0; r < p.R; ++r) up[size_t(r)] = load_f(p.proj_up, n * p.R + r);
        for (int64_t k = 0; k < p.K; ++k) {
          double v = double(nibble_at(q, k)) * double(load_f(p.wscales, (k / 64) * N + n)) * inv[size_t(k)];
          const double* dk = down.data() + k * p.R;
          for (int64_t r = 0; r < p.R; ++r) v += up[size_t(r)] * dk[r];
          const int64_t o = n * K + k0 + k;
          if (dtype == DType::F32) w.mutable_data<float>()[o] = float(v);
          else w.mutable_data<uint16_t>()[o] = enc16(dtype, v);
        }
      }
    });
    k0 += p.K;
  }
  bool any_bias = false;
  for (const auto& p : parts) any_bias = any_bias || p.bias.defined() || p.act_unsigned;
  Tensor b = any_bias ? store_vector(folded_bias(parts, N), dtype) : Tensor();
  return {w, b};
}

}  // namespace nibble
