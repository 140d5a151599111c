// Checkpoints from Python: load() → Model of callable Layers, and inspect().
//
// A Model maps a checkpoint (file, index or shard directory) and binds every linear layer through
// the format registry (nibble::collect_layers / bind_layer): each Layer keeps zero-copy views of
// its tensors. The first call prepares the fused weights (repack for the active ISA) once; calls
// run with the GIL released. Output dtype = input dtype, like torch.nn.Linear.
// Layers of formats without a fused kernel run dequantize() once (cached fp32 weight) and the
// dense fp32 GEMM; float layers run the dense GEMM on their stored weight.
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <map>
#include <mutex>

#include "bindings.h"
#include "convert_arrays.h"
#include "nibble/safetensors.h"
#include "weak_ops.h"

namespace nibble_py {

using nibble::DType;
using nibble::Tensor;

namespace {

// QuantizedLayer's member helpers live in the formats library; these local equivalents keep the
// module importable while that part is still landing.
const Tensor& param_of(const nibble::QuantizedLayer& q, const std::string& name) {
  auto it = q.params.find(name);
  if (it == q.params.end())
    throw nibble::Error("layer '" + q.name + "': missing tensor '" + name + "'");
  return it->second;
}
uint64_t storage_bytes_of(const nibble::QuantizedLayer& q) {
  uint64_t n = q.bias.defined() ? q.bias.nbytes() : 0;
  for (const auto& [k, t] : q.params) n += t.nbytes();
  return n;
}

class Layer {
 public:
  explicit Layer(nibble::QuantizedLayer q) : q_(std::move(q)) {}

  const nibble::QuantizedLayer& q() const { return q_; }
  std::string format() const { return q_.format ? q_.format->name : std::string("float"); }

  // x (..., K) float → (..., N) in x's dtype. Called with the GIL released.
  Tensor forward(const Tensor& x) {
    const DType xd = x.dtype();
    if (xd != DType::F32 && xd != DType::BF16 && xd != DType::F16)
      throw nibble::Error("layer '" + q_.name + "': input must be float32, bfloat16 or float16, got " +
                          std::string(nibble::dtype_name(xd)));
    if (x.dim() < 1 || x.size(-1) != q_.K)
      throw nibble::Error("layer '" + q_.name + "': input must have shape (..., " +
                          std::to_string(q_.K) + "), got " + nibble::shape_str(x.shape()));
    prepare();
    if (awq_) {
      using Fn = Tensor(const Tensor&, const nibble::AwqW4A16Prepared&, std::optional<DType>);
      Fn* fn = &nibble::gemv_awq_w4a16;
      require(fn, "gemv_awq_w4a16 (prepared)");
      return fn(x, *awq_, xd);
    }
    if (svd_) {
      using Fn = Tensor(const Tensor&, const nibble::SvdquantW4A4Prepared&, std::optional<DType>);
      Fn* fn = &nibble::svdquant_linear;
      require(fn, "svdquant_linear (prepared)");
      return fn(x, *svd_, xd);
    }
    require(&nibble::linear_f32, "linear_f32");
    Tensor y = nibble::linear_f32(x, dense_, bias_f32_);
    return y.dtype() == xd ? y : y.to(xd);
  }

  Tensor dequantized() {
    if (!q_.format) return param_of(q_, "weight").to(DType::F32);
    require(&nibble::dequantize, "dequantize");
    return nibble::dequantize(q_);
  }

 private:
  void prepare() {
    std::call_once(prepared_, [this] {
      const std::string& f = q_.format ? q_.format->name : std::string();
      if (f == "awq_w4a16") {
        require(&nibble::awq_params, "awq_params");
        require(&nibble::prepare_awq_w4a16, "prepare_awq_w4a16");
        awq_ = nibble::prepare_awq_w4a16(nibble::awq_params(q_));
      } else if (f == "svdquant_w4a4") {
        require(&nibble::svdquant_params, "svdquant_params");
        require(&nibble::prepare_svdquant_w4a4, "prepare_svdquant_w4a4");
        svd_ = nibble::prepare_svdquant_w4a4(nibble::svdquant_params(q_));
      } else {
        dense_ = q_.format ? dequantized() : param_of(q_, "weight");
        if (q_.bias.defined()) bias_f32_ = q_.bias.to_f32();
      }
    });
  }

  nibble::QuantizedLayer q_;
  std::once_flag prepared_;
  std::shared_ptr<const nibble::AwqW4A16Prepared> awq_;
  std::shared_ptr<const nibble::SvdquantW4A4Prepared> svd_;
  Tensor dense_, bias_f32_;
};

struct Model {
  nibble::Checkpoint ckpt;
  std::vector<std::string> order;
  std::map<std::string, std::shared_ptr<Layer>> layers;
};

std::vector<nibble::LayerSource> collect(const nibble::Checkpoint& ckpt) {
  require(&nibble::collect_layers, "collect_layers");
  require(&nibble::bind_layer, "bind_layer");
  return nibble::collect_layers(ckpt, false);
}

std::shared_ptr<Model> load(const std::string& path) {
  auto model = std::make_shared<Model>();
  {
    nb::gil_scoped_release unlocked;
    model->ckpt = nibble::Checkpoint::open(path);
    for (const auto& src : collect(model->ckpt)) {
      auto layer = std::make_shared<Layer>(nibble::bind_layer(src));
      model->order.push_back(src.name);
      model->layers.emplace(src.name, std::move(layer));
    }
  }
  return model;
}

nb::dict layer_summary(const nibble::QuantizedLayer& q) {
  nb::dict d;
  d["name"] = q.name;
  d["format"] = q.format ? q.format->name : std::string("float");
  d["out_features"] = q.N;
  d["in_features"] = q.K;
  if (q.params.count("weight")) {
    d["weight_dtype"] = dtype_display_name(param_of(q, "weight").dtype());
    d["weight_shape"] = std::vector<int64_t>(param_of(q, "weight").shape());
  }
  if (q.group_size) d["group_size"] = q.group_size;
  if (q.rank) d["rank"] = q.rank;
  if (q.format && q.format->name == "svdquant_w4a4") {
    d["act_unsigned"] = q.act_unsigned;
    d["tile_packed"] = q.tile_packed;
  }
  d["has_bias"] = q.bias.defined();
  d["bytes"] = storage_bytes_of(q);
  d["warnings"] = q.warnings;
  return d;
}

nb::dict inspect(const std::string& path) {
  nibble::Checkpoint ckpt;
  std::vector<nibble::LayerSource> sources;
  {
    nb::gil_scoped_release unlocked;
    ckpt = nibble::Checkpoint::open(path);
    sources = collect(ckpt);
  }
  nb::dict out;
  out["path"] = path;
  out["files"] = ckpt.shards().size();
  out["tensors"] = ckpt.names().size();
  out["bytes"] = ckpt.total_bytes();
  out["metadata"] = ckpt.metadata();
  nb::list layers;
  std::map<std::string, int64_t> counts;
  int64_t errors = 0;
  for (const auto& src : sources) {
    try {
      const auto q = nibble::bind_layer(src);
      nb::dict d = layer_summary(q);
      counts[q.format ? q.format->name : "float"]++;
      layers.append(d);
    } catch (const nibble::Error& e) {
      // One bad layer must not hide the rest of the report.
      nb::dict d;
      d["name"] = src.name;
      d["format"] = src.config ? src.config->format : std::string("float");
      d["error"] = std::string(e.what());
      layers.append(d);
      ++errors;
    }
  }
  out["layers"] = layers;
  out["formats"] = counts;
  out["errors"] = errors;
  return out;
}

}  // namespace

void bind_model(nb::module_& m) {
  nb::class_<Layer>(m, "Layer")
      .def_prop_ro("name", [](const Layer& l) { return l.q().name; })
      .def_prop_ro("format", &Layer::format)
      .def_prop_ro("in_features", [](const Layer& l) { return l.q().K; })
      .def_prop_ro("out_features", [](const Layer& l) { return l.q().N; })
      .def_prop_ro("group_size", [](const Layer& l) { return l.q().group_size; })
      .def_prop_ro("rank", [](const Layer& l) { return l.q().rank; })
      .def_prop_ro("act_unsigned", [](const Layer& l) { return l.q().act_unsigned; })
      .def_prop_ro("tile_packed", [](const Layer& l) { return l.q().tile_packed; })
      .def_prop_ro("warnings", [](const Layer& l) { return l.q().warnings; })
      .def_prop_ro("config", [](const Layer& l) { return l.q().config.json; })
      .def_prop_ro("params",
                   [](const Layer& l) {
                     nb::dict d;
                     for (const auto& [k, t] : l.q().params) d[k.c_str()] = to_numpy(t);
                     return d;
                   })
      .def_prop_ro("bias", [](const Layer& l) { return to_numpy(l.q().bias); })
      .def("summary", [](const Layer& l) { return layer_summary(l.q()); })
      .def("dequantize",
           [](Layer& l) {
             Tensor w;
             {
               nb::gil_scoped_release unlocked;
               w = l.dequantized();
             }
             return to_numpy(w);
           },
           "The effective fp32 weight (out_features, in_features).")
      .def("__call__",
           [](Layer& l, nb::handle x) {
             ArgArrays args;
             const Tensor tx = args.wrap(x, "x");
             Tensor y;
             {
               nb::gil_scoped_release unlocked;
               y = l.forward(tx);
             }
             return to_numpy(y, &args);
           },
           nb::arg("x"))
      .def("__repr__", [](const Layer& l) {
        return "<nibble.Layer " + l.q().name + " " + l.format() + " " + std::to_string(l.q().N) +
               "x" + std::to_string(l.q().K) + ">";
      });

  nb::class_<Model>(m, "Model")
      .def_prop_ro("path", [](const Model& mo) { return mo.ckpt.path(); })
      .def_prop_ro("metadata", [](const Model& mo) { return mo.ckpt.metadata(); })
      .def_prop_ro("layers",
                   [](const Model& mo) {
                     nb::dict d;
                     for (const auto& n : mo.order) d[n.c_str()] = nb::cast(mo.layers.at(n));
                     return d;
                   })
      .def("__len__", [](const Model& mo) { return mo.order.size(); })
      .def("__contains__", [](const Model& mo, const std::string& n) { return mo.layers.count(n) > 0; })
      .def("__getitem__",
           [](const Model& mo, const std::string& n) {
             auto it = mo.layers.find(n);
             if (it == mo.layers.end())
               throw nb::key_error(("no layer named '" + n + "' in " + mo.ckpt.path()).c_str());
             return it->second;
           })
      .def("__repr__", [](const Model& mo) {
        return "<nibble.Model " + mo.ckpt.path() + ": " + std::to_string(mo.order.size()) +
               " layers>";
      });

  m.def("load", &load, nb::arg("path"));
  m.def("inspect", &inspect, nb::arg("path"));
}

}  // namespace nibble_py
