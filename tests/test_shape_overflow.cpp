// Shape arithmetic on sizes from files: zero-element shapes with huge dimensions ([0, 2^62]) must
// neither overflow int64 (UB; make test-asan makes it fatal) nor be mistaken for valid layers.
// shape_numel checks the product of the non-zero dimensions; every derived size goes through
// checked_mul (src/core/shape_math.h). Found by fuzz/fuzz_dequantize.cpp's review of the shape code.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <string>

#include "core/shape_math.h"
#include "nibble/error.h"
#include "nibble/formats.h"
#include "nibble/ops.h"
#include "nibble/tensor.h"

using namespace nibble;

namespace {
constexpr int64_t k62 = int64_t(1) << 62;

void expect_error_with(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

LayerSource layer(const std::string& config, std::map<std::string, Tensor> tensors) {
  LayerSource s;
  s.name = "blk.0.fc";
  s.config = QuantConfig::parse(config, s.name);
  s.tensors = std::move(tensors);
  return s;
}
}  // namespace

TEST(ShapeOverflow, NumelChecksTheNonZeroDimensions) {
  EXPECT_EQ(shape_numel({0, k62}), 0);
  EXPECT_EQ(shape_numel({k62, 0}), 0);
  EXPECT_EQ(shape_numel({0, k62, 1}), 0);
  EXPECT_EQ(shape_numel({}), 1);
  EXPECT_EQ(shape_numel({3, 0, 5}), 0);
  // zero elements, but 2^62 · 4 overflows: rejected whatever the order of the dimensions
  EXPECT_THROW(shape_numel({0, k62, 4}), Error);
  EXPECT_THROW(shape_numel({k62, 4, 0}), Error);
  EXPECT_THROW(shape_numel({k62, 0, 4}), Error);
  EXPECT_THROW(shape_numel({k62, 4}), Error);
  EXPECT_THROW(shape_numel({-1, 0}), Error);
  EXPECT_EQ(shape_numel({int64_t(1) << 31, int64_t(1) << 31}), int64_t(1) << 62);
}

TEST(ShapeOverflow, ZeroElementTensorsHaveZeroBytes) {
  const Tensor t = Tensor::empty(DType::I8, {0, k62});
  EXPECT_EQ(t.numel(), 0);
  EXPECT_EQ(t.nbytes(), 0u);
  const Tensor f4 = Tensor::empty(DType::F4, {k62, 0});
  EXPECT_EQ(f4.nbytes(), 0u);
  EXPECT_THROW(Tensor::empty(DType::F32, {k62}), Error);  // 2^62 · 4 bytes: the byte count overflows
}

TEST(ShapeOverflow, CheckedMul) {
  EXPECT_EQ(checked_mul(2, k62 - 1, "x"), 2 * (k62 - 1));
  EXPECT_EQ(checked_mul(0, INT64_MAX, "x"), 0);
  expect_error_with([] { checked_mul(2, k62, "layer 'a': K = 2·shape[1]"); }, "layer 'a': K = 2·shape[1]");
  expect_error_with([] { checked_mul(k62, 128, "N"); }, "overflows int64");
  EXPECT_THROW(checked_mul(-k62, 4, "neg"), Error);
}

TEST(ShapeOverflow, BindRejectsPackedWeightsWhoseKOverflows) {
  // I8 (N, K/2) weights of the nibble-packed formats: K = 2·2^62 does not fit in int64
  const Tensor w = Tensor::empty(DType::I8, {0, k62});
  const Tensor s = Tensor::empty(DType::BF16, {0, 0});
  expect_error_with([&] {
    bind_layer(layer(R"({"format": "awq_w4a16", "group_size": 64})",
                     {{"weight", w}, {"weight_scale", s}, {"weight_zeros", s}}));
  }, "overflows int64");
  expect_error_with([&] {
    bind_layer(layer(R"({"format": "svdquant_w4a4"})", {{"weight", w},
                                                         {"weight_scale", s},
                                                         {"smooth_factor", Tensor::empty(DType::BF16, {0})},
                                                         {"proj_down", s},
                                                         {"proj_up", s}}));
  }, "overflows int64");
  // (the tile-packed (N/128, K/64, 32, 128) weight cannot get there: 32·128·shape[i] for the
  // non-zero dimensions already has to fit, so 128·shape[0] and 64·shape[1] do)
  EXPECT_THROW(Tensor::empty(DType::I8, {0, int64_t(1) << 57, 32, 128}), Error);
}

TEST(ShapeOverflow, OpsRejectOverflowingPackedShapes) {
  const Tensor act = Tensor::empty(DType::I8, {0, k62});
  const Tensor e = Tensor::empty(DType::BF16, {0, 0});
  expect_error_with([&] { scaled_mm_svdquant_w4a4(act, act, e, e, e, e, Tensor(), false); }, "overflows int64");
  const Tensor x = Tensor::empty(DType::F32, {0, 64});
  // qweight (0, 2^62): K = 2·2^62 is an error, not a wrapped value
  expect_error_with([&] { gemv_awq_w4a16(x, act, e, e, Tensor(), 64); }, "overflows int64");
}
