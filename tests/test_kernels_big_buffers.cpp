// Tensor buffers of 4 MiB and more: mapped directly and reused through a small cache once freed
// (src/core/tensor.cpp; the per-call page faults it removes cost the M = 4096 W4A4 layer ~15 % of its
// CPU time). A reused block must hold the whole request, zeros() must still be zero, and tensors
// alive at the same time never share memory.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "nibble/tensor.h"

using namespace nibble;

namespace {
void fill_and_check(Tensor& t, float base) {
  float* p = t.mutable_data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = base + float(i % 1000);
  for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(p[i], base + float(i % 1000)) << i;
}
}  // namespace

TEST(BigBuffers, ReusedBlocksHoldTheRequestAndZerosAreZero) {
  const int64_t n = int64_t(3) << 20;  // 12 MiB of fp32
  for (int round = 0; round < 3; ++round) {
    {
      Tensor a = Tensor::empty(DType::F32, {n});
      fill_and_check(a, 1.0f);
    }
    // slightly larger and slightly smaller requests than the freed block (within its reuse window)
    for (int64_t m : {n + 4096, n - 4096, n}) {
      Tensor b = Tensor::empty(DType::F32, {m});
      fill_and_check(b, 2.0f);
    }
    Tensor z = Tensor::zeros(DType::F32, {n});
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(z.data<float>()[i], 0.0f) << i;
  }
}

TEST(BigBuffers, LiveTensorsNeverShareMemory) {
  const int64_t n = int64_t(1) << 21;  // 8 MiB
  std::vector<Tensor> live;
  for (int i = 0; i < 12; ++i) {  // more than the cache keeps, freed and re-requested in turns
    if (i % 3 == 2) live.erase(live.begin());
    live.push_back(Tensor::empty(DType::F32, {n + 1024 * i}));
    live.back().mutable_data<float>()[0] = float(i);
    for (size_t a = 0; a < live.size(); ++a)
      for (size_t b = a + 1; b < live.size(); ++b) {
        const auto* pa = static_cast<const uint8_t*>(live[a].raw());
        const auto* pb = static_cast<const uint8_t*>(live[b].raw());
        const bool disjoint = pa + live[a].nbytes() <= pb || pb + live[b].nbytes() <= pa;
        ASSERT_TRUE(disjoint) << "tensors " << a << " and " << b << " overlap";
      }
  }
  for (size_t a = 0; a < live.size(); ++a) live[a].mutable_data<float>()[live[a].numel() - 1] = 1.0f;  // whole range
}

// Weight buffers (Tensor::empty_weights: prepared weights kept for a model's life): from 2 MiB up
// they are 2 MiB-aligned mappings advised for huge pages (unless NIBBLE_HUGEPAGES=0), below that
// ordinary 64-byte-aligned buffers; every size holds its whole request, and freeing returns the
// mapping (many rounds of allocations leave no growth the test could see as a crash).
TEST(BigBuffers, WeightBuffersHoldTheRequestAndAreAligned) {
  const char* env = std::getenv("NIBBLE_HUGEPAGES");
  const bool advice = !(env && std::string(env) == "0");
  for (int round = 0; round < 20; ++round)
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(100), (int64_t(2) << 20) / 4 - 1, (int64_t(2) << 20) / 4,
                      (int64_t(5) << 20) / 4 + 3}) {
      Tensor t = Tensor::empty_weights(DType::F32, {n});
      ASSERT_EQ(t.numel(), n);
      ASSERT_TRUE(t.writable());
      const auto a = reinterpret_cast<uintptr_t>(t.raw());
      EXPECT_EQ(a % 64, 0u) << n;
      if (advice && t.nbytes() >= (size_t(2) << 20)) {
        EXPECT_EQ(a % (uintptr_t(2) << 20), 0u) << n;
      }
      if (round == 0 && n > 0) fill_and_check(t, 3.0f);
    }
}

// The diagnostic line of `nibble --version` and the AWQ benchmark header.
TEST(BigBuffers, WeightPageStatusNamesTheSetting) {
  const std::string st = weights_hugepage_status();
  const char* env = std::getenv("NIBBLE_HUGEPAGES");
  if (env && std::string(env) == "0") EXPECT_EQ(st, "off (NIBBLE_HUGEPAGES=0)");
  else EXPECT_NE(st.find("THP"), std::string::npos) << st;
}
