// devtools/w4a4_stages.h — the prepared SVDQuant layer (svdquant_linear, fp32 out) with its
// stages timed apart: activation quantization, the low-rank down-projection, the integer GEMM with
// its epilogue. The stages run split (each its own pass over x), so their sum is a little above
// the fused call; the library runs them through kernels::w4a4::svdquant_linear_staged.
//
// Part of nibble_devtools (not of libnibble). Thread-safe as svdquant_linear is.
#pragma once
#include "nibble/ops.h"

namespace nibble::bench {

struct StageTimes {
  double quantize = 0, lowrank = 0, gemm = 0;  // seconds (wall clock)
  double gemm_cpu = 0;  // process CPU seconds of the GEMM stage (all threads): robust on a shared host
};
Tensor svdquant_linear_timed(const Tensor& x, const SvdquantW4A4Prepared& w, StageTimes* t);

}  // namespace nibble::bench
