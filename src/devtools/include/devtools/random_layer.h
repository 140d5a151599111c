// devtools/random_layer.h — a random svdquant_w4a4 layer for the benchmarks (bf16 parameters, random
// codes; the arithmetic cost does not depend on the values) and the bytes its prepared repack streams.
#pragma once
#include <random>
#include <string>

#include "devtools/random_tensor.h"
#include "nibble/formats.h"

namespace nibble::bench {

inline LayerSource random_svdquant_source(std::mt19937& rng, const std::string& name, int64_t K, int64_t N,
                                          int64_t R) {
  LayerSource src;
  src.name = name;
  src.config = QuantConfig::parse(R"({"format":"svdquant_w4a4"})", src.name);
  Tensor q = Tensor::empty(DType::I8, {N, K / 2});
  for (int64_t j = 0; j < q.numel(); ++j) q.mutable_data<uint8_t>()[j] = uint8_t(rng());
  src.tensors["weight"] = q;
  src.tensors["weight_scale"] = random_tensor(rng, DType::BF16, {K / 64, N}, 0.001f, 0.02f);
  src.tensors["smooth_factor"] = random_tensor(rng, DType::BF16, {K}, 0.5f, 2.0f);
  src.tensors["proj_down"] = random_tensor(rng, DType::BF16, {K, R}, -0.05f, 0.05f);
  src.tensors["proj_up"] = random_tensor(rng, DType::BF16, {N, R}, -0.05f, 0.05f);
  src.tensors["bias"] = random_tensor(rng, DType::BF16, {N}, -0.1f, 0.1f);
  return src;
}

// The prepared repack a call streams: int4 weights, fp32 scales, fp32 up/down.
inline size_t svdquant_prepared_bytes(int64_t K, int64_t N, int64_t R) {
  return size_t(N * K / 2 + (K / 64) * N * 4 + N * R * 4 + K * R * 4);
}

}  // namespace nibble::bench
