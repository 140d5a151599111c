// Helpers shared by the checkpoint I/O tests: scratch directories and hand-built files.
#pragma once
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "nibble/safetensors.h"

namespace nibble::testing_io {

// A fresh directory under the system temp dir, removed (recursively) on destruction.
class ScratchDir {
 public:
  ScratchDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("nibble_io_" + std::to_string(getpid()) + "_" + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::permissions(path_, std::filesystem::perms::owner_all, std::filesystem::perm_options::add, ec);
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }
  // Names of every entry in the directory (to prove that nothing was left behind).
  std::vector<std::string> entries() const {
    std::vector<std::string> r;
    for (const auto& e : std::filesystem::directory_iterator(path_)) r.push_back(e.path().filename().string());
    return r;
  }

 private:
  std::filesystem::path path_;
};

// A safetensors image from a header text and a data section (the length prefix is added).
inline std::string make_image(const std::string& header, const std::string& data = "") {
  std::string img(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) img[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return img + header + data;
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Parses a copy of an in-memory image (owned by the result), labelled "mem.safetensors" in errors.
inline std::shared_ptr<SafetensorsFile> parse_image(const std::string& img) {
  auto owned = std::make_shared<const std::string>(img);
  const void* data = owned->data();
  const size_t size = owned->size();
  return SafetensorsFile::from_memory(std::move(owned), data, size, "mem.safetensors");
}

}  // namespace nibble::testing_io
