// nibble/inspect.h — the data and the two renderings of `nibble inspect` (the CLI command in
// tools/cmd_inspect.cpp and the Python module's `nibble.inspect` are thin wrappers).
//
// inspect_checkpoint() binds every layer (so any invalid layer is an error naming it), and builds
// one row per quantized layer plus the float linears. Float linears whose name marks them as a
// layer that the int4 bundles quantize (`*_mod.1` → awq_w4a16, the twelve block linears →
// svdquant_w4a4, spec §7) become "candidates" with the bytes the kitchen format would take.
//
// Thread safety: Functions of their arguments only (the checkpoint is read, never changed): safe
// to call concurrently.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nibble/formats.h"

namespace nibble {

struct InspectRow {
  std::string name;
  std::string format;    // kitchen format, or the float dtype ("BF16") for float layers
  int64_t N = 0, K = 0;
  int64_t group_size = 0, rank = 0;
  bool act_unsigned = false;
  std::string layout;    // "tile" / "natural" for svdquant, the config's layout otherwise
  uint64_t bytes = 0;    // all tensors of the layer (weight, scales, bias, ...)
  double bits_per_weight = 0;
  std::string candidate; // float layers only: the kitchen format that could hold it ("" = none)
  uint64_t candidate_bytes = 0;
  std::vector<std::string> warnings;
};

struct InspectReport {
  std::string path;
  size_t tensor_count = 0;
  uint64_t tensor_bytes = 0;           // sum of all tensor sizes of the checkpoint
  std::vector<InspectRow> quantized;   // one per quantized layer
  std::vector<InspectRow> float_layers;
  std::map<std::string, std::pair<int, uint64_t>> by_format;  // format → (layers, bytes)
  uint64_t quantized_bytes = 0, float_bytes = 0;
  uint64_t candidate_saving = 0;       // sum over candidates of bytes − candidate_bytes
};

// The default low-rank R assumed for svdquant candidates (the converter's default).
inline constexpr int64_t kInspectCandidateRank = 32;

// `filter`: ECMAScript regex searched in layer names ("" = all layers).
InspectReport inspect_checkpoint(const Checkpoint& ckpt, const std::string& filter = "");
std::string inspect_text(const InspectReport& report);
std::string inspect_json(const InspectReport& report);  // one JSON document
// "1.50 MiB", "312 B"
std::string human_bytes(uint64_t bytes);

}  // namespace nibble
