// The SVDQuant layer with its stages timed apart (see devtools/w4a4_stages.h).
#include "devtools/w4a4_stages.h"

#include <ctime>

#include "devtools/bench_timing.h"
#include "kernels/svdquant_w4a4_kernels.h"

namespace nibble::bench {

Tensor svdquant_linear_timed(const Tensor& x, const SvdquantW4A4Prepared& w, StageTimes* t) {
  double marks[4] = {0, 0, 0, 0}, cpu[4] = {0, 0, 0, 0};
  Tensor y = kernels::w4a4::svdquant_linear_staged(x, w, [&](int boundary) {
    marks[boundary] = now_seconds();
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    cpu[boundary] = double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  });
  t->quantize = marks[1] - marks[0];
  t->lowrank = marks[2] - marks[1];
  t->gemm = marks[3] - marks[2];
  t->gemm_cpu = cpu[3] - cpu[2];
  return y;
}

}  // namespace nibble::bench
