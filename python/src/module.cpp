// nibble._core — the native half of the nibble Python package.
//
// Module layout: runtime settings (ISA, threads, version) here; the kitchen ops in bind_ops.cpp;
// safetensors I/O in bind_io.cpp; checkpoints (load / inspect) in bind_model.cpp; the converter
// in bind_convert.cpp.
// Errors: nibble::Error → nibble.Error (subclass of ValueError); an entry point missing from this
// build of libnibble → NotImplementedError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "nibble/error.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"
#include "nibble/version.h"
#include "weak_ops.h"

namespace nb = nanobind;

// Called by the stubs link_probe.py generates for library functions not defined in this build.
namespace nibble_py {
[[noreturn]] void missing_entry_point(const char* name) { throw NotBuilt(name); }
}  // namespace nibble_py

NB_MODULE(_core, m) {
  m.doc() = "nibble native module (use the `nibble` package, not this module directly)";
  static nb::exception<nibble::Error> error_type(m, "Error", PyExc_ValueError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const nibble_py::NotBuilt& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    }
  });

  m.attr("__version__") = NIBBLE_VERSION_STRING;

  m.def("isa", [] { return std::string(nibble::isa_name(nibble::active_isa())); },
        "The instruction-set level kernels use now: scalar, avx2, avx512, avx512vnni, avx512bf16.");
  m.def("set_isa",
        [](const std::string& name) {
          nibble::Isa isa;
          if (!nibble::parse_isa(name, &isa))
            throw nibble::Error("unknown ISA '" + name + "': expected auto or one of " +
                                nibble::compiled_isas_string());
          nibble::set_isa(isa);
        },
        nb::arg("name"), "Select the kernel path ('auto' = best detected; 'scalar' = reference).");
  m.def("supported_isas", [] {
    std::vector<std::string> out;
    for (nibble::Isa i : nibble::supported_isas()) out.emplace_back(nibble::isa_name(i));
    return out;
  });
  m.def("compiled_isas", [] { return nibble::compiled_isas_string(); });
  m.def("cpu_features", [] { return nibble::cpu_features_string(); });
  m.def("num_threads", [] { return nibble::num_threads(); });
  m.def("set_num_threads", [](int n) { nibble::set_num_threads(n); }, nb::arg("n"),
        "Threads of the library pool (n <= 0: default, NIBBLE_NUM_THREADS or all cores).");

  nibble_py::bind_ops(m);
  nibble_py::bind_io(m);
  nibble_py::bind_model(m);
  nibble_py::bind_convert(m);
  nibble_py::bind_import(m);
}
