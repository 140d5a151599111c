// Slow (`make test-slow`, or run directly): the memory bound of the whole model at full size.
//
// A full-size 60-block kitchen-native Qwen-Image checkpoint (hidden 3072, 24 heads × 128, joint
// 3584) is made from ONE synthetic bf16 block converted with `--preset qwen-image` (awq_w4a16 for
// *_mod.1, svdquant_w4a4 elsewhere), whose tensors are written 60 times under
// transformer_blocks.0..59 (streaming writer; converting 840 layers would take hours on 2 cores and
// the weights' values do not change the memory). Then `nibble forward` runs one step at 1024
// image + 256 text tokens in a child process and reports its peak RSS, which must be ≤ stored
// weights + 3 GiB. NIBBLE_FULL_BLOCKS overrides 60; NIBBLE_FULL_DIR the scratch directory.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "nibble/convert.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"
#include "cli_util.h"

using namespace nibble;
namespace fs = std::filesystem;

TEST(QwenImageFull, PeakRssWithinStoredWeightsPlus3GiB) {
  const char* nb = std::getenv("NIBBLE_FULL_BLOCKS");
  const int64_t blocks = nb ? std::atoll(nb) : 60;
  const fs::path dir = std::getenv("NIBBLE_FULL_DIR") ? fs::path(std::getenv("NIBBLE_FULL_DIR"))
                                                       : fs::temp_directory_path() / "nibble_qwen_full";
  fs::create_directories(dir);
  const std::string bin = testing_cli::cli();
  if (bin.empty()) FAIL() << "the nibble CLI is missing beside the tests (the same build makes both)";
  const std::string one_bf16 = (dir / "one_bf16.safetensors").string(), one_q = (dir / "one_nibble.safetensors").string();
  const std::string full = (dir / ("full_" + std::to_string(blocks) + "_blocks.safetensors")).string();
  if (!fs::exists(one_q)) {
    SynthCheckpointOptions so;
    so.blocks = 1;
    so.hidden = 3072;
    so.joint_dim = 3584;
    write_synth_qwen_image_checkpoint(one_bf16, so);
    ConvertOptions co;
    co.preset = "qwen-image";
    convert_checkpoint(one_bf16, one_q, co);
  }
  if (!fs::exists(full)) {
    const auto src = SafetensorsFile::open(one_q);
    SafetensorsWriter w(full, src->metadata());
    const std::string b0 = "transformer_blocks.0.";
    std::vector<std::pair<std::string, std::string>> items;  // (out name, src name)
    for (const auto& t : src->tensors()) {
      if (t.name.rfind(b0, 0) == 0) {
        for (int64_t b = 0; b < blocks; ++b)
          items.emplace_back("transformer_blocks." + std::to_string(b) + "." + t.name.substr(b0.size()), t.name);
      } else {
        items.emplace_back(t.name, t.name);
      }
    }
    for (const auto& [o, s] : items) {
      const TensorInfo* ti = src->find(s);
      w.add(o, ti->dtype, ti->shape);
    }
    for (const auto& [o, s] : items) w.write_tensor(o, src->get(s));
    w.commit();
  }
  const std::string lat = (dir / "lat.safetensors").string(), ctx = (dir / "ctx.safetensors").string();
  save_safetensors(lat, {{"latent", synth_activations(16, 64 * 64, 3).reshape({1, 16, 64, 64})}});
  save_safetensors(ctx, {{"context", synth_activations(256, 3584, 4).reshape({1, 256, 3584})}});
  const std::string out = (dir / "pred.safetensors").string(), log = (dir / "forward.log").string();
  const std::string cmd = bin + " forward " + full + " --latent " + lat + " --context " + ctx +
                          " --timestep 0.5 -o " + out + " > " + log + " 2>&1";
  const int rc = std::system(cmd.c_str());
  rusage ru{};
  getrusage(RUSAGE_CHILDREN, &ru);
  std::ifstream in(log);
  std::string line;
  while (std::getline(in, line)) std::printf("  %s\n", line.c_str());
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << cmd;
  const double peak = double(ru.ru_maxrss) * 1024.0;  // the largest child: nibble forward
  const double stored = double(fs::file_size(full));
  std::printf("full model: %lld blocks, file %.2f GiB, peak RSS of nibble forward %.2f GiB, bound %.2f GiB\n",
              (long long)blocks, stored / (1 << 30), peak / (1 << 30), (stored + 3.0 * (1 << 30)) / (1 << 30));
  EXPECT_LE(peak, stored + 3.0 * (1 << 30));
}
