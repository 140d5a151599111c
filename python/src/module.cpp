// nibble._core — the native half of the nibble Python package.
//
// Module layout: runtime settings (ISA, threads, version) here; the kitchen ops in bind_ops.cpp;
// safetensors I/O in bind_io.cpp; checkpoints (load / inspect) in bind_model.cpp; the converter
// in bind_convert.cpp.
// Errors (typed): nibble.Error is the base of everything the library raises;
//   nibble::IoError (file missing, unreadable, unwritable, truncated) → nibble.FileError, a subclass
//   of nibble.Error and OSError (errno set when the OS gave one);
//   every other nibble::Error (bad argument, bad content)  → nibble.InputError, a subclass of
//   nibble.Error and ValueError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "nibble/error.h"
#include "nibble/isa.h"
#include "nibble/thread_pool.h"
#include "nibble/version.h"

namespace nb = nanobind;

namespace {

// A new exception class `nibble._core.<name>` deriving from `bases` (a type or a tuple of types).
PyObject* new_exception(nb::module_& m, const char* name, PyObject* bases, const char* doc) {
  const std::string qual = std::string("nibble.") + name;
  PyObject* t = PyErr_NewExceptionWithDoc(qual.c_str(), doc, bases, nullptr);
  if (!t) throw nb::python_error();
  m.attr(name) = nb::handle(t);  // the module keeps a reference; `t` is never released
  return t;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "nibble native module (use the `nibble` package, not this module directly)";
  static PyObject* error = new_exception(m, "Error", PyExc_Exception,
                                         "Base class of every error the nibble library raises.");
  static PyObject* file_error = new_exception(
      m, "FileError", nb::make_tuple(nb::handle(error), nb::handle(PyExc_OSError)).ptr(),
      "A file cannot be opened, read, mapped or written, or is truncated (an OSError; errno is set "
      "when the operating system reported one).");
  static PyObject* input_error = new_exception(
      m, "InputError", nb::make_tuple(nb::handle(error), nb::handle(PyExc_ValueError)).ptr(),
      "A bad argument or bad file content: wrong shape or dtype, unknown format, malformed header "
      "(a ValueError).");
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const nibble::IoError& e) {
      if (e.error_code() != 0) {
        // OSError(errno, strerror): str() is "[Errno N] <message>", .errno and .strerror set.
        nb::object args = nb::make_tuple(e.error_code(), e.what());
        PyErr_SetObject(file_error, args.ptr());
      } else {
        PyErr_SetString(file_error, e.what());
      }
    } catch (const nibble::Error& e) {
      PyErr_SetString(input_error, e.what());
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
