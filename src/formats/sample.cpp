// write_sample_checkpoint(): a small kitchen-style checkpoint with every format (see sample.h).
//
// Tensors are drawn from one seeded mt19937_64 in a fixed order, so a given SampleOptions always
// produces the same bytes. Codes cover the whole nibble range (−8..7 signed, 0..15 unsigned), so
// decoders see every code; scales are positive and of realistic magnitude. The tile-packed layer is
// permuted here directly from the spec's index mapping (§3.2), independent of the runtime's own
// tile conversion, so tests can cross-check the two.
#include "nibble/sample.h"

#include <fmt/format.h>

#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "nibble/formats.h"
#include "nibble/safetensors.h"

namespace nibble {

namespace {

class SampleBuilder {
 public:
  SampleBuilder(const SampleOptions& o) : opt_(o), rng_(o.seed) {}

  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng_); }
  float normal(float sd) { return std::normal_distribution<float>(0.0f, sd)(rng_); }
  int code(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  Tensor floats(DType dt, Shape shape, float lo, float hi) {
    Tensor t = Tensor::empty(dt, shape);
    for (int64_t i = 0; i < t.numel(); ++i) store(t, i, uniform(lo, hi));
    return t;
  }
  Tensor gaussian(DType dt, Shape shape, float sd) {
    Tensor t = Tensor::empty(dt, shape);
    for (int64_t i = 0; i < t.numel(); ++i) store(t, i, normal(sd));
    return t;
  }
  // Packed nibbles (rows, cols/2) I8, low nibble = even column; codes uniform in [lo, hi].
  Tensor nibbles(int64_t rows, int64_t cols, int lo, int hi, bool even_high = false) {
    Tensor t = Tensor::empty(even_high ? DType::U8 : DType::I8, {rows, cols / 2});
    uint8_t* p = t.mutable_data<uint8_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      const int a = code(lo, hi), b = code(lo, hi);
      p[i] = even_high ? pack_nibbles(b, a) : pack_nibbles(a, b);
    }
    return t;
  }
  Tensor bytes(DType dt, Shape shape, int lo, int hi) {
    Tensor t = Tensor::empty(dt, shape);
    uint8_t* p = t.mutable_data<uint8_t>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = uint8_t(code(lo, hi));
    return t;
  }
  // fp8 e4m3 bytes of uniform values in [lo, hi] (finite by construction).
  Tensor e4m3(DType dt, Shape shape, float lo, float hi) {
    Tensor t = Tensor::empty(dt, shape);
    uint8_t* p = t.mutable_data<uint8_t>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = f32_to_fp8_e4m3(uniform(lo, hi));
    return t;
  }
  static Tensor scalar(float v, Shape shape = {}) {
    Tensor t = Tensor::empty(DType::F32, shape);
    t.mutable_data<float>()[0] = v;
    return t;
  }

  void add(const std::string& layer, const std::string& suffix, const Tensor& t) {
    tensors_.emplace_back(opt_.prefix + layer + "." + suffix, t);
  }
  void add_plain(const std::string& name, const Tensor& t) { tensors_.emplace_back(opt_.prefix + name, t); }
  void config(const std::string& layer, nlohmann::ordered_json cfg) {
    const std::string text = cfg.dump();
    QuantConfig::parse(text, layer);  // the generator only writes configs nibble accepts
    if (opt_.configs_in_metadata) {
      meta_layers_[opt_.prefix + layer] = cfg;
    } else {
      add(layer, "comfy_quant", Tensor::from_bytes(DType::U8, {int64_t(text.size())}, text.data(), text.size()));
    }
  }
  void write(const std::string& path) {
    std::map<std::string, std::string> metadata;
    if (opt_.configs_in_metadata) {
      nlohmann::ordered_json m;
      m["format_version"] = "1.0";
      m["layers"] = meta_layers_;
      metadata["_quantization_metadata"] = m.dump();
    }
    save_safetensors(path, tensors_, metadata);
  }

 private:
  static void store(Tensor& t, int64_t i, float v) {
    switch (t.dtype()) {
      case DType::F32: t.mutable_data<float>()[i] = v; break;
      case DType::BF16: t.mutable_data<uint16_t>()[i] = f32_to_bf16(v); break;
      case DType::F16: t.mutable_data<uint16_t>()[i] = f32_to_f16(v); break;
      default: throw Error("internal: sample store dtype");
    }
  }
  const SampleOptions& opt_;
  std::mt19937_64 rng_;
  std::vector<std::pair<std::string, Tensor>> tensors_;
  nlohmann::ordered_json meta_layers_ = nlohmann::ordered_json::object();
};

// ---- tile packing straight from the spec's index mapping (§3.2)
Tensor tile_weight(const Tensor& nat, int64_t N, int64_t K) {
  Tensor t = Tensor::empty(DType::I8, {N / 128, K / 64, 32, 128});
  const uint8_t* s = nat.data<uint8_t>();
  uint8_t* d = t.mutable_data<uint8_t>();
  for (int64_t tt = 0; tt < N / 128; ++tt)
    for (int64_t g = 0; g < K / 64; ++g)
      for (int64_t q = 0; q < 32; ++q)
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t b = 0; b < 32; ++b)
            d[((tt * (K / 64) + g) * 32 + q) * 128 + i * 32 + b] = s[(tt * 128 + 4 * q + i) * (K / 2) + g * 32 + b];
  return t;
}
Tensor tile_scales(const Tensor& nat, int64_t N, int64_t K) {  // (K/64, N) → (N/128, K/64, 128)
  Tensor t = Tensor::empty(nat.dtype(), {N / 128, K / 64, 128});
  const uint16_t* s = nat.data<uint16_t>();
  uint16_t* d = t.mutable_data<uint16_t>();
  for (int64_t tt = 0; tt < N / 128; ++tt)
    for (int64_t g = 0; g < K / 64; ++g)
      for (int64_t j = 0; j < 128; ++j) d[(tt * (K / 64) + g) * 128 + j] = s[g * N + tt * 128 + j];
  return t;
}
Tensor tile_up(const Tensor& nat, int64_t N, int64_t R) {  // (N, R) → (N/128, R, 128)
  Tensor t = Tensor::empty(nat.dtype(), {N / 128, R, 128});
  const uint16_t* s = nat.data<uint16_t>();
  uint16_t* d = t.mutable_data<uint16_t>();
  for (int64_t tt = 0; tt < N / 128; ++tt)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < 128; ++j) d[(tt * R + r) * 128 + j] = s[(tt * 128 + j) * R + r];
  return t;
}

struct SvdShared {
  Tensor smooth, proj_down;
};

void svdquant_layer(SampleBuilder& b, const std::string& name, int64_t N, int64_t K, int64_t R,
                    const SvdShared& shared, bool kitchen_spelling, bool tile, bool act_unsigned) {
  nlohmann::ordered_json cfg;
  cfg["format"] = "svdquant_w4a4";
  if (act_unsigned) cfg["act_unsigned"] = true;
  if (tile) cfg["layout"] = "kitchen_tile_packed_w4a4";
  cfg["lowrank_branch_input_basis"] = "raw";
  cfg["proj_down_smooth_folded"] = true;
  b.config(name, cfg);
  Tensor w = b.nibbles(N, K, -8, 7);
  Tensor s = b.floats(DType::BF16, {K / 64, N}, 0.002f, 0.02f);
  Tensor up = b.gaussian(DType::BF16, {N, R}, 0.05f);
  b.add(name, "weight", tile ? tile_weight(w, N, K) : w);
  b.add(name, "weight_scale", tile ? tile_scales(s, N, K) : s);
  const std::string pre = kitchen_spelling ? "weight_" : "";
  b.add(name, pre + "smooth_factor", shared.smooth);
  b.add(name, pre + "proj_down", shared.proj_down);
  b.add(name, pre + "proj_up", tile ? tile_up(up, N, R) : up);
  b.add(name, "bias", b.gaussian(DType::BF16, {N}, 0.1f));
}

}  // namespace

void write_sample_checkpoint(const std::string& path, const SampleOptions& o) {
  const int64_t D = o.hidden, F = 4 * o.hidden, R = o.rank;
  if (D <= 0 || D % 128 != 0)
    throw Error(fmt::format("sample checkpoint: hidden must be a positive multiple of 128, got {}", D));
  if (R <= 0 || R > 1024) throw Error(fmt::format("sample checkpoint: rank must be in [1, 1024], got {}", R));
  SampleBuilder b(o);
  const std::string blk = "transformer_blocks.0.";

  // AWQ modulation (CQ converter spelling `weight_zero`).
  {
    const std::string name = blk + "img_mod.1";
    nlohmann::ordered_json cfg;
    cfg["format"] = "awq_w4a16";
    cfg["group_size"] = 64;
    b.config(name, cfg);
    b.add(name, "weight", b.nibbles(6 * D, D, 0, 15));
    b.add(name, "weight_scale", b.floats(DType::BF16, {D / 64, 6 * D}, 0.001f, 0.01f));
    b.add(name, "weight_zero", b.gaussian(DType::BF16, {D / 64, 6 * D}, 0.02f));
    b.add(name, "bias", b.gaussian(DType::BF16, {6 * D}, 0.1f));
  }
  // SVDQuant: the QKV triple shares smooth/proj_down (spec §3.8).
  SvdShared qkv{b.floats(DType::BF16, {D}, 0.5f, 2.0f), b.gaussian(DType::BF16, {D, R}, 0.05f)};
  for (const char* n : {"attn.to_q", "attn.to_k", "attn.to_v"})
    svdquant_layer(b, blk + n, D, D, R, qkv, false, false, false);
  SvdShared out{b.floats(DType::BF16, {D}, 0.5f, 2.0f), b.gaussian(DType::BF16, {D, R}, 0.05f)};
  svdquant_layer(b, blk + "attn.to_out.0", D, D, R, out, true, false, false);
  SvdShared fc1{b.floats(DType::BF16, {D}, 0.5f, 2.0f), b.gaussian(DType::BF16, {D, R}, 0.05f)};
  svdquant_layer(b, blk + "img_mlp.net.0.proj", F, D, R, fc1, false, true, false);
  SvdShared fc2{b.floats(DType::BF16, {F}, 0.5f, 2.0f), b.gaussian(DType::BF16, {F, R}, 0.05f)};
  svdquant_layer(b, blk + "img_mlp.net.2", D, F, R, fc2, true, false, true);

  // Float layers: two that a kitchen format could hold, one that the int4 bundles keep float.
  b.add(blk + "txt_mod.1", "weight", b.gaussian(DType::BF16, {6 * D, D}, 0.02f));
  b.add(blk + "txt_mod.1", "bias", b.gaussian(DType::BF16, {6 * D}, 0.1f));
  b.add(blk + "attn.add_q_proj", "weight", b.gaussian(DType::F16, {D, D}, 0.02f));
  b.add(blk + "attn.add_q_proj", "bias", b.gaussian(DType::F16, {D}, 0.1f));
  b.add("img_in", "weight", b.gaussian(DType::F32, {D, 64}, 0.05f));
  b.add("img_in", "bias", b.gaussian(DType::F32, {D}, 0.1f));
  // Non-linear tensors: an RMSNorm weight and a rank-3 table.
  b.add(blk + "attn.norm_q", "weight", b.floats(DType::BF16, {128}, 0.8f, 1.2f));
  b.add_plain("rope.freqs", b.gaussian(DType::F32, {64, 2, 2}, 1.0f));

  // One layer of every other kitchen format (K = 256 so that one convrot group fits).
  const int64_t N = 128, K = 256;
  for (const char* f8 : {"float8_e4m3fn", "float8_e5m2"}) {
    const std::string name = std::string("extra.") + f8;
    const bool e4 = find_format(f8)->storage_dtype == DType::F8_E4M3;
    b.config(name, nlohmann::ordered_json{{"format", f8}});
    Tensor w = Tensor::empty(e4 ? DType::F8_E4M3 : DType::F8_E5M2, {N, K});
    uint8_t* p = w.mutable_data<uint8_t>();
    for (int64_t i = 0; i < w.numel(); ++i)
      p[i] = e4 ? f32_to_fp8_e4m3(b.normal(100.0f)) : f32_to_fp8_e5m2(b.normal(100.0f));
    b.add(name, "weight", w);
    b.add(name, "weight_scale", SampleBuilder::scalar(b.uniform(1e-4f, 1e-3f), e4 ? Shape{} : Shape{1}));
    b.add(name, "input_scale", SampleBuilder::scalar(b.uniform(0.5f, 2.0f)));
    b.add(name, "bias", b.gaussian(DType::BF16, {N}, 0.1f));
  }
  {  // nvfp4 with N, K/16 not multiples of the 128×4 swizzle tile: padding is exercised.
    const std::string name = "extra.nvfp4";
    const int64_t n = 144, k = 272;
    b.config(name, nlohmann::ordered_json{{"format", "nvfp4"}});
    b.add(name, "weight", b.nibbles(n, k, 0, 15, /*even_high=*/true));
    b.add(name, "weight_scale", b.e4m3(DType::F8_E4M3, {256, 20}, 0.25f, 8.0f));
    b.add(name, "weight_scale_2", SampleBuilder::scalar(b.uniform(1e-3f, 1e-2f)));
    b.add(name, "input_scale", SampleBuilder::scalar(b.uniform(0.5f, 2.0f)));
  }
  {  // mxfp8, padded likewise; exponent byte 0 (a zero scale) occurs among the draws.
    const std::string name = "extra.mxfp8";
    const int64_t n = 160, k = 288;
    b.config(name, nlohmann::ordered_json{{"format", "mxfp8"}});
    b.add(name, "weight", b.e4m3(DType::F8_E4M3, {n, k}, -400.0f, 400.0f));
    Tensor s = b.bytes(DType::U8, {256, 12}, 110, 130);
    s.mutable_data<uint8_t>()[0] = 0;
    b.add(name, "weight_scale", s);
    b.add(name, "bias", b.gaussian(DType::BF16, {n}, 0.1f));
  }
  {  // int8_tensorwise: per-tensor scale, no rotation
    const std::string name = "extra.int8_tensorwise";
    b.config(name, nlohmann::ordered_json{{"format", "int8_tensorwise"}});
    b.add(name, "weight", b.bytes(DType::I8, {N, K}, 0, 255));
    b.add(name, "weight_scale", SampleBuilder::scalar(b.uniform(1e-4f, 1e-3f)));
  }
  {  // int8_tensorwise with convrot and per-row scales; the group keys in the nested "params"
    const std::string name = "extra.int8_tensorwise_convrot";
    b.config(name, nlohmann::ordered_json{{"format", "int8_tensorwise"}, {"per_row", true},
                                          {"params", {{"convrot", true}, {"convrot_groupsize", 256}}}});
    b.add(name, "weight", b.bytes(DType::I8, {N, K}, 0, 255));
    b.add(name, "weight_scale", b.floats(DType::F32, {N, 1}, 1e-4f, 1e-3f));
  }
  {
    const std::string name = "extra.int4_tensorwise";
    b.config(name, nlohmann::ordered_json{{"format", "int4_tensorwise"}});
    b.add(name, "weight", b.nibbles(N, K, -8, 7));
    b.add(name, "weight_scale", b.floats(DType::F32, {N, 1}, 1e-3f, 1e-2f));
  }
  {
    const std::string name = "extra.convrot_w4a4";
    b.config(name, nlohmann::ordered_json{{"format", "convrot_w4a4"}, {"convrot_groupsize", 256}, {"linear_dtype", "int4"}});
    b.add(name, "weight", b.nibbles(N, K, -8, 7));
    b.add(name, "weight_scale", b.floats(DType::F32, {N}, 1e-3f, 1e-2f));
    b.add(name, "bias", b.gaussian(DType::F32, {N}, 0.1f));
  }
  {  // asym_w4a8_int8 with a codebook; |v·s_rel| reaches past 127, so the clamp is exercised.
    const std::string name = "extra.asym_w4a8_int8";
    b.config(name, nlohmann::ordered_json{{"format", "asym_w4a8_int8"}, {"group_size", 16}, {"convrot_groupsize", 256}});
    b.add(name, "weight", b.nibbles(N, K, 0, 15));
    b.add(name, "weight_s_rel", b.e4m3(DType::F8_E4M3, {N, K / 16}, 2.0f, 20.0f));
    b.add(name, "weight_s_channel", b.floats(DType::F32, {N}, 1e-4f, 1e-3f));
    Tensor cb = Tensor::empty(DType::F32, {16});
    for (int c = 0; c < 16; ++c) cb.mutable_data<float>()[c] = float(c - 8) + b.uniform(-0.4f, 0.4f);
    b.add(name, "weight_codebook", cb);
  }
  b.write(path);
}

}  // namespace nibble
