// src/kernels/awq_w4a16_kernels.h — internal micro-kernels of the AWQ W4A16 op (spec §2).
//
// The driver (src/kernels/awq_w4a16.cpp) validates, converts the activations once per call into the
// layout each kernel wants, splits the output columns [0, N) into fixed blocks (independent of the
// thread count, so results are bit-identical for any number of threads) and calls one kernel per
// block. Every kernel writes the fp32 accumulator acc[m][n] = Σ_k x[m,k]·W[n,k] WITHOUT bias; the
// driver's epilogue adds the bias and rounds to the output dtype (spec §2.3: round, then add bias in
// the output dtype).
//
// Two families:
//  * GEMV (small M): weights are read once, straight from the stored layout (qweight (N, K/2),
//    wscales/wzeros (K/G, N)). The zero term is folded: Σ_{k∈g} x_k·z_g = z_g·xsum[m,g], so the inner
//    loop is int4 × x per group plus one scale FMA per group, and Σ_g z[g,n]·xsum[m,g] is a small
//    dense product done per column block. Activations come "chunked": each group is cut into chunks
//    of CW columns, and chunk c0.. is stored as S interleaved streams X_r[j] = x[c0 + S·j + r]
//    (zero padded), matching the order in which the packed nibbles unpack.
//  * GEMM (larger M): a block of weight rows is dequantized once into a row buffer and reused by all
//    M rows (register tile: 16-row activation vectors × a few broadcast weight rows). The output of
//    this family is transposed, accT[n][m], and the driver transposes it back.
//
// The helper functions here are `static inline`: the ISA files include this header, and an
// external-linkage inline copy compiled with ISA flags could be the one the linker keeps for the
// generic driver too (src/kernels/isa_local.h).
#pragma once
#include <cstdint>

#include "nibble/dtype.h"
#include "nibble/isa.h"

namespace nibble::kernels::awq {

// ---- common problem description (pointers into validated tensors)
struct Problem {
  int64_t M = 0, N = 0, K = 0, G = 0;
  const uint8_t* qweight = nullptr;   // (N, K/2)
  const uint16_t* wscales = nullptr;  // (K/G, N) bf16 or f16
  const uint16_t* wzeros = nullptr;   // (K/G, N) same dtype
  DType sdtype = DType::BF16;
};

// ---- reference (Isa::Scalar): x fp32 (M, K); acc (M, N) row-major, columns [n0, n1).
void awq_ref(const Problem& p, const float* x, float* acc, int64_t n0, int64_t n1);

// ---- GEMV family. `xc` chunked activations (layout above) of `parts` bf16 parts (bf16 kernel) or
// one fp32 copy (fp32 kernels); `xsum` (M, K/G) fp32 group sums of the original x; acc (M, N).
struct GemvArgs {
  Problem p;
  const void* xc = nullptr;
  int64_t xc_row_elems = 0;  // elements of one activation row (one part) in xc
  int parts = 1;             // bf16 kernel: x = Σ_parts (exact split of fp32/fp16 into bf16)
  bool wide = false;         // bf16 kernel: 128-column zmm chunks (G ∈ {64, 128}, K % 128 == 0);
                             // xc is then chunked as if G were 128 (see bf16_wide_ok)
  const float* xsum = nullptr;
  float* acc = nullptr;
};
// Chunk geometry per kernel: columns per chunk (CW) and streams (S).
inline constexpr int kChunkAvx2 = 16, kStreamsAvx2 = 2;
inline constexpr int kChunkAvx512 = 32, kStreamsAvx512 = 2;
inline constexpr int kChunkBf16 = 64, kStreamsBf16 = 4;
// Chunks per group for chunk width cw.
static inline int64_t chunks_per_group(int64_t G, int cw) { return (G + cw - 1) / cw; }

inline constexpr int kChunkBf16Wide = 128;
static inline bool bf16_wide_ok(int64_t K, int64_t G) { return (G == 64 || G == 128) && K % 128 == 0; }

// Columns whose scales and zero terms a kernel stages at once, and the workspace (floats) a GEMV
// kernel needs per call: staged scales, zeros and zero terms. The driver passes it in (kernels never
// allocate; src/kernels/workspace.h).
inline constexpr int64_t kStageCols = 64;
static inline int64_t gemv_ws_floats(const Problem& p) { return (2 * (p.K / p.G) + p.M) * kStageCols; }
using GemvKernel = void (*)(const GemvArgs& a, int64_t n0, int64_t n1, float* ws);
void awq_gemv_avx2(const GemvArgs& a, int64_t n0, int64_t n1, float* ws);
void awq_gemv_avx512(const GemvArgs& a, int64_t n0, int64_t n1, float* ws);
void awq_gemv_avx512bf16(const GemvArgs& a, int64_t n0, int64_t n1, float* ws);  // needs G % 8 == 0

// ---- Tiled GEMV (avx512bf16, prepared weights). prepare_awq_w4a16 repacks the stored layout into
// one contiguous stream per 16 output columns ("tile"), so a GEMV reads a single sequential stream
// per thread and vectorizes over columns (no horizontal sums, scales loaded as vectors):
//   tile t (columns 16t..16t+15), group g: G/8 weight lines then one scale line, 64 bytes each:
//     weight line j: dword r = the 4 stored bytes qweight[16t+r, g·G/2 + 4j .. +3]
//                    (columns g·G + 8j .. +7; nibble i of the dword is column g·G + 8j + i)
//     scale line:    s[g, 16t+r] for r = 0..15 (16-bit, stored dtype), then z[g, 16t+r]
//   Rows past N are padded with code 8 and zero scale/zero (they contribute exactly 0).
// A dword's low word holds columns +0..+3, its high word +4..+7, so "word >> 4r" puts the pair of
// columns (+r, +4+r) in the low nibbles of the two words: the activation pairs are stored to match,
// xpairs[row][g·G/2 + 4j + r] = (x[g·G+8j+r], x[g·G+8j+4+r]) as two bf16 parts of one part row.
inline constexpr int kTileCols = 16;
static inline int64_t tiled_lines_per_group(int64_t G) { return G / 8 + 1; }
static inline int64_t tiled_tile_bytes(int64_t K, int64_t G) { return (K / G) * tiled_lines_per_group(G) * 64; }
static inline int64_t tiled_bytes(int64_t N, int64_t K, int64_t G) {
  return (N + kTileCols - 1) / kTileCols * tiled_tile_bytes(K, G);
}
static inline bool tiled_ok(int64_t G) { return G % 8 == 0; }
// prepare_awq_w4a16 builds the tiled stream (for N, K > 0) exactly when this holds.
static inline bool prepared_has_tiled(int64_t G) { return isa_supported(Isa::Avx2) && tiled_ok(G); }
// Portable repack (load time): out must hold tiled_bytes(N, K, G) bytes.
void repack_tiled(const Problem& p, uint8_t* out);

struct TiledArgs {
  Problem p;                         // p.qweight unused; dims, G and sdtype
  const uint8_t* tiled = nullptr;    // the repacked stream
  const uint32_t* xpairs = nullptr;  // (M·parts, K/2) dwords, layout above
  int parts = 1;                     // exact bf16 parts of x (1/2/3 for bf16/f16/f32)
  const float* xsum = nullptr;       // (M, K/G) fp32 group sums of x
  float* acc = nullptr;              // (M, N)
};
// Tiles [t0, t1).
using TiledBf16Kernel = void (*)(const TiledArgs& a, int64_t t0, int64_t t1);
void awq_gemv_tiled_avx512bf16(const TiledArgs& a, int64_t t0, int64_t t1);
// The fp32-FMA variant (AVX-512F): x as fp32 rows, natural order.
struct TiledF32Args {
  Problem p;
  const uint8_t* tiled = nullptr;
  const float* x = nullptr;     // (M, K)
  const float* xsum = nullptr;  // (M, K/G)
  float* acc = nullptr;         // (M, N)
};
using TiledF32Kernel = void (*)(const TiledF32Args& a, int64_t t0, int64_t t1);
void awq_gemv_tiled_avx512(const TiledF32Args& a, int64_t t0, int64_t t1);
void awq_gemv_tiled_avx2(const TiledF32Args& a, int64_t t0, int64_t t1);  // same, 8 lanes

// ---- GEMM family. xp: activations packed for the kernel; accT (N, Mp) row-major where Mp = rows
// of xp (M rounded up to the vector width V). xp is cut into
// row blocks of 2V rows (the last may have V), each stored contiguously as [k][block width]: a
// [k][Mp] layout would put a power-of-two stride between the k steps and make the block thrash a
// few L2 sets at large M.
// blocks of fp32. (The avx512bf16 tier, which rounds the dequantized weight and x to bf16 like the kitchen's MMA tier,
// runs its own kernel instead: kernels/awq_gemm_bf16.h.)
struct GemmArgs {
  Problem p;
  const void* xp = nullptr;
  int64_t Mp = 0;
  float* accT = nullptr;
};
inline constexpr int kGemmRowsPerTask = 48;  // weight rows dequantized per task (multiple of 6)
// Workspace (floats) of a GEMM kernel for weight rows [n0, n1): the dequantized rows (fp32, or bf16
// pairs in half the space) and the staged scales/zeros; `ws` is 64-byte aligned.
static inline int64_t gemm_ws_floats(const Problem& p, int64_t rows) { return rows * p.K + 2 * (p.K / p.G) * kStageCols; }
using GemmKernel = void (*)(const GemmArgs& a, int64_t n0, int64_t n1, float* ws);
void awq_gemm_avx2(const GemmArgs& a, int64_t n0, int64_t n1, float* ws);
void awq_gemm_avx512(const GemmArgs& a, int64_t n0, int64_t n1, float* ws);
// The avx512bf16 GEMM tier (bf16_weights) has its own vdpbf16ps kernel with the int4 decode inside
// (kernels/awq_gemm_bf16.h); the plan names it through gemm_bf16 below.
// Vector widths of the packed activations (Mp is a multiple of this).
inline constexpr int kGemmMvAvx2 = 8, kGemmMvAvx512 = 16;

// ---- the kernel plan: which kernel runs for a call, decided once from the ISA, the group size, the
// dtypes and M. The driver runs it; path_name, the CLI, the benchmarks and the tests read it.
struct GemmBf16Args;  // kernels/awq_gemm_bf16.h
enum class Family { Reference, Tiled, Gemv, Gemm };
struct Plan {
  Family family = Family::Reference;
  Isa isa = Isa::Scalar;        // the level whose kernel runs (after the G / dtype downgrades)
  const char* name = "reference";
  bool bf16_dot = false;        // x is split into exact bf16 parts for vdpbf16ps (exact products)
  bool bf16_weights = false;    // the GEMM tier that rounds dequantized weights to bf16 (error ≤ 2^-8·A: the bf16 unit roundoff)
  bool bf16_x = false;          // that tier also rounds fp32/fp16 x to bf16 (RNE) instead of splitting it into
                                // exact parts: the kitchen's MMA tier multiplies x in the model dtype, and three
                                // parts made fp32 x (nn::Linear) 2.3× slower than bf16 x at M = 64 and 512;
                                // the avx512bf16 tiled GEMV rounds fp32 x (only) to bf16 the same way
                                // ("gemv-tiled-bf16dot-xbf16"), its weights staying exact
  // exactly one of these is set for the fast families (null: that level was not compiled)
  TiledF32Kernel tiled_f32 = nullptr;
  TiledBf16Kernel tiled_bf16 = nullptr;
  GemvKernel gemv = nullptr;
  GemmKernel gemm = nullptr;
  // bf16_weights: the tier's kernel (kernels/awq_gemm_bf16.h; int4 decoded inside the vdpbf16ps loop)
  void (*gemm_bf16)(const GemmBf16Args&, int64_t, int64_t, uint32_t*, float*) = nullptr;
};
// `tiled`: the call has the prepared tiled stream (prepare_awq_w4a16 builds it on AVX2+ hosts when
// tiled_ok(G)). The NIBBLE_AWQ_GEMV_MAX_M measuring knob moves the thresholds here too.
Plan plan(Isa isa, int64_t M, int64_t G, DType x_dtype, DType scale_dtype, bool tiled);
// The plan's name for a call on stored (prepared = false) or prepared weights.
const char* path_name(Isa isa, int64_t M, int64_t G, DType x_dtype, DType scale_dtype, bool prepared);

}  // namespace nibble::kernels::awq
