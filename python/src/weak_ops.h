// weak_ops.h — the library entry points the module may call before their implementation lands.
//
// The team writes libnibble in parallel; the module must build and import with whatever is there.
// Each function below is redeclared weak: if no object of libnibble defines it, its address is
// null at run time and the binding raises NotImplementedError naming it (require() below) instead
// of failing to import. The core types, ISA, thread pool and safetensors I/O are always present
// and are not listed. Only redeclarations: signatures come from the agreed public headers.
#pragma once
#include <stdexcept>
#include <string>

#include "nibble/formats.h"
#include "nibble/ops.h"

#define NIBBLE_WEAK __attribute__((weak))

namespace nibble {
NIBBLE_WEAK Tensor gemv_awq_w4a16(const Tensor& x, const Tensor& qweight, const Tensor& wscales,
                                  const Tensor& wzeros, const Tensor& bias, int64_t group_size,
                                  std::optional<DType> out_dtype);
NIBBLE_WEAK std::shared_ptr<const AwqW4A16Prepared> prepare_awq_w4a16(const AwqW4A16Params& p);
NIBBLE_WEAK Tensor gemv_awq_w4a16(const Tensor& x, const AwqW4A16Prepared& w,
                                  std::optional<DType> out_dtype);
NIBBLE_WEAK SvdquantActs quantize_svdquant_w4a4(const Tensor& x, const Tensor& smooth,
                                                const Tensor& proj_down, int64_t pad_size,
                                                bool act_unsigned, const Tensor& lora_x,
                                                std::optional<DType> lora_act_dtype);
NIBBLE_WEAK Tensor scaled_mm_svdquant_w4a4(const Tensor& act, const Tensor& wgt,
                                           const Tensor& ascales, const Tensor& wscales,
                                           const Tensor& lora_act, const Tensor& proj_up,
                                           const Tensor& bias, bool act_unsigned,
                                           std::optional<DType> out_dtype);
NIBBLE_WEAK std::shared_ptr<const SvdquantW4A4Prepared> prepare_svdquant_w4a4(
    const SvdquantW4A4Params& p);
NIBBLE_WEAK Tensor svdquant_linear(const Tensor& x, const SvdquantW4A4Prepared& w,
                                   std::optional<DType> out_dtype);
NIBBLE_WEAK Tensor linear_f32(const Tensor& x, const Tensor& weight, const Tensor& bias);

NIBBLE_WEAK std::vector<LayerSource> collect_layers(const Checkpoint& ckpt, bool configs_only);
NIBBLE_WEAK QuantizedLayer bind_layer(const LayerSource& src);
NIBBLE_WEAK Tensor dequantize(const QuantizedLayer& layer);
NIBBLE_WEAK AwqW4A16Params awq_params(const QuantizedLayer& layer);
NIBBLE_WEAK SvdquantW4A4Params svdquant_params(const QuantizedLayer& layer);
NIBBLE_WEAK const std::vector<FormatInfo>& all_formats();
}  // namespace nibble

namespace nibble_py {

// Raised (as Python NotImplementedError) when an entry point is not in this build of libnibble.
struct NotBuilt : std::runtime_error {
  explicit NotBuilt(const std::string& what)
      : std::runtime_error(what + " is not implemented in this build of libnibble") {}
};

// require(&fn, "name"): throws NotBuilt if the weak symbol did not resolve.
template <class F> inline void require(F* fn, const char* name) {
  if (fn == nullptr) throw NotBuilt(name);
}

}  // namespace nibble_py
