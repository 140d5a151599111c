// libFuzzer target: a checkpoint's bytes → reader → collect_layers → bind_layer → dequantize.
//
// Input modes as in fuzz_safetensors (first byte even: a raw safetensors image; odd:
// "<header JSON>\0<data>" with the length prefix built here). The image is written to a per-process
// file in /dev/shm (Checkpoint opens paths) and opened the way the CLI and ComfyUI loaders do.
// Contract checked beyond "no crash / no sanitizer report": every failure is a nibble::Error; a bound
// layer has N, K ≥ 0, and dequantize() returns an F32 (N, K) tensor. Layers whose weight has more
// than kMaxElems elements are bound but not dequantized (the output would be allocated in full).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "nibble/error.h"
#include "nibble/formats.h"
#include "nibble/safetensors.h"

#include "fuzz_image.h"

namespace {
constexpr int64_t kMaxElems = int64_t(1) << 22;

void check(bool ok, const char* what, const std::string& layer) {
  if (!ok) {
    std::fprintf(stderr, "bind/dequantize invariant violated: %s (layer %s)\n", what, layer.c_str());
    std::abort();
  }
}

const std::string& scratch_path() {
  static const std::string p = "/dev/shm/nibble_fuzz_dequantize_" + std::to_string(::getpid()) + ".safetensors";
  return p;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::vector<uint8_t> image = nibble::fuzz::safetensors_image(data, size);
  {
    FILE* f = std::fopen(scratch_path().c_str(), "wb");
    if (!f) std::abort();
    if (!image.empty() && std::fwrite(image.data(), 1, image.size(), f) != image.size()) std::abort();
    std::fclose(f);
  }

  std::vector<nibble::LayerSource> layers;
  try {
    const nibble::Checkpoint ck = nibble::Checkpoint::open(scratch_path());
    layers = nibble::collect_layers(ck);
    // the tensors stay valid after the Checkpoint is gone (they share the mapping)
  } catch (const nibble::Error&) {
    return 0;
  }
  for (const nibble::LayerSource& src : layers) {
    nibble::QuantizedLayer l;
    try {
      l = nibble::bind_layer(src);
    } catch (const nibble::Error&) {
      continue;
    }
    check(l.N >= 0 && l.K >= 0, "N, K non-negative", l.name);
    int64_t elems = 0;
    if (__builtin_mul_overflow(l.N, l.K, &elems) || elems > kMaxElems) continue;
    (void)l.storage_bytes();
    nibble::Tensor w;
    try {
      w = nibble::dequantize(l);
    } catch (const nibble::Error&) {
      continue;  // e.g. a legacy layer whose scale does not broadcast: rejected, not computed
    }
    check(w.defined() && w.dtype() == nibble::DType::F32, "dequantize returns F32", l.name);
    check(w.dim() == 2 && w.size(0) == l.N && w.size(1) == l.K, "dequantize returns (N, K)", l.name);
    volatile float sink = 0;
    const float* p = w.data<float>();
    for (int64_t i = 0; i < w.numel(); ++i) sink = sink + p[i];  // ASan: every element is inside
  }
  return 0;
}
