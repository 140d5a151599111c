// libFuzzer target: nibble::QuantConfig::parse on arbitrary bytes (the per-layer `comfy_quant`
// JSON, which comes straight out of a checkpoint).
// Contract checked: failures are nibble::Error only; an accepted config serializes with
// to_json() to text that parses again to the same canonical form (parse ∘ to_json is stable).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "nibble/error.h"
#include "nibble/formats.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  nibble::QuantConfig cfg;
  try {
    cfg = nibble::QuantConfig::parse(text, "fuzz.layer");
  } catch (const nibble::Error&) {
    return 0;
  }
  const std::string canon = cfg.to_json();
  std::string again;
  try {
    again = nibble::QuantConfig::parse(canon, "fuzz.layer").to_json();
  } catch (const nibble::Error& e) {
    std::fprintf(stderr, "to_json() output was rejected by parse(): %s\n  input: %s\n  canonical: %s\n", e.what(),
                 text.c_str(), canon.c_str());
    std::abort();
  }
  if (again != canon) {
    std::fprintf(stderr, "to_json() is not stable:\n  first:  %s\n  second: %s\n", canon.c_str(), again.c_str());
    std::abort();
  }
  return 0;
}
