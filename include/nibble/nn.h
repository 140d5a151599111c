// nibble/nn.h — quantized Linear layers and checkpoint loading (the runtime a user calls).
//
// A Linear is built once from a checkpoint layer: its `comfy_quant` config (or none → a plain
// F32/F16/BF16 weight) is validated and bound by the format registry (bind_layer), and everything
// the forward needs is resolved at that moment: the path (fused kernel, dense float, or dequantize
// fallback), the prepared/repacked weights of the fused ops, the packed fp32 panels of a float
// weight. Weights stay zero-copy views into the mmap where the kernel reads the stored bytes
// (AWQ GEMV, SVDQuant natural layout, GEMV of float weights). forward() never looks anything up.
//
// Formats without a fused kernel (fp8, nvfp4, mxfp8, int8, ...) and layers with
// `full_precision_matrix_mult` run the eager fallback, densely in fp32 (linear_f32); a one-time
// notice names the format. Row-separable formats (float8_e4m3fn/e5m2, int8/int4_tensorwise) keep
// their stored bytes and are decoded in blocks of rows inside the GEMM (streamed()); the others
// (nvfp4, mxfp8, convrot, asym_w4a8) are decoded once at load to bf16 and run on the bf16 dense
// GEMM (2 bytes per weight; a bf16 weight on the fp32 kernels without AVX-512 BF16).
//
// Model / load_checkpoint(): every linear of a (possibly sharded) checkpoint by name. ComfyUI's
// detection (spec §4.1): any `.comfy_quant` key (or `_quantization_metadata`) makes the model
// "mixed"; layers without a config stay float. A `model.diffusion_model.` prefix is stripped (names
// are looked up with or without it). Every error names the layer.
//
// Thread safety: A loaded Model and its Linears are immutable after load, except for one-time lazy
// packing guarded by std::call_once, so forward() may be called concurrently on the same or
// different layers. set_dense_gemm() and set_notice_handler() change process-wide settings: set
// them before running layers (set_dense_gemm() is not synchronized with running forwards).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/formats.h"
#include "nibble/lora.h"
#include "nibble/safetensors.h"
#include "nibble/tensor.h"

namespace nibble::nn {

enum class LinearPath {
  Float,          // stored F32/F16/BF16 weight, dense fp32 math
  AwqW4A16,       // fused gemv_awq_w4a16
  SvdquantW4A4,   // fused svdquant_linear (quantize activations + int4 GEMM + low-rank)
  Dequantized,    // eager fallback: dequantized fp32 weight, dense fp32 math
};
const char* linear_path_name(LinearPath p);

class Linear {
 public:
  Linear() = default;
  // From a validated layer (bind_layer). `force_dequantize` takes the eager fallback even when a
  // fused kernel exists (the "dequantized baseline" of the block). Errors name the layer.
  static Linear from_layer(const QuantizedLayer& layer, bool force_dequantize = false);
  // A plain float layer: weight (N, K) F32/F16/BF16, bias (N) optional.
  static Linear from_float(std::string name, const Tensor& weight, const Tensor& bias = {});

  // x (..., K) of any float dtype → y (..., N) fp32.
  Tensor forward(const Tensor& x) const;
  // Same on raw fp32 rows: x (M, K) contiguous → y (M, N) (must not alias x).
  void forward_rows(const float* x, int64_t M, float* y) const;
  // Dense paths pack the fp32 weight panels on the first GEMM-sized forward (so that loading a
  // whole bf16 model does not double its memory); call this to do it now (e.g. before timing).
  void prepare_dense() const;

  bool defined() const { return impl_ != nullptr; }
  const std::string& name() const;
  int64_t in_features() const;
  int64_t out_features() const;
  LinearPath path() const;
  // "awq_w4a16", "svdquant_w4a4", "float8_e4m3fn", ... or the float dtype ("bf16", "f32").
  std::string format_name() const;
  const QuantizedLayer& layer() const;
  bool act_unsigned() const;  // svdquant act_unsigned (after the name heuristic of bind_layer)
  // Bytes of the stored parameters (weight, scales, low-rank, bias) as in the checkpoint.
  uint64_t stored_bytes() const;
  // The effective fp32 weight W_eff (N, K) and the fp32 bias a dense layer needs to reproduce the
  // quantized path: for act_unsigned SVDQuant layers the stored bias lacks the main path's
  // shift·Σ_k R_raw[n,k] (spec §3.4 / §8.6), which is added back here.
  Tensor effective_weight() const;
  Tensor effective_bias() const;
  // A float Linear with (effective_weight, effective_bias): the dequantized baseline of this layer.
  Linear dequantized() const;
  // The same layer on the streamed dense path: the stored weight bytes stay where they are (mmap)
  // and blocks of 64 output rows are decoded to fp32 inside the GEMM task that uses them, so no
  // fp32 copy or packed panels of the whole weight ever exist. Float layers (a bf16 model larger
  // than RAM) and the row-separable kitchen formats (float8_e4m3fn/e5m2, int8/int4_tensorwise,
  // which take this path by default) only; other layers are returned unchanged.
  Linear streamed() const;
  bool is_streamed() const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

class Model {
 public:
  // Opens a file, index or shard directory and builds every linear layer.
  static Model load(const std::string& path);
  // Same, with LoRAs applied at load (nibble/lora.h; nothing is written, strengths per call):
  // svdquant_w4a4 layers grow their low-rank branch, awq_w4a16 layers are requantized, float layers
  // merged. Unmatched LoRA modules are an error unless `partial` (then they are skipped).
  static Model load(const std::string& path, const std::vector<LoraSpec>& loras, bool partial = false,
                    LoraApplyStats* stats = nullptr);
  static Model from_checkpoint(const Checkpoint& ckpt);

  const std::string& path() const { return path_; }
  bool mixed() const { return mixed_; }  // any comfy_quant config found
  const std::string& prefix() const { return prefix_; }  // "model.diffusion_model." or ""
  // Layer names without the prefix, sorted.
  std::vector<std::string> names() const;
  bool contains(std::string_view name) const;
  // Accepts the name with or without the prefix; throws naming the layer (and near matches).
  const Linear& linear(std::string_view name) const;
  // A non-linear tensor (e.g. "transformer_blocks.0.attn.norm_q.weight"), prefix optional.
  bool has_tensor(std::string_view name) const;
  Tensor tensor(std::string_view name) const;
  size_t size() const { return linears_.size(); }
  uint64_t stored_bytes() const;  // of all linears
  const Checkpoint& checkpoint() const { return *ckpt_; }

 private:
  std::string path_, prefix_;
  bool mixed_ = false;
  std::shared_ptr<Checkpoint> ckpt_;
  std::map<std::string, Linear, std::less<>> linears_;
  std::string strip(std::string_view name) const;
  // A transform of every bound layer before its Linear is built: `prepare` gets all layer names
  // (without the prefix) first, `apply` each (name, layer). The LoRA loader (defined in the convert
  // layer, src/convert/lora_model.cpp) is one; nn itself knows nothing of LoRAs.
  struct LayerTransform {
    std::function<void(const std::vector<std::string>& names)> prepare;
    std::function<QuantizedLayer(const std::string& name, QuantizedLayer layer)> apply;
  };
  static Model build(const Checkpoint& ckpt, const LayerTransform* transform);
};

Model load_checkpoint(const std::string& path);

// Optional external dense GEMM for the Float/Dequantized paths at M >= 8 (the benchmark plugs in
// OpenBLAS when it beats linear_f32): y (M, N) = x (M, K) · w (N, K)ᵀ, all fp32 row-major. When set,
// those layers keep a contiguous fp32 copy of their weight instead of packed panels. nullptr = the
// built-in linear_f32 kernels. Set it before the first forward (not thread-safe to change mid-run).
using DenseGemmFn = void (*)(int64_t M, int64_t N, int64_t K, const float* x, const float* w, float* y);
void set_dense_gemm(DenseGemmFn fn);
DenseGemmFn dense_gemm();

// The math of the built-in dense GEMM (M >= 8) of Float layers with BF16/F16 stored weights and of
// Dequantized layers (docs/dense.md). F32 (default): fp32 inputs, the fp32 kernels. Bf16: x and W
// rounded to bf16 (RNE), exact products, fp32 sums (vdpbf16ps) — only where the CPU has AVX-512 BF16,
// elsewhere F32 is used. fp32-stored float weights always use F32. Default from env NIBBLE_DENSE=
// f32|bf16 (read at first use; another value throws nibble::Error). Set before running layers.
enum class DenseMath { F32, Bf16 };
void set_dense_math(DenseMath m);
DenseMath dense_math();

// Receives the one-time notices (eager fallback per format, act_unsigned inferred ...). Default:
// print to stderr. Set to an empty function to silence.
void set_notice_handler(std::function<void(const std::string&)> handler);

}  // namespace nibble::nn
