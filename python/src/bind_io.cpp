// safetensors I/O through the library's reader and writer (spec: the safetensors format).
//
// load_file() returns read-only numpy arrays that are zero-copy views of the memory-mapped file
// (each array keeps the mapping alive); save_file() writes arrays without copying them, with the
// GIL released, atomically (temporary file + rename). Both accept a single .safetensors file;
// load_file() also accepts an index.json or a directory of shards (nibble::Checkpoint).
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "convert_arrays.h"
#include "nibble/safetensors.h"

namespace nibble_py {

using nibble::Tensor;

namespace {

nb::dict load_file(const std::string& path) {
  nibble::Checkpoint ckpt;
  {
    nb::gil_scoped_release unlocked;
    ckpt = nibble::Checkpoint::open(path);
  }
  nb::dict out;
  for (const auto& name : ckpt.names()) out[name.c_str()] = to_numpy(ckpt.get(name));
  return out;
}

std::map<std::string, std::string> read_metadata(const std::string& path) {
  nb::gil_scoped_release unlocked;
  return nibble::Checkpoint::open(path).metadata();
}

void save_file(nb::dict tensors, const std::string& path,
               const std::optional<std::map<std::string, std::string>>& metadata) {
  ArgArrays args;
  std::vector<std::pair<std::string, Tensor>> list;
  for (auto [key, value] : tensors) {
    if (!nb::isinstance<nb::str>(key))
      throw nibble::Error("save_file: tensor names must be str, got " +
                          nb::cast<std::string>(nb::str(key.type().attr("__name__"))));
    std::string name = nb::cast<std::string>(key);
    list.emplace_back(name, args.wrap(value, name.c_str()));
  }
  const auto meta = metadata.value_or(std::map<std::string, std::string>{});
  nb::gil_scoped_release unlocked;
  nibble::save_safetensors(path, list, meta);
}

}  // namespace

void bind_io(nb::module_& m) {
  m.def("load_file", &load_file, nb::arg("path"));
  m.def("read_metadata", &read_metadata, nb::arg("path"));
  m.def("save_file", &save_file, nb::arg("tensors"), nb::arg("path"),
        nb::arg("metadata").none() = nb::none());
}

}  // namespace nibble_py
