// PLACEHOLDER (replaced by the AWQ work): awq_w4a16 params, validation, dequantize.
#include "formats/format_impls.h"
namespace nibble {
namespace formats {
void bind_awq_w4a16(QuantizedLayer& layer) { throw Error("awq_w4a16: bind pending"); }
Tensor dequantize_awq_w4a16(const QuantizedLayer& layer) { throw Error("awq_w4a16: dequantize pending"); }
}  // namespace formats
}  // namespace nibble
