// Core types: tensor storage, ISA selection, the thread pool's determinism contract.
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "nibble/isa.h"
#include "nibble/tensor.h"
#include "nibble/thread_pool.h"

using namespace nibble;

TEST(Tensor, EmptyReshapeClone) {
  Tensor t = Tensor::zeros(DType::F32, {3, 4});
  EXPECT_EQ(t.numel(), 12);
  EXPECT_EQ(t.nbytes(), 48u);
  t.mutable_data<float>()[5] = 2.5f;
  Tensor r = t.reshape({12});
  EXPECT_EQ(r.data<float>()[5], 2.5f);
  Tensor c = t.clone();
  t.mutable_data<float>()[5] = 1.0f;
  EXPECT_EQ(c.data<float>()[5], 2.5f);
  EXPECT_THROW(t.reshape({5}), Error);
}

TEST(Tensor, ReadOnlyViewRefusesWrites) {
  static const float buf[4] = {1, 2, 3, 4};
  Tensor v = Tensor::view(DType::F32, {2, 2}, buf, nullptr);
  EXPECT_THROW(v.mutable_raw(), Error);
  EXPECT_EQ(v.slice_rows(1, 2).data<float>()[0], 3.0f);
}

TEST(Tensor, ShapeOverflowIsAnError) {
  EXPECT_THROW(shape_numel({int64_t(1) << 40, int64_t(1) << 40}), Error);
  EXPECT_THROW(shape_numel({-1}), Error);
}

TEST(Isa, ScalarAlwaysSupportedAndSettable) {
  EXPECT_TRUE(isa_supported(Isa::Scalar));
  const Isa prev = active_isa();
  set_isa(Isa::Scalar);
  EXPECT_EQ(active_isa(), Isa::Scalar);
  set_isa(prev);
  Isa p;
  EXPECT_TRUE(parse_isa("avx2", &p));
  EXPECT_EQ(p, Isa::Avx2);
  EXPECT_FALSE(parse_isa("sse9", &p));
}

TEST(ThreadPool, EveryTaskRunsOnceForAnyThreadCount) {
  for (int threads : {1, 2, 3, 8}) {
    set_num_threads(threads);
    std::vector<std::atomic<int>> hits(1000);
    for (int rep = 0; rep < 20; ++rep)
      parallel_for(1000, [&](int64_t i) { hits[size_t(i)].fetch_add(1); });
    for (auto& h : hits) EXPECT_EQ(h.load(), 20);
  }
  set_num_threads(0);
}

TEST(ThreadPool, ExceptionPropagates) {
  EXPECT_THROW(parallel_for(100, [&](int64_t i) { if (i == 37) throw Error("boom"); }), Error);
  int n = 0;
  parallel_for(1, [&](int64_t) { ++n; });
  EXPECT_EQ(n, 1);
}

TEST(ThreadPool, ManyBackToBackRegionsNeverLoseATask) {
  // Exercises the generation protocol: workers arriving late must not join a region whose state
  // is being rewritten, and the caller must not wait for workers that have no task.
  set_num_threads(2);
  std::atomic<int64_t> sum{0};
  for (int rep = 0; rep < 20000; ++rep)
    parallel_for(1 + rep % 5, [&](int64_t i) { sum.fetch_add(i + 1); });
  int64_t expect = 0;
  for (int rep = 0; rep < 20000; ++rep) {
    const int n = 1 + rep % 5;
    expect += int64_t(n) * (n + 1) / 2;
  }
  EXPECT_EQ(sum.load(), expect);
  set_num_threads(0);
}
