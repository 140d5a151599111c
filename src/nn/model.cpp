// nn::Model: every linear of a checkpoint, bound once at load (spec §4.1 detection and prefixes).
#include <fmt/format.h>

#include <algorithm>

#include "nibble/nn.h"

namespace nibble::nn {

namespace {
constexpr std::string_view kFullPrefix = "model.diffusion_model.";
}

Model load_checkpoint(const std::string& path) { return Model::load(path); }

Model Model::load(const std::string& path) {
  auto ckpt = std::make_shared<Checkpoint>(Checkpoint::open(path));
  Model m = from_checkpoint(*ckpt);
  m.ckpt_ = ckpt;
  return m;
}

// Model::load(path, loras, ...) is defined with the LoRA code in src/convert/lora_model.cpp.

Model Model::from_checkpoint(const Checkpoint& ckpt_in) { return build(ckpt_in, nullptr); }

Model Model::build(const Checkpoint& ckpt_in, const LayerTransform* transform) {
  Model m;
  m.ckpt_ = std::make_shared<Checkpoint>(ckpt_in);
  const Checkpoint& ckpt = *m.ckpt_;
  m.path_ = ckpt.path();
  m.mixed_ = has_quant_configs(ckpt);
  for (const auto& n : ckpt.names())
    if (n.rfind(kFullPrefix, 0) == 0) {
      m.prefix_ = std::string(kFullPrefix);
      break;
    }
  const std::vector<LayerSource> sources = collect_layers(ckpt);
  if (transform && transform->prepare) {
    std::vector<std::string> names;
    for (const LayerSource& src : sources) names.push_back(m.strip(src.name));
    transform->prepare(names);
  }
  for (const LayerSource& src : sources) {
    QuantizedLayer bound;
    try {
      bound = bind_layer(src);
    } catch (const Error& e) {
      const std::string what = e.what();
      throw Error(what.find(src.name) != std::string::npos
                      ? fmt::format("{}: {}", ckpt.path(), what)
                      : fmt::format("{}: layer '{}': {}", ckpt.path(), src.name, what));
    }
    const std::string key = m.strip(src.name);
    if (m.linears_.count(key))
      throw Error(fmt::format("{}: layer '{}' appears twice (with and without the '{}' prefix)", ckpt.path(),
                              src.name, kFullPrefix));
    if (transform && transform->apply) bound = transform->apply(key, std::move(bound));
    m.linears_.emplace(key, Linear::from_layer(bound));
  }
  return m;
}

std::string Model::strip(std::string_view name) const {
  if (!prefix_.empty() && name.rfind(prefix_, 0) == 0) name.remove_prefix(prefix_.size());
  return std::string(name);
}

std::vector<std::string> Model::names() const {
  std::vector<std::string> r;
  for (auto& [k, v] : linears_) r.push_back(k);
  return r;
}

bool Model::contains(std::string_view name) const { return linears_.count(strip(name)) != 0; }

const Linear& Model::linear(std::string_view name) const {
  auto it = linears_.find(strip(name));
  if (it != linears_.end()) return it->second;
  // Near matches: names sharing the last two components.
  std::string tail(name);
  size_t dots = 0, pos = tail.size();
  while (pos > 0 && dots < 2) {
    --pos;
    if (tail[pos] == '.') ++dots;
  }
  if (dots == 2) tail = tail.substr(pos + 1);
  std::vector<std::string> near;
  for (auto& [k, v] : linears_)
    if (k.find(tail) != std::string::npos && near.size() < 5) near.push_back(k);
  throw Error(fmt::format("{}: no linear layer '{}' ({} layers{}{})", path_, name, linears_.size(),
                          near.empty() ? "" : "; similar: ", fmt::join(near, ", ")));
}

bool Model::has_tensor(std::string_view name) const {
  return ckpt_->contains(prefix_ + strip(name)) || ckpt_->contains(name);
}

Tensor Model::tensor(std::string_view name) const {
  const std::string full = prefix_ + strip(name);
  if (ckpt_->contains(full)) return ckpt_->get(full);
  if (ckpt_->contains(name)) return ckpt_->get(name);
  throw Error(fmt::format("{}: no tensor '{}'", path_, name));
}

uint64_t Model::stored_bytes() const {
  uint64_t b = 0;
  for (auto& [k, v] : linears_) b += v.stored_bytes();
  return b;
}

}  // namespace nibble::nn
