// tests/cli_util.h — the nibble CLI of the same build (build/nibble beside build/tests) and a
// quiet shell call returning its exit status, for the tests that drive the CLI.
#pragma once
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace nibble::testing_cli {

// Absolute path of the CLI, or "" when it is not there.
inline std::string cli() {
  for (const char* p : {"../nibble", "./nibble"})
    if (std::filesystem::exists(p)) return std::filesystem::absolute(p).string();
  return {};
}
// Runs cmd with stdout/stderr discarded; its exit status, or -1 when it did not exit normally.
inline int run(const std::string& cmd) {
  const int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace nibble::testing_cli
