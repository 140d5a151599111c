// fuzz/fuzz_image.h — the two input modes of the safetensors-reading fuzzers: first byte even, the
// rest is a raw safetensors image; odd, the rest is "<header JSON>\0<data>" and the 8-byte length
// prefix is built here (so the fuzzer spends its time on the header, not on a matching prefix).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace nibble::fuzz {

inline std::vector<uint8_t> safetensors_image(const uint8_t* data, size_t size) {
  std::vector<uint8_t> image;
  if (size < 1) return image;
  if (data[0] & 1) {
    const uint8_t* body = data + 1;
    const size_t n = size - 1;
    const void* nul = std::memchr(body, 0, n);
    const size_t hlen = nul ? size_t(static_cast<const uint8_t*>(nul) - body) : n;
    const size_t dlen = nul ? n - hlen - 1 : 0;
    image.resize(8 + hlen + dlen);
    for (int i = 0; i < 8; ++i) image[size_t(i)] = uint8_t(uint64_t(hlen) >> (8 * i));
    std::memcpy(image.data() + 8, body, hlen);
    if (dlen) std::memcpy(image.data() + 8 + hlen, body + hlen + 1, dlen);
  } else {
    image.assign(data + 1, data + size);
  }
  return image;
}

}  // namespace nibble::fuzz
