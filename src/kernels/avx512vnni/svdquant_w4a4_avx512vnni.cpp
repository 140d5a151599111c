// AVX-512 VNNI GEMM of the SVDQuant W4A4 layer (layout and numerics: svdquant_w4a4_kernels.h; the
// micro-kernel: svdquant_w4a4_vnni_micro.h). The fp32 up-projection (in pair order when a.up_pairs).

// GCC 12 flags its own _mm512_undefined_* helpers inside the intrinsics headers (false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/avx512vnni/svdquant_w4a4_vnni_micro.h"

namespace nibble::kernels::w4a4 {

void gemm_avx512vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  gemm_vnni_blocks<false>(a, m0, m1, t0, t1);
}

}  // namespace nibble::kernels::w4a4
