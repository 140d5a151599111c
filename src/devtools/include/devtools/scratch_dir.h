// devtools/scratch_dir.h — a fresh scratch directory for the synthetic checkpoints of the benchmarks
// and end-to-end tests, removed (with everything in it) when the object goes out of scope.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>
#include <system_error>

namespace nibble::bench {

struct ScratchDir {
  std::filesystem::path path;
  // <tmp>/nibble_<tag>_<pid>_<random>: unique per process and per object.
  explicit ScratchDir(const std::string& tag)
      : path(std::filesystem::temp_directory_path() /
             ("nibble_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(std::random_device{}()))) {
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::string str() const { return path.string(); }
};

}  // namespace nibble::bench
