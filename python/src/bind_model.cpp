// Checkpoints from Python: load() → Model of callable Layers (the runtime of nibble/nn.h), and
// inspect() (the same report as `nibble inspect --json`).
//
// Model/Layer wrap nibble::nn::Model/Linear: layers are bound and their weights prepared once at
// load; tensors stay zero-copy views of the mapped file. A call wraps the input zero-copy, runs
// Linear::forward (fp32 result) with the GIL released, and returns x's dtype unless `out_dtype`
// asks otherwise (torch.nn.Linear semantics; float32 keeps the exact fp32 result).
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "convert_arrays.h"
#include "nibble/inspect.h"
#include "nibble/nn.h"
#include "nibble/safetensors.h"
#include "nibble/sample.h"

namespace nibble_py {

using nibble::DType;
using nibble::Tensor;
using nibble::nn::Linear;

namespace {

// A Model shared by its Layers (a Layer keeps its Model, hence the mapping, alive).
struct PyModel {
  nibble::nn::Model model;
};

struct PyLayer {
  std::shared_ptr<const PyModel> owner;
  const Linear* linear = nullptr;

  const Linear& l() const { return *linear; }
};

nb::object call_layer(const PyLayer& self, nb::handle x, const std::optional<std::string>& out_dtype) {
  ArgArrays args;
  const Tensor tx = args.wrap(x, "x");
  DType od = tx.dtype();
  if (out_dtype) od = parse_dtype_name(*out_dtype);
  if (od != DType::F32 && od != DType::BF16 && od != DType::F16)
    throw nibble::Error("layer '" + self.l().name() +
                        "': output dtype must be float32, bfloat16 or float16, got " +
                        dtype_display_name(od));
  Tensor y;
  {
    nb::gil_scoped_release unlocked;
    y = self.l().forward(tx);
    if (y.dtype() != od) y = y.to(od);
  }
  return to_numpy(y, &args);
}

nb::dict layer_params(const PyLayer& self) {
  nb::dict d;
  for (const auto& [k, t] : self.l().layer().params) d[k.c_str()] = to_numpy(t);
  if (self.l().layer().bias.defined()) d["bias"] = to_numpy(self.l().layer().bias);
  return d;
}

std::shared_ptr<PyModel> load(const std::string& path, const std::vector<std::pair<std::string, float>>& loras,
                              bool partial) {
  auto m = std::make_shared<PyModel>();
  nb::gil_scoped_release unlocked;
  if (loras.empty()) {
    m->model = nibble::nn::Model::load(path);
  } else {  // LoRAs applied at load (nibble/lora.h)
    std::vector<nibble::LoraSpec> specs;
    for (const auto& [file, strength] : loras) specs.push_back({file, strength});
    m->model = nibble::nn::Model::load(path, specs, partial);
  }
  return m;
}

PyLayer get_layer(const std::shared_ptr<PyModel>& m, const std::string& name) {
  return PyLayer{m, &m->model.linear(name)};
}

std::string inspect_json(const std::string& path, const std::string& filter) {
  nb::gil_scoped_release unlocked;
  const nibble::Checkpoint ckpt = nibble::Checkpoint::open(path);
  return nibble::inspect_json(nibble::inspect_checkpoint(ckpt, filter));
}

std::string inspect_text(const std::string& path, const std::string& filter) {
  nb::gil_scoped_release unlocked;
  const nibble::Checkpoint ckpt = nibble::Checkpoint::open(path);
  return nibble::inspect_text(nibble::inspect_checkpoint(ckpt, filter));
}

}  // namespace

void bind_model(nb::module_& m) {
  nb::class_<PyLayer>(m, "Layer")
      .def_prop_ro("name", [](const PyLayer& s) { return s.l().name(); })
      .def_prop_ro("format", [](const PyLayer& s) { return s.l().format_name(); },
                   "awq_w4a16, svdquant_w4a4, float8_e4m3fn, ... or the float dtype of a plain layer")
      .def_prop_ro("path", [](const PyLayer& s) {
        return std::string(nibble::nn::linear_path_name(s.l().path()));
      }, "how forward runs: the fused kernel, dense float, or the dequantize fallback")
      .def_prop_ro("in_features", [](const PyLayer& s) { return s.l().in_features(); })
      .def_prop_ro("out_features", [](const PyLayer& s) { return s.l().out_features(); })
      .def_prop_ro("act_unsigned", [](const PyLayer& s) { return s.l().act_unsigned(); })
      .def_prop_ro("group_size", [](const PyLayer& s) { return s.l().layer().group_size; })
      .def_prop_ro("rank", [](const PyLayer& s) { return s.l().layer().rank; })
      .def_prop_ro("tile_packed", [](const PyLayer& s) { return s.l().layer().tile_packed; })
      .def_prop_ro("warnings", [](const PyLayer& s) { return s.l().layer().warnings; })
      .def_prop_ro("config", [](const PyLayer& s) { return s.l().layer().config.json; },
                   "the layer's comfy_quant JSON text ('' for a float layer)")
      .def_prop_ro("stored_bytes", [](const PyLayer& s) { return s.l().stored_bytes(); })
      .def_prop_ro("params", &layer_params,
                   "the layer's tensors by canonical name (read-only zero-copy views)")
      .def("dequantize",
           [](const PyLayer& s) {
             Tensor w;
             {
               nb::gil_scoped_release unlocked;
               w = s.l().effective_weight();
             }
             return to_numpy(w);
           },
           "The effective fp32 weight W_eff (out_features, in_features).")
      .def("effective_bias",
           [](const PyLayer& s) {
             Tensor b;
             {
               nb::gil_scoped_release unlocked;
               b = s.l().effective_bias();
             }
             return to_numpy(b);
           },
           "The fp32 bias a dense layer with dequantize() needs to reproduce this layer.")
      .def("__call__", &call_layer, nb::arg("x"), nb::arg("out_dtype").none() = nb::none())
      .def("__repr__", [](const PyLayer& s) {
        return "<nibble.Layer " + s.l().name() + ": " + s.l().format_name() + " " +
               std::to_string(s.l().out_features()) + "x" + std::to_string(s.l().in_features()) +
               " (" + nibble::nn::linear_path_name(s.l().path()) + ")>";
      });

  nb::class_<PyModel>(m, "Model")
      .def_prop_ro("path", [](const PyModel& s) { return s.model.path(); })
      .def_prop_ro("mixed", [](const PyModel& s) { return s.model.mixed(); },
                   "True if any layer carries a comfy_quant config (ComfyUI's mixed_ops detection)")
      .def_prop_ro("prefix", [](const PyModel& s) { return s.model.prefix(); })
      .def_prop_ro("metadata", [](const PyModel& s) { return s.model.checkpoint().metadata(); })
      .def_prop_ro("stored_bytes", [](const PyModel& s) { return s.model.stored_bytes(); })
      .def("names", [](const PyModel& s) { return s.model.names(); })
      .def_prop_ro("layers",
                   [](const std::shared_ptr<PyModel>& s) {
                     nb::dict d;
                     for (const auto& n : s->model.names()) d[n.c_str()] = nb::cast(get_layer(s, n));
                     return d;
                   },
                   "name (without the model.diffusion_model. prefix) → callable Layer")
      .def("tensor",
           [](const PyModel& s, const std::string& name) { return to_numpy(s.model.tensor(name)); },
           nb::arg("name"), "a non-linear tensor of the checkpoint (zero-copy, read-only)")
      .def("__len__", [](const PyModel& s) { return s.model.size(); })
      .def("__contains__", [](const PyModel& s, const std::string& n) { return s.model.contains(n); })
      .def("__getitem__",
           [](const std::shared_ptr<PyModel>& s, const std::string& n) {
             if (!s->model.contains(n))
               throw nb::key_error(("no linear layer named '" + n + "' in " + s->model.path()).c_str());
             return get_layer(s, n);
           })
      .def("__repr__", [](const PyModel& s) {
        return "<nibble.Model " + s.model.path() + ": " + std::to_string(s.model.size()) +
               " linear layers>";
      });

  m.def("load", &load, nb::arg("path"), nb::arg("loras") = std::vector<std::pair<std::string, float>>{},
        nb::arg("partial") = false);
  m.def("write_sample_checkpoint",
        [](const std::string& path, uint64_t seed, int64_t hidden, int64_t rank,
           const std::string& prefix, bool configs_in_metadata) {
          nibble::SampleOptions o;
          o.seed = seed;
          o.hidden = hidden;
          o.rank = rank;
          o.prefix = prefix;
          o.configs_in_metadata = configs_in_metadata;
          nb::gil_scoped_release unlocked;
          nibble::write_sample_checkpoint(path, o);
        },
        nb::arg("path"), nb::arg("seed") = 20261123, nb::arg("hidden") = 256, nb::arg("rank") = 16,
        nb::arg("prefix") = "", nb::arg("configs_in_metadata") = false);
  m.def("inspect_json", &inspect_json, nb::arg("path"), nb::arg("filter") = "");
  m.def("inspect_text", &inspect_text, nb::arg("path"), nb::arg("filter") = "");
}

}  // namespace nibble_py
