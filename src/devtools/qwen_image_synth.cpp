// Synthetic Qwen-Image block files and fidelity measures (see qwen_image_synth.h).
#include "devtools/qwen_image_synth.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>

#include "nibble/synth.h"

namespace nibble::nn {

QwenBlockInputs synth_block_inputs(int64_t D, int64_t hd, int64_t Si, int64_t St, uint64_t seed, bool rope) {
  QwenBlockInputs in;
  in.img = synth_activations(Si, D, seed);
  in.txt = synth_activations(St, D, seed + 1);
  SynthActOptions to;
  to.n_outlier_channels = 0;
  in.temb = synth_activations(1, D, seed + 2, to);
  if (rope) {
    const int64_t S = Si + St, P = hd / 2;
    in.rope_cos = Tensor::empty(DType::F32, {S, P});
    in.rope_sin = Tensor::empty(DType::F32, {S, P});
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < P; ++i) {
        const double th = double(s) * std::pow(10000.0, -double(i) / double(P));
        in.rope_cos.mutable_data<float>()[s * P + i] = float(std::cos(th));
        in.rope_sin.mutable_data<float>()[s * P + i] = float(std::sin(th));
      }
  }
  return in;
}

Fidelity compare_outputs(const Tensor& out, const Tensor& ref) {
  if (out.numel() != ref.numel()) throw Error("compare_outputs: size mismatch");
  const Tensor a = out.to_f32(), b = ref.to_f32();
  double lo = std::numeric_limits<double>::infinity(), hi = -lo, se = 0, sig = 0;
  Fidelity f;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double r = b.data<float>()[i], d = double(a.data<float>()[i]) - r;
    lo = std::min(lo, r), hi = std::max(hi, r);
    se += d * d, sig += r * r;
    f.max_abs = std::max(f.max_abs, std::fabs(d));
    if (std::isnan(d)) f.max_abs = std::numeric_limits<double>::quiet_NaN();
  }
  f.range = hi - lo;
  const double mse = se / double(std::max<int64_t>(b.numel(), 1));
  f.psnr_db = mse > 0 ? 10 * std::log10(f.range * f.range / mse) : std::numeric_limits<double>::infinity();
  f.snr_db = se > 0 ? 10 * std::log10(sig / se) : std::numeric_limits<double>::infinity();
  if (std::isnan(se)) f.psnr_db = f.snr_db = std::numeric_limits<double>::quiet_NaN();
  return f;
}

Fidelity compare_updates(const Tensor& out, const Tensor& ref, const Tensor& base) {
  if (out.numel() != base.numel() || ref.numel() != base.numel()) throw Error("compare_updates: size mismatch");
  const Tensor a = out.to_f32(), b = ref.to_f32(), c = base.to(DType::F32);
  Tensor da = Tensor::empty(DType::F32, {a.numel()}), db = Tensor::empty(DType::F32, {a.numel()});
  for (int64_t i = 0; i < a.numel(); ++i) {
    da.mutable_data<float>()[i] = a.data<float>()[i] - c.data<float>()[i];
    db.mutable_data<float>()[i] = b.data<float>()[i] - c.data<float>()[i];
  }
  return compare_outputs(da, db);
}

}  // namespace nibble::nn
