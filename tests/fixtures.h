// fixtures.h — where the tests find the golden fixtures of comfy-kitchen's eager reference.
//
// They live beside the project, in <project root>/../shared/fixtures (README.md: "Golden
// fixtures"); CMake passes the project root as NIBBLE_SOURCE_DIR. NIBBLE_FIXTURES_DIR in the
// environment overrides the directory. A missing fixture is a test failure, never a skip: the
// fixtures are the only external oracle, and a fresh clone without them must not pass silently.
#pragma once
#include <cstdlib>
#include <filesystem>
#include <string>

#ifndef NIBBLE_SOURCE_DIR
#error "tests/CMakeLists.txt defines NIBBLE_SOURCE_DIR (the project root)"
#endif

namespace nibble::test {

inline std::string fixtures_dir() {
  if (const char* env = std::getenv("NIBBLE_FIXTURES_DIR"); env && *env) return env;
  return std::string(NIBBLE_SOURCE_DIR) + "/../shared/fixtures";
}

// The path of fixture `name`; empty if it does not exist (the caller FAILs with `why`).
inline std::string fixture_path(const std::string& name, std::string* why) {
  const std::string path = fixtures_dir() + "/" + name;
  if (!std::filesystem::is_regular_file(path)) {
    *why = "golden fixture '" + path +
           "' is missing: check out the shared fixtures beside the project (../shared/fixtures) "
           "or set NIBBLE_FIXTURES_DIR";
    return "";
  }
  return path;
}

}  // namespace nibble::test
