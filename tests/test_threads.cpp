// The thread pool under concurrent callers (run under TSan by `make test-tsan`): several calling
// threads using the ops at once, set_num_threads while regions run, exceptions, the spin setting.
// Every result is compared bit for bit with the same call made alone: an op's math never depends on
// the thread count or on who else is calling.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "nibble/error.h"
#include "nibble/formats.h"
#include "nibble/ops.h"
#include "nibble/thread_pool.h"

#include "test_tensors.h"

using namespace nibble;

namespace {

using testing_tensors::random_bytes;
using testing_tensors::random_f32;
using testing_tensors::same_bits;

// One small problem of each op family; run() computes all of them.
struct Work {
  Tensor x_awq, q, s, z, bias;
  std::shared_ptr<const AwqW4A16Prepared> awq;
  SvdquantW4A4Params sp;
  std::shared_ptr<const SvdquantW4A4Prepared> svd;
  Tensor x_svd, w_f32, x_f32;

  explicit Work(uint32_t seed, int64_t M) {
    std::mt19937 rng(seed);
    const int64_t N = 96, K = 256, G = 64, R = 16;
    x_awq = random_f32(rng, {M, K}, -2, 2, DType::BF16);
    q = random_bytes(rng, {N, K / 2});
    s = random_f32(rng, {K / G, N}, 0.002f, 0.03f, DType::BF16);
    z = random_f32(rng, {K / G, N}, -0.2f, 0.2f, DType::BF16);
    bias = random_f32(rng, {N}, -1, 1, DType::BF16);
    AwqW4A16Params ap;
    ap.qweight = q, ap.wscales = s, ap.wzeros = z, ap.bias = bias, ap.N = N, ap.K = K, ap.group_size = G;
    awq = prepare_awq_w4a16(ap);
    sp.N = N, sp.K = K, sp.R = R;
    sp.qweight = random_bytes(rng, {N, K / 2});
    sp.wscales = random_f32(rng, {K / 64, N}, 0.001f, 0.05f, DType::BF16);
    sp.smooth = random_f32(rng, {K}, 0.3f, 3.0f, DType::BF16);
    sp.proj_down = random_f32(rng, {K, R}, -0.1f, 0.1f, DType::BF16);
    sp.proj_up = random_f32(rng, {N, R}, -0.1f, 0.1f, DType::BF16);
    svd = prepare_svdquant_w4a4(sp);
    x_svd = random_f32(rng, {M, K}, -3, 3, DType::BF16);
    w_f32 = random_f32(rng, {N, K}, -1, 1);
    x_f32 = random_f32(rng, {M, K}, -1, 1);
  }
  std::vector<Tensor> run() const {
    return {gemv_awq_w4a16(x_awq, q, s, z, bias, 64, DType::F32), gemv_awq_w4a16(x_awq, *awq, DType::F32),
            svdquant_linear(x_svd, *svd, DType::F32), linear_f32(x_f32, w_f32)};
  }
};

struct PoolGuard {
  int threads = num_threads();
  double spin = spin_ms();
  ~PoolGuard() {
    set_num_threads(threads);
    set_spin_ms(spin);
  }
};

// Every calling thread runs its own problems (M from 1 to 40: GEMV, tiled and GEMM paths) and checks
// each result against the one computed alone before the threads started.
void run_callers(int callers, int rounds, const std::function<void()>& meanwhile) {
  std::vector<Work> work;
  std::vector<std::vector<Tensor>> expect;
  for (int c = 0; c < callers; ++c) {
    work.emplace_back(1000u + c, 1 + 13 * c);
    expect.push_back(work.back().run());
  }
  std::atomic<int> mismatches{0}, errors{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c)
    threads.emplace_back([&, c] {
      try {
        for (int r = 0; r < rounds; ++r) {
          const std::vector<Tensor> got = work[size_t(c)].run();
          for (size_t i = 0; i < got.size(); ++i)
            if (!same_bits(got[i], expect[size_t(c)][i])) ++mismatches;
        }
      } catch (const std::exception&) {
        ++errors;
      }
    });
  std::thread side;
  if (meanwhile)
    side = std::thread([&] {
      while (!done.load()) meanwhile();
    });
  for (auto& t : threads) t.join();
  done.store(true);
  if (side.joinable()) side.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(errors.load(), 0);
}

}  // namespace

TEST(Threads, ConcurrentCallersGetTheirOwnResults) {
  PoolGuard g;
  set_num_threads(3);
  run_callers(4, 6, nullptr);
}

TEST(Threads, SetNumThreadsWhileOthersRun) {
  PoolGuard g;
  int n = 1;
  run_callers(3, 8, [&] {
    set_num_threads(n);
    n = n % 4 + 1;
    std::this_thread::yield();
  });
}

TEST(Threads, SetSpinWhileOthersRun) {
  PoolGuard g;
  set_num_threads(2);
  int i = 0;
  run_callers(2, 6, [&] { set_spin_ms((i++ % 3) * 0.05); });
}

TEST(Threads, ParallelForCoversEveryIndexOnceUnderResizes) {
  PoolGuard g;
  std::atomic<bool> stop{false};
  std::thread resizer([&] {
    for (int n = 1; !stop.load(); n = n % 3 + 1) set_num_threads(n);
  });
  for (int round = 0; round < 200; ++round) {
    const int64_t n = 1 + round % 37;
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    parallel_for(n, [&](int64_t i) { hits[size_t(i)].fetch_add(1); });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "round " << round << " i " << i;
  }
  stop.store(true);
  resizer.join();
}

TEST(Threads, TaskExceptionReachesTheCaller) {
  PoolGuard g;
  set_num_threads(3);
  for (int round = 0; round < 20; ++round) {
    std::atomic<int> ran{0};
    EXPECT_THROW(parallel_for(16,
                              [&](int64_t i) {
                                ++ran;
                                if (i == 5) throw Error("task 5 failed");
                              }),
                 Error);
    EXPECT_EQ(ran.load(), 16);  // remaining tasks still finish
  }
}

TEST(Threads, NestedParallelForRunsSeriallyAndResizeInsideTaskThrows) {
  PoolGuard g;
  set_num_threads(2);
  std::atomic<int> inner{0}, throws{0};
  parallel_for(4, [&](int64_t) {
    parallel_for(8, [&](int64_t) { ++inner; });
    try {
      set_num_threads(1);
    } catch (const Error&) {
      ++throws;
    }
  });
  EXPECT_EQ(inner.load(), 32);
  EXPECT_EQ(throws.load(), 4);
  EXPECT_EQ(num_threads(), 2);
}

TEST(ThreadPoolSpin, SetterRoundTripsAndRejectsOutOfRange) {
  PoolGuard g;
  set_spin_ms(0.0);
  EXPECT_EQ(spin_ms(), 0.0);
  set_spin_ms(1.5);
  EXPECT_NEAR(spin_ms(), 1.5, 1e-9);
  set_spin_ms(0.0001);  // 100 ns
  EXPECT_NEAR(spin_ms(), 0.0001, 1e-9);
  EXPECT_THROW(set_spin_ms(kMaxSpinMs * 2), Error);
  EXPECT_THROW(set_spin_ms(std::nan("")), Error);
  EXPECT_NEAR(spin_ms(), 0.0001, 1e-9);  // unchanged by a rejected value
  // spin 0: workers sleep right after every region; results still complete
  set_spin_ms(0.0);
  set_num_threads(3);
  for (int r = 0; r < 50; ++r) {
    std::atomic<int> c{0};
    parallel_for(9, [&](int64_t) { ++c; });
    ASSERT_EQ(c.load(), 9);
  }
}

TEST(ThreadPoolSpin, ParsesEnvValues) {
  double v = -1;
  EXPECT_TRUE(parse_spin_ms("0", &v));
  EXPECT_EQ(v, 0.0);
  EXPECT_TRUE(parse_spin_ms("0.25", &v));
  EXPECT_EQ(v, 0.25);
  EXPECT_TRUE(parse_spin_ms("3 ", &v));
  EXPECT_EQ(v, 3.0);
  EXPECT_TRUE(parse_spin_ms("1e-2", &v));
  EXPECT_EQ(v, 0.01);
  for (const char* bad : {"", "-1", "abc", "1ms", "nan", "inf", "1e9", " "}) {
    v = 42;
    EXPECT_FALSE(parse_spin_ms(bad, &v)) << "'" << bad << "'";
    EXPECT_EQ(v, 42) << "'" << bad << "'";
  }
}

TEST(ThreadPoolSpin, DefaultComesFromEnv) {
  PoolGuard g;
  const char* old = std::getenv("NIBBLE_SPIN_MS");
  const std::string saved = old ? old : "";
  ::setenv("NIBBLE_SPIN_MS", "0.75", 1);
  set_spin_ms(-1);  // back to the default, which reads the env
  EXPECT_NEAR(spin_ms(), 0.75, 1e-9);
  ::setenv("NIBBLE_SPIN_MS", "fast", 1);
  try {
    set_spin_ms(-1);
    ADD_FAILURE() << "an invalid NIBBLE_SPIN_MS was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NIBBLE_SPIN_MS=fast"), std::string::npos) << e.what();
  }
  ::unsetenv("NIBBLE_SPIN_MS");
  set_spin_ms(-1);
  EXPECT_EQ(spin_ms(), kDefaultSpinMs);
  if (old) ::setenv("NIBBLE_SPIN_MS", saved.c_str(), 1);
}
