// libFuzzer target: SafetensorsFile::from_memory on arbitrary bytes.
//
// The first input byte picks how the rest is used:
//   even → the rest is a raw safetensors image (length prefix included);
//   odd  → the rest is "<header JSON>\0<data section>" and the correct length prefix is built
//          here, so mutations spend their time inside the JSON validation instead of breaking the
//          prefix (a NUL cannot appear inside valid JSON, so it is a safe separator).
// Contract checked beyond "no crash / no sanitizer report": every failure is a nibble::Error (any
// other exception escapes and libFuzzer reports it), and every accepted file satisfies the
// invariants the reader promises (offsets inside the data section, exact byte lengths, tensors
// tiling the data section). Every accepted tensor's bytes are read (ASan checks the bounds).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "nibble/error.h"
#include "nibble/safetensors.h"

#include "fuzz_image.h"

namespace {
void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "reader invariant violated: %s\n", what);
    std::abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::vector<uint8_t> image = nibble::fuzz::safetensors_image(data, size);
  // An exact-size heap copy, so ASan flags any read past the end of the image.
  auto* buf = static_cast<uint8_t*>(std::malloc(image.size() ? image.size() : 1));
  if (!image.empty()) std::memcpy(buf, image.data(), image.size());
  std::shared_ptr<const void> keep(buf, [](const void* p) { std::free(const_cast<void*>(p)); });

  std::shared_ptr<nibble::SafetensorsFile> f;
  try {
    f = nibble::SafetensorsFile::from_memory(keep, buf, image.size(), "fuzz.safetensors");
  } catch (const nibble::Error&) {
    return 0;  // rejected with the library's error type: fine
  }
  const uint64_t header_len = f->header_json().size();
  check(8 + header_len <= image.size(), "header inside the file");
  const uint64_t data_size = image.size() - 8 - header_len;
  uint64_t covered = 0;
  volatile uint32_t sink = 0;
  for (const auto& t : f->tensors()) {
    check(t.begin <= t.end && t.end <= data_size, "offsets inside the data section");
    check(t.begin == covered, "tensors tile the data section in offset order");
    if (t.end > t.begin) covered = t.end;
    check(f->find(t.name) == &t, "find() returns the listed tensor");
    const nibble::Tensor v = f->get(t.name);
    check(v.nbytes() == t.nbytes(), "view byte count equals data_offsets length");
    check(v.dtype() == t.dtype && v.shape() == t.shape, "view dtype/shape");
    const auto* p = static_cast<const uint8_t*>(v.raw());
    uint32_t acc = 0;
    for (size_t i = 0; i < v.nbytes(); ++i) acc += p[i];
    sink = sink + acc;
    // Decoding float tensors exercises the converters on arbitrary bit patterns (UBSan).
    const bool decodable = t.dtype == nibble::DType::F16 || t.dtype == nibble::DType::BF16 ||
                           t.dtype == nibble::DType::F8_E4M3 || t.dtype == nibble::DType::F8_E5M2 ||
                           t.dtype == nibble::DType::F8_E8M0 || t.dtype == nibble::DType::F64;
    if (decodable && v.numel() <= 4096) {
      const nibble::Tensor d = v.to_f32();
      check(d.numel() == v.numel(), "conversion keeps numel");
    }
  }
  check(covered == data_size, "data section fully covered");
  for (const auto& [k, val] : f->metadata()) sink = sink + uint32_t(k.size() + val.size());
  return 0;
}
