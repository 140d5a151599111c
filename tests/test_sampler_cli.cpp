// `nibble run` (tools/cmd_run.cpp): the CLI gives the library's result bit for bit, and bad input
// exits 1 with nothing written. Uses build/nibble next to build/tests (skipped when absent).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "nibble/convert.h"
#include "nibble/latent.h"
#include "nibble/qwen_image.h"
#include "nibble/safetensors.h"
#include "nibble/synth.h"
#include "cli_util.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

using testing_cli::cli;
using testing_cli::run;

struct Fixture {
  fs::path dir;
  std::string ckpt, pos, neg;
  Fixture() {
    dir = fs::temp_directory_path() / ("nibble_test_run_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const std::string flt = (dir / "bf16.safetensors").string();
    ckpt = (dir / "q.safetensors").string();
    SynthCheckpointOptions so;
    so.blocks = 1;
    so.hidden = 256;
    so.joint_dim = 64;
    write_synth_qwen_image_checkpoint(flt, so);
    ConvertOptions co;
    co.preset = "qwen-image";
    co.rank = 16;
    convert_checkpoint(flt, ckpt, co);
    pos = (dir / "pos.safetensors").string();
    neg = (dir / "neg.safetensors").string();
    save_conditioning(pos, {synth_activations(6, 64, 1).reshape({1, 6, 64}), {}, {}});
    save_conditioning(neg, {synth_activations(3, 64, 2).reshape({1, 3, 64}), {}, {}});
  }
  ~Fixture() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string p(const std::string& f) const { return (dir / f).string(); }
};

}  // namespace

TEST(SamplerCli, RunMatchesTheLibraryAndRejectsBadInput) {
  const std::string bin = cli();
  if (bin.empty()) FAIL() << "the nibble CLI is missing beside the tests (the same build makes both)";
  Fixture f;
  const std::string out = f.p("out.latent");
  const std::string base = bin + " -q run " + f.ckpt + " --context " + f.pos;
  ASSERT_EQ(run(base + " --negative " + f.neg + " --width 64 --height 48 --seed 5 --steps 3 --cfg 2 -o " + out), 0);
  const Tensor got = load_latent(out);
  ASSERT_EQ(got.shape(), (Shape{1, 16, 1, 6, 8}));

  // The same sampling through the library.
  const nn::QwenImageTransformer model = nn::QwenImageTransformer::load(f.ckpt);
  const Conditioning pos = load_conditioning(f.pos, 64), neg = load_conditioning(f.neg, 64);
  nn::SamplerOptions so;
  so.steps = 3;
  so.cfg = 2;
  const Tensor latent = Tensor::zeros(DType::F32, {1, 16, 1, 6, 8});
  const nn::DenoiseFn fn = nn::qwen_image_denoiser(model, pos, neg);
  const Tensor want = nn::sample_flow(fn, latent, nn::flow_noise(latent.shape(), 5), so, true);
  for (int64_t i = 0; i < want.numel(); ++i) ASSERT_EQ(got.data<float>()[i], want.data<float>()[i]) << i;

  // --latent (a ComfyUI .latent) with --denoise, and the dequantized baseline, run too.
  EXPECT_EQ(run(base + " --latent " + out + " --denoise 0.5 --steps 2 --baseline dequantized -o " + f.p("img2img.latent")), 0);
  EXPECT_EQ(load_latent(f.p("img2img.latent")).shape(), (Shape{1, 16, 1, 6, 8}));

  // Bad input: exit status 1, nothing written.
  const std::string bad = f.p("bad.latent");
  save_conditioning(f.p("wide.safetensors"), {Tensor::zeros(DType::F32, {1, 4, 3584}), {}, {}});
  save_latent(f.p("four.latent"), Tensor::zeros(DType::F32, {1, 4, 1, 6, 8}));
  save_safetensors(f.p("old.latent"), {{"latent_tensor", Tensor::zeros(DType::F32, {1, 16, 6, 8})}});
  const std::string sized = " --width 64 --height 64 --steps 1 -o ";
  EXPECT_EQ(run(bin + " run " + f.ckpt + " --context " + f.p("wide.safetensors") + sized + bad), 1) << "context width";
  EXPECT_EQ(run(base + " --negative " + f.p("wide.safetensors") + sized + bad), 1) << "negative width";
  EXPECT_EQ(run(base + " --latent " + f.p("four.latent") + " --steps 1 -o " + bad), 1) << "latent channels";
  EXPECT_EQ(run(base + " --latent " + f.p("old.latent") + " --steps 1 -o " + bad), 1) << "no version marker";
  EXPECT_EQ(run(base + " --ref " + f.p("four.latent") + sized + bad), 1) << "ref channels";
  EXPECT_EQ(run(base + " --width 60 --height 64 --steps 1 -o " + bad), 1) << "width not a multiple of 16";
  EXPECT_EQ(run(base + " --steps 1 -o " + bad), 1) << "no size";
  EXPECT_EQ(run(base + " --latent " + out + sized + bad), 1) << "--latent and --width";
  EXPECT_EQ(run(base + " --baseline float" + sized + bad), 1) << "unknown baseline";
  EXPECT_EQ(run(base + " --scheduler karras" + sized + bad), 1) << "unknown scheduler";
  EXPECT_EQ(run(bin + " run " + f.pos + " --context " + f.pos + sized + bad), 1) << "not a checkpoint";
  EXPECT_EQ(run(base + sized + f.p("no/such/dir/x.latent")), 1) << "output directory";
  EXPECT_FALSE(fs::exists(bad));
  for (const auto& e : fs::directory_iterator(f.dir))
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << "temp file left: " << e.path();
}

// `nibble run --lora FILE[:S]` (repeatable): the same result as the library's Model::load with the
// LoRAs, a different one than without them; a missing file or an unmatched module exits 1.
TEST(SamplerCli, LoraOptionMatchesTheLibrary) {
  const std::string bin = cli();
  if (bin.empty()) FAIL() << "the nibble CLI is missing beside the tests (the same build makes both)";
  Fixture f;
  auto write_lora = [&](const std::string& file, const std::vector<std::string>& modules, uint64_t seed, int64_t r) {
    std::vector<std::pair<std::string, Tensor>> t;
    uint64_t s = seed;
    for (const auto& m : modules) {  // 256-wide layers of the fixture (to_q, to_out.0, add_q_proj)
      t.emplace_back("transformer." + m + ".lora_A.weight",
                     synth_activations(r, 256, s++).to(DType::BF16));
      Tensor up = synth_activations(256, r, s++);
      float* u = up.mutable_data<float>();
      for (int64_t i = 0; i < up.numel(); ++i) u[i] *= 0.05f;
      t.emplace_back("transformer." + m + ".lora_B.weight", up.to(DType::BF16));
    }
    save_safetensors(file, t);
  };
  const std::string la = f.p("a.safetensors"), lb = f.p("b.safetensors"), lbad = f.p("bad_lora.safetensors");
  write_lora(la, {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0"}, 10, 4);
  write_lora(lb, {"transformer_blocks.0.attn.add_q_proj"}, 20, 8);
  write_lora(lbad, {"transformer_blocks.7.attn.to_q"}, 30, 4);
  const std::string base = bin + " -q run " + f.ckpt + " --context " + f.pos + " --width 32 --height 32 --seed 3 --steps 2";
  const std::string out = f.p("lora.latent"), plain = f.p("plain.latent");
  ASSERT_EQ(run(base + " --lora " + la + ":0.7 --lora " + lb + " -o " + out), 0);
  ASSERT_EQ(run(base + " -o " + plain), 0);
  const Tensor got = load_latent(out), without = load_latent(plain);

  const std::vector<LoraSpec> specs = {parse_lora_spec(la + ":0.7"), parse_lora_spec(lb)};
  const nn::QwenImageTransformer model = nn::QwenImageTransformer::from_model(nn::Model::load(f.ckpt, specs));
  const Conditioning pos = load_conditioning(f.pos, 64);
  nn::SamplerOptions so;
  so.steps = 2;
  const Tensor latent = Tensor::zeros(DType::F32, {1, 16, 1, 4, 4});
  nn::DenoiseFn fn = [&](const Tensor& x, double sigma, bool) {
    nn::QwenImageInputs in;
    in.latent = x;
    in.context = pos.context;
    in.timestep = Tensor::empty(DType::F32, {1});
    in.timestep.mutable_data<float>()[0] = float(sigma);
    return model.forward(in);
  };
  const Tensor want = nn::sample_flow(fn, latent, nn::flow_noise(latent.shape(), 3), so, false);
  ASSERT_EQ(got.shape(), want.shape());
  double diff = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    ASSERT_EQ(got.data<float>()[i], want.data<float>()[i]) << i;
    diff = std::max(diff, double(std::fabs(got.data<float>()[i] - without.data<float>()[i])));
  }
  EXPECT_GT(diff, 1e-3) << "the LoRAs changed nothing";

  const std::string bad = f.p("bad.latent");
  EXPECT_EQ(run(base + " --lora " + f.p("missing.safetensors") + " -o " + bad), 1) << "missing LoRA file";
  EXPECT_EQ(run(base + " --lora " + lbad + " -o " + bad), 1) << "unmatched LoRA module";
  EXPECT_EQ(run(base + " --lora " + la + ":x1 -o " + bad), 1) << "bad strength";
  EXPECT_FALSE(fs::exists(bad));
}
