// The consumer of an installed nibble: writes the seeded sample checkpoint (nibble/sample.h),
// loads it, runs one layer of each fused format and checks the output is finite. Public headers only.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#include "nibble/nn.h"
#include "nibble/sample.h"
#include "nibble/version.h"

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : (std::filesystem::temp_directory_path() / "nibble_consumer.safetensors").string();
  try {
    nibble::write_sample_checkpoint(path);
    const nibble::nn::Model model = nibble::nn::load_checkpoint(path);
    for (const char* name : {"transformer_blocks.0.img_mod.1", "transformer_blocks.0.attn.to_q"}) {
      const nibble::nn::Linear& layer = model.linear(name);
      nibble::Tensor x = nibble::Tensor::zeros(nibble::DType::F32, {3, layer.in_features()});
      for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = float(i % 7) * 0.25f - 0.75f;
      const nibble::Tensor y = layer.forward(x);
      double sum = 0;
      for (int64_t i = 0; i < y.numel(); ++i) {
        if (!std::isfinite(y.data<float>()[i])) {
          std::fprintf(stderr, "consumer: %s: non-finite output\n", name);
          return 1;
        }
        sum += y.data<float>()[i];
      }
      std::printf("nibble %s: %s (%s) -> %lld outputs, sum %.4f\n", NIBBLE_VERSION_STRING, name,
                  layer.format_name().c_str(), (long long)y.numel(), sum);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
  std::filesystem::remove(path);
  return 0;
}
