// oneDNN matmul peers (devtools/bench_dnnl.h).
#include "devtools/bench_dnnl.h"

#include <dlfcn.h>
#include <fmt/format.h>

#include <stdexcept>

#include "nibble/thread_pool.h"

#if defined(NIBBLE_HAVE_DNNL)
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace nibble::bench {

#if defined(NIBBLE_HAVE_DNNL)
namespace {
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}
// oneDNN's OpenMP team size: omp_set_num_threads of the calling thread (libgomp comes with libdnnl).
void set_threads() {
  using Fn = void (*)(int);
  if (auto f = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"))) f(num_threads());
}

// A matmul with the weight (given (N,K) row-major = (K,N) in tag ba) reordered once to `any`.
struct Matmul {
  dnnl::stream s{engine()};
  dnnl::matmul mm;
  dnnl::memory wmem, src, dst;
  Matmul(int64_t M, int64_t N, int64_t K, dt xt, dt wt, dt yt, const void* w) {
    set_threads();
    const dnnl::memory::desc xd({M, K}, xt, tag::ab), wany({K, N}, wt, tag::any), yd({M, N}, yt, tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(xd, wany, yd), engine());
    mm = dnnl::matmul(pd);
    dnnl::memory wplain({{K, N}, wt, tag::ba}, engine(), const_cast<void*>(w));
    wmem = dnnl::memory(pd.weights_desc(), engine());
    dnnl::reorder(wplain, wmem).execute(s, wplain, wmem);
    s.wait();
    src = dnnl::memory(xd, engine(), DNNL_MEMORY_NONE);
    dst = dnnl::memory(yd, engine(), DNNL_MEMORY_NONE);
  }
  void run(const void* x, void* y) {
    src.set_data_handle(const_cast<void*>(x));
    dst.set_data_handle(y);
    mm.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wmem}, {DNNL_ARG_DST, dst}});
    s.wait();
  }
};
}  // namespace

bool dnnl_available() { return true; }
std::string dnnl_info() {
  const dnnl_version_t* v = dnnl_version();
  return fmt::format("oneDNN {}.{}.{} (max cpu isa {})", v->major, v->minor, v->patch, int(dnnl::get_effective_cpu_isa()));
}
struct DnnlBf16Matmul::Impl : Matmul {
  using Matmul::Matmul;
};
DnnlBf16Matmul::DnnlBf16Matmul(int64_t M, int64_t N, int64_t K, const uint16_t* w)
    : impl_(std::make_unique<Impl>(M, N, K, dt::bf16, dt::bf16, dt::f32, w)) {}
void DnnlBf16Matmul::run(const uint16_t* x, float* y) { impl_->run(x, y); }
struct DnnlS8Matmul::Impl : Matmul {
  using Matmul::Matmul;
};
DnnlS8Matmul::DnnlS8Matmul(int64_t M, int64_t N, int64_t K, const int8_t* w)
    : impl_(std::make_unique<Impl>(M, N, K, dt::u8, dt::s8, dt::s32, w)) {}
void DnnlS8Matmul::run(const uint8_t* x, int32_t* y) { impl_->run(x, y); }
#else
bool dnnl_available() { return false; }
std::string dnnl_info() { return "not built (install libdnnl-dev and reconfigure)"; }
struct DnnlBf16Matmul::Impl {};
DnnlBf16Matmul::DnnlBf16Matmul(int64_t, int64_t, int64_t, const uint16_t*) {
  throw std::runtime_error("oneDNN peer not built (libdnnl-dev)");
}
void DnnlBf16Matmul::run(const uint16_t*, float*) {}
struct DnnlS8Matmul::Impl {};
DnnlS8Matmul::DnnlS8Matmul(int64_t, int64_t, int64_t, const int8_t*) {
  throw std::runtime_error("oneDNN peer not built (libdnnl-dev)");
}
void DnnlS8Matmul::run(const uint8_t*, int32_t*) {}
#endif
DnnlBf16Matmul::~DnnlBf16Matmul() = default;
DnnlS8Matmul::~DnnlS8Matmul() = default;

}  // namespace nibble::bench
