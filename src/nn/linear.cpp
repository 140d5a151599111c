// nn::Linear: one checkpoint layer, bound once, forward dispatched on a path fixed at load.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>

#include "kernels/dense_bf16.h"
#include "kernels/linear_f32.h"
#include "nibble/isa.h"
#include "nibble/nn.h"
#include "nibble/ops.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"

namespace nibble::nn {

namespace {
std::mutex g_notice_mutex;
std::function<void(const std::string&)>& notice_handler() {
  static std::function<void(const std::string&)> h = [](const std::string& m) {
    std::fprintf(stderr, "nibble: note: %s\n", m.c_str());
  };
  return h;
}
// One notice per distinct key for the whole process.
void notice_once(const std::string& key, const std::string& msg) {
  std::lock_guard<std::mutex> lock(g_notice_mutex);
  static std::set<std::string> seen;
  if (!seen.insert(key).second) return;
  if (notice_handler()) notice_handler()(msg);
}

std::string with_layer(const std::string& layer, const std::string& what) {
  if (what.find(layer) != std::string::npos) return what;
  return fmt::format("layer '{}': {}", layer, what);
}

// After a load-time repack (AWQ tiled stream, SVDQuant packed weights) the stored tensors are not
// read by the fused path any more: drop their pages of the mapped checkpoint. They stay valid views
// and fault in again from the file if saving, dequantizing or a path without a repack reads them.
void release_stored(const QuantizedLayer& layer) {
  for (const auto& [key, t] : layer.params) release_mapped_pages(t);
  release_mapped_pages(layer.bias);
}

std::string float_name(DType d) {
  switch (d) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    default: return std::string(dtype_name(d));
  }
}
}  // namespace

namespace {
DenseGemmFn g_dense_gemm = nullptr;
constexpr int64_t kStreamRows = 64;  // output rows decoded per task (2 panels)

// Formats whose dequantized rows depend only on the same rows of the stored params (+ scalars):
// the registry's row_separable trait.
bool row_separable(const std::string& format) {
  const FormatInfo* f = find_format(format);
  return f && f->row_separable;
}

struct ScratchF32 {
  float* p = nullptr;
  size_t n = 0;
  void reserve(size_t want) {
    if (want <= n) return;
    std::free(p);
    p = static_cast<float*>(std::aligned_alloc(64, (want * sizeof(float) + 63) / 64 * 64));
    if (!p) throw Error("linear: out of memory (streamed weight block)");
    n = want;
  }
  ~ScratchF32() { std::free(p); }
};
}
void set_dense_gemm(DenseGemmFn fn) { g_dense_gemm = fn; }
DenseGemmFn dense_gemm() { return g_dense_gemm; }

namespace {
// -1: not read yet; then int(DenseMath). Read from NIBBLE_DENSE once, or set by set_dense_math().
std::atomic<int> g_dense_math{-1};
}  // namespace
static DenseMath dense_math_from_env() {
  const char* v = std::getenv("NIBBLE_DENSE");
  if (!v || !*v || std::strcmp(v, "f32") == 0) return DenseMath::F32;
  if (std::strcmp(v, "bf16") == 0) return DenseMath::Bf16;
  throw Error(fmt::format("NIBBLE_DENSE='{}': expected 'f32' (the default) or 'bf16'", v));
}
void set_dense_math(DenseMath m) { g_dense_math.store(int(m)); }
DenseMath dense_math() {
  int v = g_dense_math.load();
  if (v < 0) {
    v = int(dense_math_from_env());
    g_dense_math.store(v);
  }
  return DenseMath(v);
}

void set_notice_handler(std::function<void(const std::string&)> handler) {
  std::lock_guard<std::mutex> lock(g_notice_mutex);
  notice_handler() = std::move(handler);
}

const char* linear_path_name(LinearPath p) {
  switch (p) {
    case LinearPath::Float: return "float";
    case LinearPath::AwqW4A16: return "awq_w4a16 (fused)";
    case LinearPath::SvdquantW4A4: return "svdquant_w4a4 (fused)";
    case LinearPath::Dequantized: return "dequantize + dense fp32 (eager fallback)";
  }
  return "?";
}

struct Linear::Impl {
  std::string name;
  int64_t N = 0, K = 0;
  LinearPath path = LinearPath::Float;
  QuantizedLayer layer;
  std::string format;
  Tensor weight;    // dense paths: stored float weight (view) or dequantized fp32 (owned)
  Tensor bias_f32;  // dense paths: fp32 bias (effective bias for the fallback), may be undefined
  std::shared_ptr<const AwqW4A16Prepared> awq;
  std::shared_ptr<const SvdquantW4A4Prepared> svd;
  // Lazily packed fp32 panels of `weight` (dense paths).
  std::string fallback_notice;  // eager fallback: shown once per format, at the first forward
  mutable std::atomic<bool> noticed{false};
  mutable std::once_flag pack_once, f32_once;
  mutable kernels::linear::PackedF32Weight packed;
  mutable std::once_flag bf16_once;
  mutable kernels::dense_bf16::PackedBf16Weight packed_bf16;  // DenseMath::Bf16 (16-bit / dequantized weights)
  mutable Tensor weight_f32;  // contiguous fp32 copy for an external dense GEMM
  // Streamed dense path: the stored bytes stay as they are (mmap) and blocks of kStreamRows output
  // rows are decoded to fp32 inside the GEMM task that uses them (row-separable formats: fp8, int8 /
  // int4 tensorwise; and float weights when streaming is asked for). `weight`/`packed` stay unset.
  bool streamed = false;
  // Block-swizzled / rotated kitchen formats (nvfp4, mxfp8, convrot, asym_w4a8): decoded once at
  // load and rounded to bf16 (the "at most to bf16"): packed bf16 panels only (`weight`
  // dropped) where the bf16 dense GEMM runs, else a bf16 `weight` on the fp32 kernels.
  bool decoded_bf16 = false;
  // Set only while from_layer() builds the layer: the fp32 weight just decoded, so the bias of an
  // act_unsigned layer does not decode it a second time.
  Tensor pending_weight;

  // The layer restricted to output rows [n0, n1): params whose first dim is N are row-sliced.
  QuantizedLayer rows(int64_t n0, int64_t n1) const {
    QuantizedLayer sub = layer;
    sub.N = n1 - n0;
    for (auto& [k, t] : sub.params)
      if (t.dim() >= 1 && t.size(0) == N && N > 1) t = t.slice_rows(n0, n1);
    sub.bias = Tensor();
    return sub;
  }
  void forward_streamed(const float* x, int64_t M, float* y) const;

  void ensure_packed() const {
    std::call_once(pack_once, [&] { packed = kernels::linear::pack_weight(weight.raw(), weight.dtype(), N, K); });
  }
  void ensure_bf16() const {
    std::call_once(bf16_once, [&] { packed_bf16 = kernels::dense_bf16::pack_weight(weight.raw(), weight.dtype(), N, K); });
  }
  // The bf16 dense GEMM serves this layer: asked for (DenseMath::Bf16), run by the CPU, no external
  // GEMM plugged in, and a weight that is 16-bit as stored or dequantized (fp32 float weights stay fp32).
  bool use_bf16() const {
    return !g_dense_gemm && dense_math() == DenseMath::Bf16 && kernels::dense_bf16::supported() &&
           (path == LinearPath::Dequantized || weight.dtype() == DType::BF16 || weight.dtype() == DType::F16);
  }
  // Decoded-to-bf16 layer packed at load: every call runs the bf16 dense GEMM (any M).
  bool bf16_only() const { return decoded_bf16 && !weight.defined(); }
  void ensure_f32() const {
    std::call_once(f32_once, [&] { weight_f32 = weight.dtype() == DType::F32 ? weight : weight.to(DType::F32); });
  }
};

Linear Linear::from_float(std::string name, const Tensor& weight, const Tensor& bias) {
  QuantizedLayer l;
  l.name = std::move(name);
  if (!weight.defined()) throw Error(fmt::format("layer '{}': weight is undefined", l.name));
  l.params["weight"] = weight;
  l.bias = bias;
  if (weight.dim() == 2) {
    l.N = weight.size(0);
    l.K = weight.size(1);
  }
  return from_layer(l);
}

Linear Linear::from_layer(const QuantizedLayer& layer, bool force_dequantize) {
  auto im = std::make_shared<Impl>();
  im->name = layer.name;
  im->layer = layer;
  try {
    if (!layer.format) {
      const Tensor& w = layer.param("weight");
      check_dtype(w, {DType::F32, DType::BF16, DType::F16}, "float weight");
      if (w.dim() != 2) throw Error(fmt::format("float weight: expected 2-D (N, K), got shape {}", shape_str(w.shape())));
      im->N = w.size(0);
      im->K = w.size(1);
      im->path = LinearPath::Float;
      im->format = float_name(w.dtype());
      im->weight = w;
      if (layer.bias.defined()) {
        check_dtype(layer.bias, {DType::F32, DType::BF16, DType::F16}, "bias");
        check_shape(layer.bias, {im->N}, "bias");
        im->bias_f32 = layer.bias.to_f32();
      }
    } else {
      im->N = layer.N;
      im->K = layer.K;
      im->format = layer.format->name;
      const bool fused = layer.format->has_fused_kernel && !layer.config.full_precision_matrix_mult && !force_dequantize;
      if (fused && layer.format->fused == FusedKernel::AwqW4A16) {
        im->path = LinearPath::AwqW4A16;
        im->awq = prepare_awq_w4a16(awq_params(layer));
        release_stored(layer);
      } else if (fused && layer.format->fused == FusedKernel::SvdquantW4A4) {
        im->path = LinearPath::SvdquantW4A4;
        im->svd = prepare_svdquant_w4a4(svdquant_params(layer));
        release_stored(layer);
      } else {
        im->path = LinearPath::Dequantized;
        if (!force_dequantize)
          im->fallback_notice = fmt::format(
              "format {} ({}): running dequantize + dense fp32 matmul (eager fallback), first on layer '{}'",
              im->format,
              layer.config.full_precision_matrix_mult ? "full_precision_matrix_mult is set" : "no fused kernel here",
              layer.name);
      }
    }
  } catch (const Error& e) {
    throw Error(with_layer(layer.name, e.what()));
  }
  Linear out;
  out.impl_ = im;
  if (im->path == LinearPath::Dequantized && row_separable(im->format)) {
    // Keep the stored bytes; decode blocks of rows inside the GEMM (forward_streamed).
    im->streamed = true;
    try {
      im->bias_f32 = out.effective_bias();
    } catch (const Error& e) {
      throw Error(with_layer(layer.name, e.what()));
    }
    if (!force_dequantize)
      im->fallback_notice = fmt::format("format {}: decoded to fp32 in blocks of {} rows inside the dense GEMM "
                                        "(stored bytes kept), first on layer '{}'", im->format, kStreamRows, layer.name);
    return out;
  }
  if (im->path == LinearPath::Dequantized) {
    try {
      Tensor w = out.effective_weight();  // both before `weight` is set
      im->pending_weight = w;
      Tensor b = out.effective_bias();
      im->pending_weight = Tensor();
      im->bias_f32 = b;
      if (force_dequantize) {
        im->weight = w;  // the dequantized baseline: fp32 weights, fp32 math
      } else if (kernels::dense_bf16::supported()) {
        im->decoded_bf16 = true;  // bf16 panels only: 2 bytes per weight
        im->packed_bf16 = kernels::dense_bf16::pack_weight(w.raw(), DType::F32, im->N, im->K);
        std::call_once(im->bf16_once, [] {});
        im->fallback_notice = fmt::format(
            "format {} ({}): decoded to bf16 at load, bf16 dense GEMM (vdpbf16ps), first on layer '{}'", im->format,
            layer.config.full_precision_matrix_mult ? "full_precision_matrix_mult is set" : "no fused kernel here",
            layer.name);
      } else {
        im->decoded_bf16 = true;  // no AVX-512 BF16: a bf16 weight on the fp32 kernels
        im->weight = w.to(DType::BF16);
        im->fallback_notice = fmt::format(
            "format {} ({}): decoded to bf16 at load, dense fp32 math, first on layer '{}'", im->format,
            layer.config.full_precision_matrix_mult ? "full_precision_matrix_mult is set" : "no fused kernel here",
            layer.name);
      }
    } catch (const Error& e) {
      throw Error(with_layer(layer.name, e.what()));
    }
  }
  return out;
}

const std::string& Linear::name() const { return impl_->name; }
int64_t Linear::in_features() const { return impl_->K; }
int64_t Linear::out_features() const { return impl_->N; }
LinearPath Linear::path() const { return impl_->path; }
std::string Linear::format_name() const { return impl_->format; }
const QuantizedLayer& Linear::layer() const { return impl_->layer; }
bool Linear::act_unsigned() const { return impl_->layer.format && impl_->layer.act_unsigned; }

uint64_t Linear::stored_bytes() const {
  if (impl_->layer.format) return impl_->layer.storage_bytes();
  uint64_t b = impl_->layer.param("weight").nbytes();
  if (impl_->layer.bias.defined()) b += impl_->layer.bias.nbytes();
  return b;
}

Tensor Linear::effective_weight() const {
  const Impl& im = *impl_;
  if (!im.layer.format) return im.weight.to(DType::F32).clone();
  if (im.path == LinearPath::Dequantized && im.weight.defined() && !im.decoded_bf16) return im.weight;
  Tensor w = dequantize(im.layer);
  if (w.dtype() != DType::F32) w = w.to(DType::F32);
  return w;
}

Tensor Linear::effective_bias() const {
  const Impl& im = *impl_;
  if (!im.layer.format) return im.bias_f32;
  if (im.path == LinearPath::Dequantized && (im.weight.defined() || im.decoded_bf16)) return im.bias_f32;
  Tensor b = Tensor::zeros(DType::F32, {im.N});
  float* bp = b.mutable_data<float>();
  if (im.layer.bias.defined()) {
    const Tensor stored = im.layer.bias.to_f32();
    std::memcpy(bp, stored.data<float>(), size_t(im.N) * sizeof(float));
  }
  if (im.layer.format->has_act_unsigned && im.layer.act_unsigned) {
    // The quantized path sees x + shift on the residual branch only; the stored bias carries
    // −shift·Σ_k R_raw[n,k]. R_raw = W_eff − proj_up·proj_downᵀ, so add shift·rowsum(R_raw) back.
    SvdquantW4A4Params p = svdquant_params(im.layer);
    if (p.tile_packed || p.proj_up_tile) p = svdquant_to_natural(p);
    const Tensor w = im.pending_weight.defined() ? im.pending_weight : effective_weight();
    const Tensor up = p.proj_up.to_f32(), down = p.proj_down.to_f32();
    const int64_t K = im.K, N = im.N, R = p.R;
    std::vector<double> down_colsum(size_t(R), 0.0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < R; ++r) down_colsum[size_t(r)] += down.data<float>()[k * R + r];
    for (int64_t n = 0; n < N; ++n) {
      double rowsum = 0;
      for (int64_t k = 0; k < K; ++k) rowsum += w.data<float>()[n * K + k];
      for (int64_t r = 0; r < R; ++r) rowsum -= double(up.data<float>()[n * R + r]) * down_colsum[size_t(r)];
      bp[n] = float(double(bp[n]) + double(kSvdquantUnsignedShift) * rowsum);
    }
  }
  return b;
}

Linear Linear::dequantized() const {
  if (!impl_->layer.format) return *this;
  return from_layer(impl_->layer, /*force_dequantize=*/true);
}

void Linear::Impl::forward_streamed(const float* x, int64_t M, float* y) const {
  using namespace kernels::linear;
  const float* b = bias_f32.defined() ? bias_f32.data<float>() : nullptr;
  const int64_t blocks = (N + kStreamRows - 1) / kStreamRows;
  parallel_for(blocks, [&](int64_t blk) {
    thread_local ScratchF32 wbuf, pbuf, ybuf;
    const int64_t n0 = blk * kStreamRows, n1 = std::min(N, n0 + kStreamRows), n = n1 - n0;
    const float* w = nullptr;
    Tensor deq;
    if (layer.format) {
      deq = dequantize(rows(n0, n1));  // the format's own decode, on these rows only
      w = deq.data<float>();
    } else {
      const Tensor& sw = layer.param("weight");
      wbuf.reserve(size_t(n * K));
      const size_t es = dtype_size(sw.dtype());
      const Tensor rowsv = Tensor::view(sw.dtype(), {n, K}, static_cast<const uint8_t*>(sw.raw()) + size_t(n0 * K) * es,
                                        nullptr);
      const Tensor f = rowsv.to(DType::F32);
      std::memcpy(wbuf.p, f.raw(), size_t(n * K) * sizeof(float));
      w = wbuf.p;
    }
    PackedF32Weight pw;
    pw.N = n, pw.K = K, pw.panels = (n + kPanel - 1) / kPanel;
    pbuf.reserve(size_t(pw.panels * K * kPanel));
    pw.data = pbuf.p;
    pack_rows_f32(w, K, n, K, pw.data);
    ybuf.reserve(size_t(M * n));
    gemm_packed_serial(x, M, pw, ybuf.p);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < n; ++j) y[m * N + n0 + j] = ybuf.p[m * n + j] + (b ? b[n0 + j] : 0.0f);
  });
}

Linear Linear::streamed() const {
  if (impl_->path != LinearPath::Float && impl_->path != LinearPath::Dequantized) return *this;
  if (impl_->streamed) return *this;
  if (impl_->layer.format && !row_separable(impl_->format)) return *this;
  auto im = std::make_shared<Impl>();
  im->name = impl_->name;
  im->N = impl_->N;
  im->K = impl_->K;
  im->path = impl_->path;
  im->layer = impl_->layer;
  im->format = impl_->format;
  im->bias_f32 = impl_->bias_f32;
  im->fallback_notice = impl_->fallback_notice;
  im->streamed = true;
  if (!im->layer.format) im->weight = impl_->weight;
  Linear out;
  out.impl_ = im;
  return out;
}
bool Linear::is_streamed() const { return impl_->streamed; }

void Linear::prepare_dense() const {
  if (impl_->path != LinearPath::Float && impl_->path != LinearPath::Dequantized) return;
  if (impl_->streamed || impl_->bf16_only()) return;
  if (g_dense_gemm)
    impl_->ensure_f32();
  else if (impl_->use_bf16())
    impl_->ensure_bf16();
  else
    impl_->ensure_packed();
}

void Linear::forward_rows(const float* x, int64_t M, float* y) const {
  const Impl& im = *impl_;
  if (M == 0) return;
  switch (im.path) {
    case LinearPath::Float:
    case LinearPath::Dequantized: {
      if (!im.fallback_notice.empty() && !im.noticed.exchange(true))
        notice_once("fallback:" + im.format + ":" + std::to_string(im.layer.config.full_precision_matrix_mult),
                    im.fallback_notice);
      if (im.streamed) {
        im.forward_streamed(x, M, y);
        return;
      }
      const float* b = im.bias_f32.defined() ? im.bias_f32.data<float>() : nullptr;
      if (im.bf16_only()) {
        kernels::dense_bf16::run_packed(x, M, im.packed_bf16, b, y);
      } else if (active_isa() == Isa::Scalar || M < kernels::linear::kGemmMinRows) {
        kernels::linear::run_rows(x, M, im.K, im.weight.raw(), im.weight.dtype(), im.N, b, y);
      } else if (im.use_bf16()) {
        im.ensure_bf16();
        kernels::dense_bf16::run_packed(x, M, im.packed_bf16, b, y);
      } else if (g_dense_gemm) {
        im.ensure_f32();
        g_dense_gemm(M, im.N, im.K, x, im.weight_f32.data<float>(), y);
        if (b)
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < im.N; ++n) y[m * im.N + n] += b[n];
      } else {
        im.ensure_packed();
        kernels::linear::run_packed(x, M, im.packed, b, y);
      }
      return;
    }
    case LinearPath::AwqW4A16:
    case LinearPath::SvdquantW4A4: {
      const Tensor xv = Tensor::view(DType::F32, {M, im.K}, x, nullptr);
      const Tensor yv = Tensor::view(DType::F32, {M, im.N}, y, nullptr, /*writable=*/true);  // written in place
      try {
        if (im.path == LinearPath::AwqW4A16) gemv_awq_w4a16(xv, *im.awq, DType::F32, yv);
        else svdquant_linear(xv, *im.svd, DType::F32, yv);
      } catch (const Error& e) {
        throw Error(with_layer(im.name, e.what()));
      }
      return;
    }
  }
}

Tensor Linear::forward(const Tensor& x) const {
  const Impl& im = *impl_;
  if (!x.defined()) throw Error(fmt::format("layer '{}': input is undefined", im.name));
  if (x.dim() < 1 || x.size(-1) != im.K)
    throw Error(fmt::format("layer '{}': input shape {}: expected (..., {}) (in_features)", im.name,
                            shape_str(x.shape()), im.K));
  check_dtype(x, {DType::F32, DType::BF16, DType::F16, DType::F64}, fmt::format("layer '{}': input", im.name));
  const Tensor xf = x.to_f32();
  Shape out_shape = x.shape();
  out_shape.back() = im.N;
  const int64_t M = im.K ? x.numel() / im.K : 0;
  Tensor y = Tensor::empty(DType::F32, out_shape);
  forward_rows(xf.data<float>(), M, y.mutable_data<float>());
  return y;
}

}  // namespace nibble::nn
