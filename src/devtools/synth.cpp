// synth.cpp — seeded synthetic weights / activations / Qwen-Image checkpoints (see nibble/synth.h).
//
// Determinism: every row draws from its own splitmix64 stream seeded by (seed, row), and the shared
// pieces (dominant directions, outlier channels) come from streams seeded by (seed, tag). Rows are
// spread over the thread pool; the values never depend on which thread computed them.
#include "nibble/synth.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/format.h>

#include "nibble/error.h"
#include "nibble/safetensors.h"
#include "nibble/thread_pool.h"

namespace nibble {
namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t s = a ^ (b * 0xd1b54a32d192ed03ull);
  return splitmix64(s);
}
uint64_t hash_str(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// A small deterministic generator: uniform (0,1) and standard normals (Box-Muller, both values used).
struct Rng {
  uint64_t state;
  bool have_spare = false;
  float spare = 0;
  explicit Rng(uint64_t seed) : state(seed) {}
  double uniform() { return (double((splitmix64(state) >> 11)) + 0.5) * (1.0 / 9007199254740992.0); }
  float normal() {
    if (have_spare) { have_spare = false; return spare; }
    const double u1 = uniform(), u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1)), t = 6.283185307179586 * u2;
    spare = float(r * std::sin(t));
    have_spare = true;
    return float(r * std::cos(t));
  }
};

std::vector<int64_t> pick_channels(int64_t K, int64_t count, uint64_t seed) {
  count = std::clamp<int64_t>(count, 0, K);
  std::vector<int64_t> idx;
  Rng rng(seed);
  while (int64_t(idx.size()) < count) {
    const int64_t k = int64_t(rng.uniform() * double(K)) % K;
    if (std::find(idx.begin(), idx.end(), k) == idx.end()) idx.push_back(k);
  }
  std::sort(idx.begin(), idx.end());
  return idx;
}

void check_dims(int64_t a, int64_t b, const char* what) {
  if (a <= 0 || b <= 0) throw Error(fmt::format("{}: dimensions must be positive, got ({}, {})", what, a, b));
}

constexpr uint64_t kTagDominantU = 1, kTagDominantV = 2, kTagOutliers = 3, kTagOutlierGain = 4, kTagRows = 5;

}  // namespace

Tensor synth_weight(int64_t N, int64_t K, uint64_t seed, const SynthOptions& o) {
  check_dims(N, K, "synth_weight");
  const float sd = o.std > 0 ? o.std : float(1.0 / std::sqrt(double(K)));
  // Dominant rank-D part: σ_i u_i v_iᵀ with unit-norm-ish u, v and geometrically decaying σ_i.
  const int64_t D = std::max<int64_t>(0, o.n_dominant);
  std::vector<float> U(static_cast<size_t>(D * N)), V(static_cast<size_t>(D * K)), sigma(static_cast<size_t>(D));
  {
    Rng ru(mix(seed, kTagDominantU)), rv(mix(seed, kTagDominantV));
    const float su = float(1.0 / std::sqrt(double(N))), sv = float(1.0 / std::sqrt(double(K)));
    for (auto& u : U) u = ru.normal() * su;
    for (auto& v : V) v = rv.normal() * sv;
    const double base = o.dominant_gain * sd * std::sqrt(double(std::max(N, K)));
    for (int64_t i = 0; i < D; ++i) sigma[size_t(i)] = float(base * std::pow(0.7, double(i)));
  }
  // Outlier input channels: a column scale.
  std::vector<float> col_gain(size_t(K), 1.0f);
  {
    auto idx = pick_channels(K, o.n_outlier_channels, mix(seed, kTagOutliers));
    Rng rg(mix(seed, kTagOutlierGain));
    for (int64_t k : idx) col_gain[size_t(k)] = float(o.outlier_min + (o.outlier_max - o.outlier_min) * rg.uniform());
  }
  Tensor W = Tensor::empty(DType::F32, {N, K});
  float* w = W.mutable_data<float>();
  parallel_for_range(N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      Rng rng(mix(mix(seed, kTagRows), uint64_t(n)));
      float* row = w + n * K;
      for (int64_t k = 0; k < K; ++k) row[k] = rng.normal() * sd;
      for (int64_t i = 0; i < D; ++i) {
        const float a = sigma[size_t(i)] * U[size_t(i * N + n)];
        const float* v = V.data() + i * K;
        for (int64_t k = 0; k < K; ++k) row[k] += a * v[k];
      }
      for (int64_t k = 0; k < K; ++k) row[k] *= col_gain[size_t(k)];
    }
  });
  return W;
}

Tensor synth_bias(int64_t N, uint64_t seed) {
  check_dims(N, 1, "synth_bias");
  Tensor b = Tensor::empty(DType::F32, {N});
  Rng rng(mix(seed, 77));
  float* p = b.mutable_data<float>();
  for (int64_t n = 0; n < N; ++n) p[n] = 0.02f * rng.normal();
  return b;
}

std::vector<int64_t> synth_activation_outliers(int64_t K, uint64_t seed, const SynthActOptions& o) {
  return pick_channels(K, o.n_outlier_channels, mix(seed, kTagOutliers + 100));
}

Tensor synth_activations(int64_t M, int64_t K, uint64_t seed, const SynthActOptions& o) {
  check_dims(M, K, "synth_activations");
  std::vector<float> gain(size_t(K), o.std);
  {
    auto idx = synth_activation_outliers(K, seed, o);
    Rng rg(mix(seed, kTagOutlierGain + 100));
    for (int64_t k : idx) gain[size_t(k)] = o.std * float(o.outlier_min + (o.outlier_max - o.outlier_min) * rg.uniform());
  }
  Tensor X = Tensor::empty(DType::F32, {M, K});
  float* x = X.mutable_data<float>();
  parallel_for_range(M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      Rng rng(mix(mix(seed, kTagRows + 100), uint64_t(m)));
      float* row = x + m * K;
      for (int64_t k = 0; k < K; ++k) {
        float v = rng.normal() * gain[size_t(k)];
        if (o.post_gelu) {  // GELU(tanh)
          const float c = 0.7978845608f;
          v = 0.5f * v * (1.0f + std::tanh(c * (v + 0.044715f * v * v * v)));
        }
        row[k] = v;
      }
    }
  });
  return X;
}

std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> qwen_image_block_linears(int64_t D, int64_t F) {
  if (F <= 0) F = 4 * D;
  return {
      {"img_mod.1", {6 * D, D}},           {"txt_mod.1", {6 * D, D}},
      {"attn.to_q", {D, D}},               {"attn.to_k", {D, D}},
      {"attn.to_v", {D, D}},               {"attn.add_q_proj", {D, D}},
      {"attn.add_k_proj", {D, D}},         {"attn.add_v_proj", {D, D}},
      {"attn.to_out.0", {D, D}},           {"attn.to_add_out", {D, D}},
      {"img_mlp.net.0.proj", {F, D}},      {"txt_mlp.net.0.proj", {F, D}},
      {"img_mlp.net.2", {D, F}},           {"txt_mlp.net.2", {D, F}},
  };
}

uint64_t write_synth_qwen_image_checkpoint(const std::string& path, const SynthCheckpointOptions& o) {
  const int64_t D = o.hidden, F = o.mlp_hidden > 0 ? o.mlp_hidden : 4 * o.hidden;
  const int64_t J = o.joint_dim > 0 ? o.joint_dim : D;
  if (D <= 0 || o.head_dim <= 0 || D % o.head_dim != 0 || D % 64 != 0 || F % 64 != 0 || o.blocks < 0)
    throw Error(fmt::format("synth checkpoint: hidden {} must be a positive multiple of 64 and of head_dim {} "
                            "(mlp_hidden {} a multiple of 64, blocks {} ≥ 0)", D, o.head_dim, F, o.blocks));
  if (o.dtype != DType::BF16 && o.dtype != DType::F16 && o.dtype != DType::F32)
    throw Error(fmt::format("synth checkpoint: dtype must be BF16, F16 or F32, got {}", dtype_name(o.dtype)));

  // (name, kind, N, K): kind 0 = linear weight, 1 = bias, 2 = norm weight.
  struct Item { std::string name; int kind; int64_t N, K; };
  std::vector<Item> items;
  auto linear = [&](const std::string& n, int64_t N, int64_t K) {
    items.push_back({o.prefix + n + ".weight", 0, N, K});
    items.push_back({o.prefix + n + ".bias", 1, N, 0});
  };
  auto norm = [&](const std::string& n, int64_t W) { items.push_back({o.prefix + n, 2, W, 0}); };
  if (o.top_level) {
    linear("img_in", D, o.in_channels);
    norm("txt_norm.weight", J);
    linear("txt_in", D, J);
    linear("time_text_embed.timestep_embedder.linear_1", D, 256);
    linear("time_text_embed.timestep_embedder.linear_2", D, D);
  }
  for (int64_t b = 0; b < o.blocks; ++b) {
    const std::string bp = fmt::format("transformer_blocks.{}.", b);
    for (const auto& [rel, nk] : qwen_image_block_linears(D, F)) linear(bp + rel, nk.first, nk.second);
    for (const char* n : {"attn.norm_q.weight", "attn.norm_k.weight", "attn.norm_added_q.weight", "attn.norm_added_k.weight"})
      norm(bp + n, o.head_dim);
  }
  if (o.top_level) {
    linear("norm_out.linear", 2 * D, D);
    linear("proj_out", o.in_channels, D);
  }

  SafetensorsWriter writer(path, {{"format", "pt"}, {"nibble_synth", "qwen-image"}});
  for (const auto& it : items) {
    if (it.kind == 0) writer.add(it.name, o.dtype, {it.N, it.K});
    else writer.add(it.name, o.dtype, {it.N});
  }
  for (const auto& it : items) {
    const uint64_t s = mix(o.seed, hash_str(it.name));
    Tensor t;
    if (it.kind == 0) t = synth_weight(it.N, it.K, s, o.weight);
    else if (it.kind == 1) t = synth_bias(it.N, s);
    else {
      t = Tensor::empty(DType::F32, {it.N});
      Rng rng(s);
      float* p = t.mutable_data<float>();
      for (int64_t i = 0; i < it.N; ++i) p[i] = 1.0f + 0.1f * rng.normal();
    }
    writer.write_tensor(it.name, o.dtype == DType::F32 ? t : t.to(o.dtype));
  }
  const uint64_t size = writer.planned_file_size();
  writer.commit();
  return size;
}

}  // namespace nibble
