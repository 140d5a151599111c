// nibble/error.h — the one exception type of the library.
//
// Every failure the user can cause (bad file, bad shape, unknown format) is reported as a
// nibble::Error whose message names the file / tensor / layer, the offending field, and what was
// expected. The library never aborts on bad input.
//
// Thread safety: nibble::Error is an ordinary exception value with no shared state: safe from any
// thread.
#pragma once
#include <stdexcept>
#include <string>

namespace nibble {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace nibble
