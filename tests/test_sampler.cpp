// The flow-matching sampler (qwen_image.h): ComfyUI's sigma schedules, the Euler update, CFG,
// denoise, the noise generator, against analytic toy models whose ODE solution is known.
#include <gtest/gtest.h>

#include <cmath>

#include "nibble/latent.h"
#include "nibble/qwen_image.h"

using namespace nibble;
using namespace nibble::nn;

namespace {

// Reference schedules: printed by ComfyUI's own comfy/model_sampling.py (ModelSamplingDiscreteFlow
// with set_parameters(shift=3.1, multiplier=1.0) as ModelSamplingAuraFlow(3.1) does, and
// ModelSamplingFlux with the Qwen-Image sampling_settings shift 1.15) through its
// simple_scheduler / normal_scheduler formulas (comfy/samplers.py), torch 2.x, float32, e.g.
//   aura 3.1, simple, 8 steps: sigmas[i] = sigma(t = (1000 − 1 − int(i·125) + 1) / 1000),
//   sigma(t) = 3.1·t / (1 + 2.1·t) → t = 0.875: 2.7125 / 2.8375 = 0.95594716...
struct Ref {
  const char* what;
  SamplerOptions o;
  std::vector<float> sigmas;
};
SamplerOptions opts(int steps, const char* sched, double shift, bool flux_default = false, double denoise = 1.0) {
  SamplerOptions o;
  o.steps = steps;
  o.scheduler = sched;
  o.shift = shift;
  o.model_sampling_default = flux_default;
  o.denoise = denoise;
  return o;
}

const std::vector<Ref>& refs() {
  static const std::vector<Ref> r = {
      {"aura3.1 simple 8", opts(8, "simple", 3.1),
       {1.0f, 0.9559471607208252f, 0.9029126167297363f, 0.837837815284729f, 0.7560975551605225f, 0.6503496170043945f,
        0.5081967115402222f, 0.30693066120147705f, 0.0f}},
      {"aura3.1 normal 8", opts(8, "normal", 3.1),
       {1.0f, 0.949154257774353f, 0.8861523866653442f, 0.8060429692268372f, 0.7007631063461304f, 0.5562394261360168f,
        0.34550240635871887f, 0.009527964517474174f, 0.0f}},
      {"aura3.1 simple 20", opts(20, "simple", 3.1),
       {1.0f, 0.9833055138587952f, 0.9653978943824768f, 0.9461401104927063f, 0.9253731966018677f, 0.9029126167297363f,
        0.8785425424575806f, 0.8520084619522095f, 0.8230088353157043f, 0.791183352470398f, 0.7560975551605225f,
        0.717223584651947f, 0.6739130616188049f, 0.6253602504730225f, 0.5705521702766418f, 0.5081967115402222f,
        0.43661972880363464f, 0.35361215472221375f, 0.25619834661483765f, 0.14027148485183716f, 0.0f}},
      {"aura3.1 normal 20", opts(20, "normal", 3.1),
       {1.0f, 0.9824508428573608f, 0.9635586738586426f, 0.943163275718689f, 0.9210777878761292f, 0.8970828056335449f,
        0.870919942855835f, 0.8422811031341553f, 0.8107976317405701f, 0.7760233879089355f, 0.7374140620231628f,
        0.6942981481552124f, 0.6458377242088318f, 0.590973436832428f, 0.5283460021018982f, 0.4561823606491089f,
        0.3721248507499695f, 0.2729690372943878f, 0.1542455404996872f, 0.009527964517474174f, 0.0f}},
      {"aura3.1 simple 7", opts(7, "simple", 3.1),
       {1.0f, 0.9493182897567749f, 0.8860683441162109f, 0.8055605888366699f, 0.6996159553527832f, 0.5539172887802124f,
        0.3409213423728943f, 0.0f}},
      {"aura3.1 simple 3", opts(3, "simple", 3.1), {1.0f, 0.8612903952598572f, 0.6085576415061951f, 0.0f}},
      {"aura1.0 simple 4", opts(4, "simple", 1.0), {1.0f, 0.75f, 0.5f, 0.25f, 0.0f}},
      {"aura3.1 simple 8 denoise 0.5 (last 9 of 16)", opts(8, "simple", 3.1, false, 0.5),
       {0.7560975551605225f, 0.7072611451148987f, 0.6503496170043945f, 0.5854703187942505f, 0.5081967115402222f,
        0.4178376793861389f, 0.30693066120147705f, 0.17248079180717468f, 0.0f}},
      {"flux1.15 simple 8", opts(8, "simple", 0, true),
       {1.0f, 0.956723690032959f, 0.9045307636260986f, 0.8403487801551819f, 0.7595109343528748f, 0.6545668244361877f,
        0.5128440856933594f, 0.31090107560157776f, 0.0f}},
      {"flux1.15 normal 8", opts(8, "normal", 0, true),
       {1.0f, 0.9498900771141052f, 0.8876274824142456f, 0.8081810474395752f, 0.7032984495162964f, 0.558435320854187f,
        0.345348060131073f, 0.0009965240024030209f, 0.0f}},
      {"flux1.15 simple 7", opts(7, "simple", 0, true),
       {1.0f, 0.9498947858810425f, 0.8875903487205505f, 0.8081406950950623f, 0.703169047832489f, 0.5582663416862488f,
        0.34492799639701843f, 0.0f}},
      {"flux1.15 normal 20", opts(20, "normal", 0, true),
       {1.0f, 0.982718825340271f, 0.9640986919403076f, 0.9439776539802551f, 0.9221667051315308f, 0.8984434604644775f,
        0.8725451231002808f, 0.844157874584198f, 0.8129051923751831f, 0.7783299684524536f, 0.7398725748062134f,
        0.696840226650238f, 0.6483650803565979f, 0.5933447480201721f, 0.5303575992584229f, 0.45753830671310425f,
        0.3723898231983185f, 0.2714911699295044f, 0.1500270962715149f, 0.0009965240024030209f, 0.0f}},
  };
  return r;
}

Tensor ramp(const Shape& s, float a, float b) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<float>()[i] = a + b * float(i % 97) / 97.0f;
  return t;
}

// The exact flow-matching velocity of a point-mass data distribution at target: x_σ = σ·n + (1−σ)·target
// ⇒ v = n − target = (x − target) / σ. Euler on it is exact for any schedule: x_{i+1} − target =
// (x_i − target)·σ_{i+1}/σ_i, so it lands on target at σ = 0.
DenoiseFn point_mass(const Tensor& pos, const Tensor& neg, int* calls_pos = nullptr, int* calls_neg = nullptr,
                     std::vector<double>* seen = nullptr) {
  return [=](const Tensor& x, double sigma, bool negative) {
    if (negative && calls_neg) ++*calls_neg;
    if (!negative && calls_pos) ++*calls_pos;
    if (seen && !negative) seen->push_back(sigma);
    const Tensor& tg = negative ? neg : pos;
    Tensor v = Tensor::empty(DType::F32, x.shape());
    for (int64_t i = 0; i < x.numel(); ++i)
      v.mutable_data<float>()[i] = float((double(x.data<float>()[i]) - double(tg.data<float>()[i])) / sigma);
    return v;
  };
}

}  // namespace

TEST(SamplerSchedule, MatchesComfyUIValues) {
  for (const Ref& r : refs()) {
    const std::vector<float> s = flow_sigmas(r.o);
    ASSERT_EQ(s.size(), r.sigmas.size()) << r.what;
    for (size_t i = 0; i < s.size(); ++i) {
      // float32 as torch computes it: all equal except two `normal` values one ulp apart (torch's
      // linspace arithmetic), hence the 1-ulp tolerance.
      EXPECT_NEAR(s[i], r.sigmas[i], std::max(1e-30f, std::nextafter(r.sigmas[i], 2.0f) - r.sigmas[i]))
          << r.what << " sigma " << i;
    }
  }
}

TEST(SamplerSchedule, ShapesAndErrors) {
  SamplerOptions o;
  o.steps = 1;
  EXPECT_EQ(flow_sigmas(o), (std::vector<float>{1.0f, 0.0f}));
  o.denoise = 0.0;
  EXPECT_TRUE(flow_sigmas(o).empty());
  o.denoise = 1.0;
  o.steps = 0;
  EXPECT_THROW(flow_sigmas(o), Error);
  o.steps = 4;
  o.scheduler = "karras";
  EXPECT_THROW(flow_sigmas(o), Error);
  o.scheduler = "simple";
  o.shift = -1;
  EXPECT_THROW(flow_sigmas(o), Error);
  o.shift = 3.1;
  o.denoise = 1.5;
  EXPECT_THROW(flow_sigmas(o), Error);
  // Strictly decreasing, 1 → 0.
  for (const char* sc : {"simple", "normal"}) {
    SamplerOptions q;
    q.scheduler = sc;
    q.steps = 50;
    const auto s = flow_sigmas(q);
    ASSERT_EQ(s.size(), 51u);
    EXPECT_EQ(s.front(), 1.0f);
    EXPECT_EQ(s.back(), 0.0f);
    for (size_t i = 1; i < s.size(); ++i) EXPECT_LT(s[i], s[i - 1]) << sc << " " << i;
  }
}

TEST(SamplerNoise, DeterministicAndStandardNormal) {
  const Tensor a = flow_noise({2, 16, 1, 32, 33}, 42), b = flow_noise({2, 16, 1, 32, 33}, 42), c = flow_noise({2, 16, 1, 32, 33}, 43);
  ASSERT_EQ(a.shape(), (Shape{2, 16, 1, 32, 33}));
  double sum = 0, sq = 0;
  int64_t diff = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const float v = a.data<float>()[i];
    ASSERT_TRUE(std::isfinite(v));
    EXPECT_EQ(v, b.data<float>()[i]);
    diff += v != c.data<float>()[i];
    sum += v;
    sq += double(v) * v;
  }
  const double n = double(a.numel()), mean = sum / n, var = sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 5.0 / std::sqrt(n));  // 5 standard errors
  EXPECT_NEAR(var, 1.0, 5.0 * std::sqrt(2.0 / n));
  EXPECT_GT(diff, a.numel() * 99 / 100);
  // The noise of a prefix shape is the prefix of the longer one (counter-based, per element).
  const Tensor p = flow_noise({5}, 42);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(p.data<float>()[i], a.data<float>()[i]);
}

TEST(SamplerEuler, PointMassIsExactAnySchedule) {
  const Shape s{1, 16, 1, 4, 6};
  const Tensor target = ramp(s, -1.5f, 3.0f), noise = flow_noise(s, 7);
  for (const char* sc : {"simple", "normal"})
    for (int steps : {1, 3, 8, 20}) {
      SamplerOptions o;
      o.scheduler = sc;
      o.steps = steps;
      int calls = 0, calls_neg = 0, cb = 0;
      std::vector<double> seen;
      const auto sig = flow_sigmas(o);
      const Tensor y = sample_euler(point_mass(target, target, &calls, &calls_neg, &seen), noise, sig, 1.0, false,
                                    [&](int i, int n, double sec) {
                                      EXPECT_EQ(i, cb);
                                      EXPECT_EQ(n, steps);
                                      EXPECT_GE(sec, 0.0);
                                      ++cb;
                                    });
      EXPECT_EQ(calls, steps);
      EXPECT_EQ(calls_neg, 0);
      EXPECT_EQ(cb, steps);
      ASSERT_EQ(seen.size(), size_t(steps));
      for (int i = 0; i < steps; ++i) EXPECT_EQ(seen[size_t(i)], double(sig[size_t(i)]));  // timestep = sigma
      for (int64_t i = 0; i < y.numel(); ++i)
        ASSERT_NEAR(y.data<float>()[i], target.data<float>()[i], 2e-5) << sc << " steps " << steps << " i " << i;
    }
}

TEST(SamplerEuler, CfgCombinesVelocities) {
  // uncond + g·(cond − uncond) of two point-mass fields is the point-mass field of b + g·(a − b).
  const Shape s{2, 16, 3, 5};
  const Tensor a = ramp(s, 0.5f, 1.0f), b = ramp(s, -2.0f, 0.5f), noise = flow_noise(s, 11);
  for (double g : {1.0, 2.5, 4.0}) {
    int cp = 0, cn = 0;
    SamplerOptions o;
    o.steps = 8;
    const Tensor y = sample_euler(point_mass(a, b, &cp, &cn), noise, flow_sigmas(o), g, true);
    EXPECT_EQ(cp, 8);
    EXPECT_EQ(cn, g == 1.0 ? 0 : 8) << "cfg 1 skips the negative (ComfyUI's cfg1 optimisation)";
    for (int64_t i = 0; i < y.numel(); ++i) {
      const double want = b.data<float>()[i] + g * (a.data<float>()[i] - b.data<float>()[i]);
      ASSERT_NEAR(y.data<float>()[i], want, 1e-4 * std::max(1.0, std::fabs(want))) << "cfg " << g << " i " << i;
    }
  }
}

TEST(SamplerEuler, GaussianDataConvergesFirstOrder) {
  // Data x0 ~ N(mu, s²) per element: the probability-flow ODE of x_σ = σ·n + (1−σ)·x0 maps n at σ = 1
  // to mu + s·n at σ = 0 along x_σ = (1−σ)·mu + r(σ)·n, r = sqrt(σ² + (1−σ)²s²), with velocity
  // v(x, σ) = −mu + r'(σ)·(x − (1−σ)·mu) / r(σ), r' = (σ − (1−σ)s²) / r. Euler's error is O(1/steps).
  const double mu = 0.7, sd = 0.4;
  const Shape s{1, 16, 2, 3};
  const Tensor noise = flow_noise(s, 5);
  DenoiseFn model = [&](const Tensor& x, double sigma, bool) {
    const double r = std::sqrt(sigma * sigma + (1 - sigma) * (1 - sigma) * sd * sd);
    const double dr = (sigma - (1 - sigma) * sd * sd) / r;
    Tensor v = Tensor::empty(DType::F32, x.shape());
    for (int64_t i = 0; i < x.numel(); ++i)
      v.mutable_data<float>()[i] = float(-mu + dr * (x.data<float>()[i] - (1 - sigma) * mu) / r);
    return v;
  };
  auto max_err = [&](int steps) {
    std::vector<float> sig;
    for (int i = 0; i <= steps; ++i) sig.push_back(float(1.0 - double(i) / steps));
    const Tensor y = sample_euler(model, noise, sig, 1.0, false);
    double e = 0;
    for (int64_t i = 0; i < y.numel(); ++i) e = std::max(e, std::fabs(y.data<float>()[i] - (mu + sd * noise.data<float>()[i])));
    return e;
  };
  const double e50 = max_err(50), e200 = max_err(200), e800 = max_err(800);
  EXPECT_LT(e800, 2e-3);
  EXPECT_GT(e50 / e200, 3.0);  // first order: ×4 steps → error ÷ ~4
  EXPECT_LT(e50 / e200, 5.0);
  EXPECT_GT(e200 / e800, 3.0);
}

TEST(SamplerFlow, EmptyLatentFullDenoise) {
  // Empty latent: x starts as pure noise (σ0 = 1); the model's target is in the normalised space;
  // the result is de-normalised with the Wan 2.1 format.
  const Shape s{1, 16, 1, 4, 4};
  const Tensor target = ramp(s, -1.0f, 2.0f);
  SamplerOptions o;
  o.steps = 8;
  const Tensor y = sample_flow(point_mass(target, target), Tensor::zeros(DType::F32, s), flow_noise(s, 3), o, false);
  const Tensor want = latent_process_out(target);
  for (int64_t i = 0; i < y.numel(); ++i) ASSERT_NEAR(y.data<float>()[i], want.data<float>()[i], 1e-4);
}

TEST(SamplerFlow, DenoiseStartsFromTheNoisedLatent) {
  // denoise 0.5, 8 steps: σ0 = 0.7561 (ComfyUI: the last 9 sigmas of a 16-step schedule); the first
  // model input is σ0·noise + (1−σ0)·process_in(latent).
  const Shape s{1, 16, 1, 2, 3};
  const Tensor latent = ramp(s, 0.25f, 1.0f), noise = flow_noise(s, 9);
  SamplerOptions o;
  o.steps = 8;
  o.denoise = 0.5;
  const float s0 = flow_sigmas(o)[0];
  EXPECT_NEAR(s0, 0.7560975551605225f, 1e-7);
  const Tensor lin = latent_process_in(latent);
  bool first = true;
  DenoiseFn model = [&](const Tensor& x, double sigma, bool neg) {
    if (first) {
      EXPECT_EQ(sigma, double(s0));
      for (int64_t i = 0; i < x.numel(); ++i)
        EXPECT_NEAR(x.data<float>()[i], s0 * noise.data<float>()[i] + (1 - s0) * lin.data<float>()[i], 1e-6);
      first = false;
    }
    return point_mass(lin, lin)(x, sigma, neg);
  };
  const Tensor y = sample_flow(model, latent, noise, o, false);
  for (int64_t i = 0; i < y.numel(); ++i) ASSERT_NEAR(y.data<float>()[i], latent.data<float>()[i], 1e-4);
  // denoise 0 → the latent unchanged, no model call.
  o.denoise = 0.0;
  int calls = 0;
  const Tensor z = sample_flow(point_mass(lin, lin, &calls), latent, noise, o, false);
  EXPECT_EQ(calls, 0);
  for (int64_t i = 0; i < z.numel(); ++i) ASSERT_EQ(z.data<float>()[i], latent.data<float>()[i]);
}

TEST(SamplerFlow, BadInput) {
  const Shape s{1, 16, 1, 2, 2};
  SamplerOptions o;
  o.steps = 2;
  const Tensor t = Tensor::zeros(DType::F32, s);
  EXPECT_THROW(sample_flow(point_mass(t, t), t, Tensor::zeros(DType::F32, {1, 16, 1, 2, 3}), o, false), Error);
  DenoiseFn wrong = [](const Tensor&, double, bool) { return Tensor::zeros(DType::F32, {1, 16, 1, 2, 3}); };
  try {
    sample_flow(wrong, t, t, o, false);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model returned"), std::string::npos) << e.what();
  }
  EXPECT_THROW(latent_process_in(Tensor::zeros(DType::F32, {1, 4, 2, 2})), Error);
}
