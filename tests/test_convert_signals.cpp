// test_convert_signals.cpp — `nibble convert` interrupted by SIGINT / SIGTERM removes its temporary
// output and exits 130 / 143 (CLI level: the test runs the nibble binary of the same build).
#include <gtest/gtest.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "nibble/convert.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"

extern char** environ;

using namespace nibble;
namespace fs = std::filesystem;

namespace {

std::string cli_path() {
  const fs::path exe = fs::read_symlink("/proc/self/exe");
  for (const auto& c : {exe.parent_path().parent_path() / "nibble", exe.parent_path() / "nibble"})
    if (fs::exists(c)) return c.string();
  return "";
}

bool temp_present(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp-") != std::string::npos) return true;
  return false;
}

// Starts the conversion, waits until its temporary output exists, sends `sig`, returns the status.
int interrupt(const std::string& cli, const fs::path& dir, const std::string& in, int sig, bool* saw_temp) {
  const std::string out = (dir / "out.safetensors").string();
  std::vector<std::string> args = {cli, "-q", "-t", "1", "convert", in, "-o", out, "--tensor-type", ".*=svdquant_w4a4:rank=32,refine=4"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, cli.c_str(), nullptr, nullptr, argv.data(), environ) != 0) return -1;
  *saw_temp = false;
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(120)) {
    if (temp_present(dir)) {
      // The converter registers its temporary file for the handler right after creating it; a
      // signal inside that instant leaves the file to the next run's stale-file cleanup.
      *saw_temp = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      break;
    }
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) return st;  // finished before we could interrupt it
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  kill(pid, sig);
  int st = 0;
  waitpid(pid, &st, 0);
  return st;
}

}  // namespace

TEST(ConvertSignals, InterruptRemovesTheTemporaryOutput) {
  const std::string cli = cli_path();
  if (cli.empty()) FAIL() << "the nibble CLI is missing beside the tests (the same build makes both)";
  const fs::path dir = fs::temp_directory_path() / ("nibble_test_signals_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  // A copied tensor first (so the temporary file exists early), then layers that take a while.
  std::vector<std::pair<std::string, Tensor>> t = {{"a_norm.weight", Tensor::zeros(DType::BF16, {256})}};
  for (int i = 0; i < 24; ++i)
    t.emplace_back("blocks." + std::to_string(i) + ".fc.weight", synth_weight(1024, 1024, uint64_t(i + 1)).to(DType::BF16));
  const std::string in = (dir / "in.safetensors").string();
  save_safetensors(in, t);
  for (int sig : {SIGTERM, SIGINT}) {
    bool saw = false;
    const int st = interrupt(cli, dir, in, sig, &saw);
    ASSERT_TRUE(saw) << "the conversion ended before its temporary file was seen";
    ASSERT_TRUE(WIFEXITED(st)) << "killed by signal " << (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    EXPECT_EQ(WEXITSTATUS(st), 128 + sig);
    EXPECT_FALSE(temp_present(dir)) << "temporary output left behind after signal " << sig;
    EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
  }
  fs::remove_all(dir);
}
