// sampler.cpp — the flow-matching Euler sampler of a Qwen-Image model as ComfyUI runs it
// (qwen_image.h; the derivation and the sources are in docs/sampling.md).
//
// The sigma tables are computed in float32 the way torch evaluates ComfyUI's formulas (every
// operation a separate float32 rounding, through the out-of-line helpers below so no FMA can fuse
// two of them), so the schedule matches ComfyUI's numbers (tests/test_sampler.cpp checks them
// against values ComfyUI's own model_sampling.py printed).
#include <fmt/format.h>

#include <chrono>
#include <cmath>

#include "nibble/latent.h"
#include "nibble/qwen_image.h"
#include "nibble/thread_pool.h"

namespace nibble::nn {
namespace {

// One float32 rounding per operation (no contraction into FMAs across these calls).
[[gnu::noinline]] float mul32(float a, float b) { return a * b; }
[[gnu::noinline]] float add32(float a, float b) { return a + b; }
[[gnu::noinline]] float div32(float a, float b) { return a / b; }

// A ComfyUI model-sampling object reduced to what the schedulers use.
struct FlowSampling {
  bool flux = false;  // ModelSamplingFlux (mu) vs ModelSamplingDiscreteFlow (alpha, multiplier 1)
  double shift = 3.1;
  int64_t table = 1000;  // len(sigmas)

  // sigma(t) for a float32 timestep t (timestep == sigma for both: multiplier 1).
  float sigma(float t) const {
    if (flux) {
      // exp(mu) / (exp(mu) + (1/t − 1)^1.0); torch evaluates scalar / tensor as reciprocal · scalar.
      const float e = float(std::exp(shift));
      const float inv = div32(1.0f, t);
      const float den = add32(e, add32(inv, -1.0f));
      return mul32(div32(1.0f, den), e);
    }
    if (shift == 1.0) return t;  // time_snr_shift returns t unchanged
    // alpha·t / (1 + (alpha − 1)·t)
    const float num = mul32(float(shift), t);
    const float den = add32(1.0f, mul32(float(shift - 1.0), t));
    return div32(num, den);
  }
  // sigmas[j], j = 0..table-1: sigma(f32(j+1) / f32(table)).
  float table_sigma(int64_t j) const { return sigma(div32(float(j + 1), float(table))); }
  float sigma_max() const { return table_sigma(table - 1); }
  float sigma_min() const { return table_sigma(0); }
};

// ComfyUI's simple_scheduler: steps entries read backwards from the table at stride len/steps, then 0.
std::vector<float> simple_schedule(const FlowSampling& s, int steps) {
  std::vector<float> sig;
  const double ss = double(s.table) / double(steps);
  for (int x = 0; x < steps; ++x) sig.push_back(s.table_sigma(s.table - 1 - int64_t(double(x) * ss)));
  sig.push_back(0.0f);
  return sig;
}

// ComfyUI's normal_scheduler: torch.linspace(timestep(sigma_max), timestep(sigma_min), steps) in
// float32 (torch's two-sided linspace), sigma of each, then 0 (unless sigma(end) is ~0, when it
// takes one more step and no appended 0).
std::vector<float> normal_schedule(const FlowSampling& s, int steps) {
  const float start = s.sigma_max(), end = s.sigma_min();
  bool append_zero = true;
  if (std::fabs(s.sigma(end)) <= 1e-5) {
    ++steps;
    append_zero = false;
  }
  std::vector<float> sig;
  if (steps == 1) {
    sig.push_back(s.sigma(start));
  } else {
    const float step = div32(add32(end, -start), float(steps - 1));
    const int halfway = steps / 2;
    for (int i = 0; i < steps; ++i) {
      const float t = i < halfway ? add32(start, mul32(step, float(i))) : add32(end, -mul32(step, float(steps - 1 - i)));
      sig.push_back(s.sigma(t));
    }
  }
  if (append_zero) sig.push_back(0.0f);
  return sig;
}

// Counter-based standard normals: element pairs (2i, 2i+1) from one splitmix64 stream position.
uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
double unit_open(uint64_t bits) { return (double(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

void check_latent_like(const Tensor& t, const char* what) {
  if (!t.defined() || t.dim() < 3 || !is_float(t.dtype()))
    throw Error(fmt::format("sampler: {} must be a float tensor (B, C, [T,] H, W), got {}", what,
                            t.defined() ? shape_str(t.shape()) : std::string("nothing")));
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

std::vector<float> flow_sigmas(const SamplerOptions& o) {
  if (o.steps < 1) throw Error(fmt::format("sampler: steps must be ≥ 1, got {}", o.steps));
  if (!(o.denoise <= 1.0)) throw Error(fmt::format("sampler: denoise must be in (0, 1], got {}", o.denoise));
  if (!o.model_sampling_default && !(o.shift > 0.0 && std::isfinite(o.shift)))
    throw Error(fmt::format("sampler: shift must be > 0, got {}", o.shift));
  if (o.scheduler != "simple" && o.scheduler != "normal")
    throw Error(fmt::format("sampler: unknown scheduler '{}' (expected simple or normal)", o.scheduler));
  if (o.denoise <= 0.0) return {};
  FlowSampling s;
  if (o.model_sampling_default) {
    s.flux = true;
    s.shift = 1.15;
    s.table = 10000;
  } else {
    s.shift = o.shift;
    s.table = 1000;
  }
  auto schedule = [&](int steps) { return o.scheduler == "simple" ? simple_schedule(s, steps) : normal_schedule(s, steps); };
  if (o.denoise > 0.9999) return schedule(o.steps);
  // KSampler.set_steps: int(steps / denoise) steps, keep the last steps + 1 sigmas.
  const int total = int(double(o.steps) / o.denoise);
  std::vector<float> all = schedule(total);
  const size_t keep = std::min(all.size(), size_t(o.steps) + 1);
  return std::vector<float>(all.end() - std::ptrdiff_t(keep), all.end());
}

Tensor flow_noise(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(DType::F32, shape);
  float* p = t.mutable_data<float>();
  const int64_t n = t.numel(), pairs = (n + 1) / 2;
  const uint64_t base = splitmix64(seed ^ 0x6e6962626c65ull);  // "nibble"
  parallel_for_range(pairs, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint64_t a = splitmix64(base + 2 * uint64_t(i)), b = splitmix64(base + 2 * uint64_t(i) + 1);
      const double r = std::sqrt(-2.0 * std::log(unit_open(a))), th = 6.283185307179586 * unit_open(b);
      p[2 * i] = float(r * std::cos(th));
      if (2 * i + 1 < n) p[2 * i + 1] = float(r * std::sin(th));
    }
  });
  return t;
}

DenoiseFn qwen_image_denoiser(const QwenImageTransformer& model, const Conditioning& pos, const Conditioning& neg,
                              QwenImageTimings* timings) {
  return [&model, &pos, &neg, timings](const Tensor& x, double sigma, bool negative) {
    const Conditioning& c = negative ? neg : pos;
    QwenImageInputs in;
    in.latent = x;
    in.context = c.context;
    in.attention_mask = c.attention_mask;
    in.timestep = Tensor::empty(DType::F32, {x.size(0)});
    for (int64_t b = 0; b < x.size(0); ++b) in.timestep.mutable_data<float>()[b] = float(sigma);
    in.ref_latents = c.reference_latents;
    return model.forward(in, timings);
  };
}

Tensor sample_euler(const DenoiseFn& model, const Tensor& x_in, const std::vector<float>& sigmas, double cfg,
                    bool negative, const StepCallback& on_step) {
  check_latent_like(x_in, "latent");
  Tensor x = x_in.to(DType::F32).clone();
  float* xp = x.mutable_data<float>();
  const int64_t n = x.numel();
  const int steps = sigmas.size() < 2 ? 0 : int(sigmas.size()) - 1;
  const bool use_neg = negative && std::fabs(cfg - 1.0) > 1e-9 * std::max(1.0, std::fabs(cfg));  // math.isclose
  const float g = float(cfg);
  for (int i = 0; i < steps; ++i) {
    const double t0 = now_s();
    const float s = sigmas[size_t(i)], ds = sigmas[size_t(i) + 1] - s;
    auto predict = [&](bool neg) {
      Tensor v = model(x, double(s), neg);
      if (!v.defined() || v.shape() != x.shape())
        throw Error(fmt::format("sampler: the model returned {} for a latent {} at step {} (sigma {})",
                                v.defined() ? shape_str(v.shape()) : std::string("nothing"), shape_str(x.shape()), i, s));
      return v.to_f32();
    };
    const Tensor vc = predict(false);
    const float* c = vc.data<float>();
    if (use_neg) {
      const Tensor vu = predict(true);
      const float* u = vu.data<float>();
      for (int64_t k = 0; k < n; ++k) xp[k] += (u[k] + g * (c[k] - u[k])) * ds;
    } else {
      for (int64_t k = 0; k < n; ++k) xp[k] += c[k] * ds;
    }
    if (on_step) on_step(i, steps, now_s() - t0);
  }
  return x;
}

Tensor sample_flow(const DenoiseFn& model, const Tensor& latent, const Tensor& noise, const SamplerOptions& o,
                   bool negative, const StepCallback& on_step) {
  check_latent_like(latent, "latent");
  check_latent_like(noise, "noise");
  if (noise.shape() != latent.shape())
    throw Error(fmt::format("sampler: noise {} must have the latent's shape {}", shape_str(noise.shape()),
                            shape_str(latent.shape())));
  const std::vector<float> sigmas = flow_sigmas(o);
  const Tensor lat = latent.to(DType::F32);
  if (sigmas.empty()) return lat.clone();  // denoise 0: ComfyUI returns the latent unchanged
  // KSampler's inner_sample: an all-zero (empty) latent is not normalised.
  const float* lp = lat.data<float>();
  bool empty = true;
  for (int64_t k = 0; k < lat.numel() && empty; ++k) empty = lp[k] == 0.0f;
  const Tensor x0 = empty ? lat : latent_process_in(lat);
  // CONST.noise_scaling: sigma·noise + (1 − sigma)·latent.
  const Tensor nz = noise.to(DType::F32);
  Tensor x = Tensor::empty(DType::F32, lat.shape());
  const float s0 = sigmas[0], one_minus = 1.0f - s0;
  const float *a = nz.data<float>(), *b = x0.data<float>();
  float* xp = x.mutable_data<float>();
  for (int64_t k = 0; k < x.numel(); ++k) xp[k] = s0 * a[k] + one_minus * b[k];
  Tensor y = sample_euler(model, x, sigmas, o.cfg, negative, on_step);
  // CONST.inverse_noise_scaling: latent / (1 − sigma_last); sigma_last is 0 for every schedule here.
  const float last = sigmas.back();
  if (last != 0.0f) {
    float* yp = y.mutable_data<float>();
    for (int64_t k = 0; k < y.numel(); ++k) yp[k] /= (1.0f - last);
  }
  return latent_process_out(y);
}

}  // namespace nibble::nn
