// collect_layers / has_quant_configs (spec §4.1): `.comfy_quant` tensors, `_quantization_metadata`,
// the legacy scaled_fp8 convention, prefixes kept, non-linear tensors skipped, natural order.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nibble/formats.h"
#include "test_io_common.h"

using namespace nibble;
using nibble::testing_io::ScratchDir;
using ::testing::HasSubstr;

namespace {

Tensor f32(Shape s, float v = 0.5f) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<float>()[i] = v;
  return t;
}
Tensor fp8(Shape s, DType dt = DType::F8_E4M3) {
  Tensor t = Tensor::empty(dt, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data<uint8_t>()[i] = uint8_t(0x38 + i % 5);
  return t;
}
Tensor json_tensor(const std::string& s) { return Tensor::from_bytes(DType::U8, {int64_t(s.size())}, s.data(), s.size()); }

const LayerSource* find(const std::vector<LayerSource>& v, const std::string& name) {
  for (const auto& l : v)
    if (l.name == name) return &l;
  return nullptr;
}
std::vector<std::string> names(const std::vector<LayerSource>& v) {
  std::vector<std::string> r;
  for (const auto& l : v) r.push_back(l.name);
  return r;
}

}  // namespace

TEST(FormatsLayers, ComfyQuantTensorsAndFloatLayers) {
  ScratchDir dir;
  const std::string p = dir.file("a.safetensors");
  save_safetensors(p, {
                          {"model.diffusion_model.blocks.10.lin.weight", fp8({4, 8})},
                          {"model.diffusion_model.blocks.10.lin.weight_scale", f32({})},
                          {"model.diffusion_model.blocks.10.lin.comfy_quant", json_tensor(R"({"format":"float8_e4m3fn"})")},
                          {"model.diffusion_model.blocks.2.lin.weight", f32({4, 8})},
                          {"model.diffusion_model.blocks.2.lin.bias", f32({4})},
                          {"model.diffusion_model.blocks.2.norm.weight", f32({8})},
                          {"model.diffusion_model.pe", f32({2, 2, 2})},
                      });
  const Checkpoint ck = Checkpoint::open(p);
  EXPECT_TRUE(has_quant_configs(ck));
  const auto layers = collect_layers(ck);
  // prefixes kept; natural order (2 before 10); norm (1-D) and rank-3 tensors are not layers
  EXPECT_THAT(names(layers), ::testing::ElementsAre("model.diffusion_model.blocks.2.lin",
                                                     "model.diffusion_model.blocks.10.lin"));
  const LayerSource* q = find(layers, "model.diffusion_model.blocks.10.lin");
  ASSERT_TRUE(q && q->config);
  EXPECT_EQ(q->config->format, "float8_e4m3fn");
  EXPECT_EQ(q->tensors.size(), 2u);  // weight, weight_scale (comfy_quant is the config, not a tensor)
  EXPECT_TRUE(q->tensors.count("weight_scale"));
  const LayerSource* f = find(layers, "model.diffusion_model.blocks.2.lin");
  ASSERT_TRUE(f);
  EXPECT_FALSE(f->config.has_value());
  EXPECT_TRUE(f->tensors.count("bias"));
  EXPECT_THAT(names(collect_layers(ck, true)), ::testing::ElementsAre("model.diffusion_model.blocks.10.lin"));
  const QuantizedLayer b = bind_layer(*q);
  EXPECT_EQ(b.N, 4);
  EXPECT_EQ(b.K, 8);
}

TEST(FormatsLayers, NoConfigsMeansNoMixedOps) {
  ScratchDir dir;
  const std::string p = dir.file("plain.safetensors");
  save_safetensors(p, {{"lin.weight", f32({4, 8})}});
  const Checkpoint ck = Checkpoint::open(p);
  EXPECT_FALSE(has_quant_configs(ck));
  EXPECT_EQ(collect_layers(ck).size(), 1u);
  EXPECT_TRUE(collect_layers(ck, true).empty());
}

TEST(FormatsLayers, BadComfyQuantTensor) {
  ScratchDir dir;
  const std::string p = dir.file("bad.safetensors");
  save_safetensors(p, {{"lin.weight", fp8({4, 8})}, {"lin.comfy_quant", f32({3})}});
  EXPECT_THAT([&] { collect_layers(Checkpoint::open(p)); }, ::testing::ThrowsMessage<Error>(HasSubstr("lin.comfy_quant")));
  const std::string q = dir.file("badjson.safetensors");
  save_safetensors(q, {{"lin.weight", fp8({4, 8})}, {"lin.comfy_quant", json_tensor(R"({"group_size":1})")}});
  EXPECT_THAT([&] { collect_layers(Checkpoint::open(q)); },
              ::testing::ThrowsMessage<Error>(::testing::AllOf(HasSubstr("'lin'"), HasSubstr("'format' is missing"))));
}

TEST(FormatsLayers, QuantizationMetadata) {
  ScratchDir dir;
  const std::string p = dir.file("meta.safetensors");
  const std::string meta =
      R"({"format_version":"1.0","layers":{"a.lin":{"format":"float8_e5m2"},"b.lin":{"format":"int8_tensorwise","per_row":true}}})";
  Tensor i8 = Tensor::zeros(DType::I8, {4, 8});
  save_safetensors(p,
                   {{"a.lin.weight", fp8({4, 8}, DType::F8_E5M2)},
                    {"a.lin.weight_scale", f32({1})},
                    {"b.lin.weight", i8},
                    {"b.lin.weight_scale", f32({4, 1})},
                    {"c.lin.weight", f32({2, 2})}},
                   {{"_quantization_metadata", meta}});
  const Checkpoint ck = Checkpoint::open(p);
  EXPECT_TRUE(has_quant_configs(ck));
  const auto layers = collect_layers(ck);
  ASSERT_EQ(layers.size(), 3u);
  EXPECT_EQ(find(layers, "a.lin")->config->format, "float8_e5m2");
  EXPECT_EQ(find(layers, "b.lin")->config->per_row, true);
  EXPECT_FALSE(find(layers, "c.lin")->config.has_value());
  for (const auto& l : layers) EXPECT_NO_THROW(bind_layer(l)) << l.name;

  // malformed metadata is an error naming the file and the key
  const std::string q = dir.file("badmeta.safetensors");
  save_safetensors(q, {{"a.lin.weight", f32({2, 2})}}, {{"_quantization_metadata", R"({"layers":[1]})"}});
  EXPECT_THAT([&] { collect_layers(Checkpoint::open(q)); },
              ::testing::ThrowsMessage<Error>(HasSubstr("_quantization_metadata")));
  const std::string r = dir.file("badmeta2.safetensors");
  save_safetensors(r, {{"a.lin.weight", f32({2, 2})}},
                   {{"_quantization_metadata", R"({"layers":{"a.lin":{"format":5}}})"}});
  EXPECT_THAT([&] { collect_layers(Checkpoint::open(r)); },
              ::testing::ThrowsMessage<Error>(::testing::AllOf(HasSubstr("'a.lin'"), HasSubstr("'format'"))));
  // an entry without tensors is still reported, and binding it names the missing weight
  const std::string s = dir.file("ghost.safetensors");
  save_safetensors(s, {{"a.lin.weight", f32({2, 2})}},
                   {{"_quantization_metadata", R"({"layers":{"ghost":{"format":"float8_e4m3fn"}}})"}});
  const auto g = collect_layers(Checkpoint::open(s));
  ASSERT_TRUE(find(g, "ghost"));
  EXPECT_THAT([&] { bind_layer(*find(g, "ghost")); },
              ::testing::ThrowsMessage<Error>(::testing::AllOf(HasSubstr("'ghost'"), HasSubstr("ghost.weight"))));
}

TEST(FormatsLayers, LegacyScaledFp8) {
  ScratchDir dir;
  for (int marker_elems : {1, 2}) {
    const std::string p = dir.file("legacy" + std::to_string(marker_elems) + ".safetensors");
    Tensor one = f32({}, 1.0f), two = f32({}, 2.0f);
    save_safetensors(p, {
                            {"model.diffusion_model.scaled_fp8", fp8({marker_elems})},
                            {"model.diffusion_model.x.weight", fp8({4, 8})},
                            {"model.diffusion_model.x.scale_weight", f32({}, 0.25f)},
                            {"model.diffusion_model.x.scale_input", one},
                            {"model.diffusion_model.y.weight", fp8({4, 8})},
                            {"model.diffusion_model.y.scale_weight", f32({}, 0.5f)},
                            {"model.diffusion_model.y.scale_input", two},
                            {"model.diffusion_model.z.weight", fp8({4, 8}, DType::F8_E5M2)},
                            {"model.diffusion_model.z.scale_weight", f32({}, 0.5f)},
                            {"model.diffusion_model.norm.weight", f32({8})},
                        });
    const Checkpoint ck = Checkpoint::open(p);
    EXPECT_TRUE(has_quant_configs(ck));
    const auto layers = collect_layers(ck);
    EXPECT_THAT(names(layers), ::testing::ElementsAre("model.diffusion_model.x", "model.diffusion_model.y",
                                                       "model.diffusion_model.z"));
    const LayerSource* x = find(layers, "model.diffusion_model.x");
    ASSERT_TRUE(x->config);
    EXPECT_EQ(x->config->format, "float8_e4m3fn");
    EXPECT_EQ(x->config->full_precision_matrix_mult, marker_elems == 2);
    EXPECT_TRUE(x->tensors.count("weight_scale"));
    EXPECT_FALSE(x->tensors.count("scale_weight"));
    EXPECT_FALSE(x->tensors.count("input_scale"));  // 1.0 is dropped
    EXPECT_FALSE(x->tensors.count("scale_input"));
    const LayerSource* y = find(layers, "model.diffusion_model.y");
    ASSERT_TRUE(y->tensors.count("input_scale"));
    EXPECT_EQ(y->tensors.at("input_scale").data<float>()[0], 2.0f);
    // an e5m2 weight under the legacy convention binds as float8_e5m2
    EXPECT_EQ(find(layers, "model.diffusion_model.z")->config->format, "float8_e5m2");
    for (const auto& l : layers) {
      const QuantizedLayer b = bind_layer(l);
      const Tensor w = dequantize(b);
      const float scale = l.tensors.at("weight_scale").data<float>()[0];
      const Tensor& raw = l.tensors.at("weight");
      for (int64_t i = 0; i < w.numel(); ++i) {
        const uint8_t c = raw.data<uint8_t>()[i];
        const float v = raw.dtype() == DType::F8_E4M3 ? fp8_e4m3_to_f32(c) : fp8_e5m2_to_f32(c);
        ASSERT_EQ(w.data<float>()[i], v * scale);
      }
    }
  }
}

TEST(FormatsLayers, MetadataDisablesLegacy) {
  ScratchDir dir;
  const std::string p = dir.file("both.safetensors");
  save_safetensors(p,
                   {{"scaled_fp8", fp8({1})}, {"x.weight", fp8({4, 8})}, {"x.scale_weight", f32({})}},
                   {{"_quantization_metadata", R"({"format_version":"1.0","layers":{}})"}});
  const auto layers = collect_layers(Checkpoint::open(p));
  ASSERT_EQ(layers.size(), 1u);
  EXPECT_FALSE(layers[0].config.has_value());
  EXPECT_TRUE(layers[0].tensors.count("scale_weight"));  // untouched
}
