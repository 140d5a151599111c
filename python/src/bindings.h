// bindings.h — the parts of the _core module, each defined in its own bind_*.cpp.
#pragma once
#include <nanobind/nanobind.h>

namespace nibble_py {
namespace nb = nanobind;
void bind_ops(nb::module_& m);    // kitchen ops (bind_ops.cpp)
void bind_io(nb::module_& m);     // safetensors load/save (bind_io.cpp)
void bind_model(nb::module_& m);  // load(), inspect() (bind_model.cpp)
void bind_convert(nb::module_& m);  // convert() (bind_convert.cpp)
void bind_import(nb::module_& m);   // import_checkpoint(), apply_loras() (bind_import.cpp)
}  // namespace nibble_py
