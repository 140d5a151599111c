// PLACEHOLDER (replaced by the SVDQuant work): svdquant_w4a4 params, validation, tiles, dequantize.
#include "formats/format_impls.h"
namespace nibble {
namespace formats {
void bind_svdquant_w4a4(QuantizedLayer& layer) { throw Error("svdquant_w4a4: bind pending"); }
Tensor dequantize_svdquant_w4a4(const QuantizedLayer& layer) { throw Error("svdquant_w4a4: dequantize pending"); }
}  // namespace formats
}  // namespace nibble
