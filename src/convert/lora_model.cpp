// Model::load with LoRAs applied at load (declared in nibble/nn.h, documented in nibble/lora.h):
// the LoRA matching and application of this convert layer, plugged into nn::Model's generic layer
// transform, so the runtime (nn) does not depend on the converter.
#include "nibble/lora.h"
#include "nibble/nn.h"

namespace nibble::nn {

Model Model::load(const std::string& path, const std::vector<LoraSpec>& loras, bool partial, LoraApplyStats* stats) {
  auto ckpt = std::make_shared<Checkpoint>(Checkpoint::open(path));
  LoraMatch match;
  LayerTransform t;
  t.prepare = [&](const std::vector<std::string>& names) {
    if (!loras.empty()) match = match_loras(loras, names, partial);
  };
  t.apply = [&](const std::string& name, QuantizedLayer layer) {
    const auto it = match.layers.find(name);
    return it == match.layers.end() ? layer : apply_lora(layer, it->second, stats);
  };
  Model m = build(*ckpt, &t);
  m.ckpt_ = ckpt;
  return m;
}

}  // namespace nibble::nn
