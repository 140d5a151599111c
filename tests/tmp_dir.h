// tests/tmp_dir.h — a fresh per-test scratch directory (named after the test), removed on destruction.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace nibble::testing_tmp {

struct TmpDir {
  std::filesystem::path p;
  explicit TmpDir(const std::string& tag) {
    p = std::filesystem::temp_directory_path() /
        ("nibble_test_" + tag + "_" + std::to_string(::getpid()) + "_" +
         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(p);
    std::filesystem::create_directories(p);
  }
  ~TmpDir() {  // permissions restored first: some tests make the directory read-only
    std::error_code ec;
    std::filesystem::permissions(p, std::filesystem::perms::owner_all, ec);
    std::filesystem::remove_all(p, ec);
  }
  std::string operator/(const std::string& n) const { return (p / n).string(); }
};

}  // namespace nibble::testing_tmp
