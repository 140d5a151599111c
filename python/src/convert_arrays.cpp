// Python arrays ⇄ nibble::Tensor (design: convert_arrays.h).
#include "convert_arrays.h"

#include <nanobind/stl/string.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "nibble/dtype.h"
#include "nibble/error.h"

namespace nibble_py {

using nibble::DType;
using nibble::Tensor;

namespace {

// Modules are imported once and deliberately leaked: destroying Python objects from a static
// destructor after the interpreter has shut down would crash.
nb::handle numpy_module() {
  static nb::object* m = new nb::object(nb::module_::import_("numpy"));
  return *m;
}
nb::handle ml_dtypes_module() {
  static nb::object* m = new nb::object(nb::module_::import_("ml_dtypes"));
  return *m;
}

bool is_numpy_array(nb::handle obj) {
  return nb::isinstance(obj, numpy_module().attr("ndarray"));
}

std::string py_type_name(nb::handle obj) {
  return nb::cast<std::string>(nb::str(obj.type().attr("__name__")));
}

// numpy dtypes from ml_dtypes that numpy can neither export by DLPack nor by buffer: reinterpret.
struct Reinterpret { const char* ml_name; const char* as; DType dtype; };
constexpr Reinterpret kReinterpret[] = {
    {"bfloat16", "uint16", DType::BF16},
    {"float8_e4m3fn", "uint8", DType::F8_E4M3},
    {"float8_e5m2", "uint8", DType::F8_E5M2},
    {"float8_e8m0fnu", "uint8", DType::F8_E8M0},
};

bool dlpack_to_dtype(nb::dlpack::dtype d, DType* out) {
  using C = nb::dlpack::dtype_code;
  if (d.lanes != 1) return false;
  switch (C(d.code)) {
    case C::Float:
      if (d.bits == 64) { *out = DType::F64; return true; }
      if (d.bits == 32) { *out = DType::F32; return true; }
      if (d.bits == 16) { *out = DType::F16; return true; }
      return false;
    case C::Bfloat:
      if (d.bits == 16) { *out = DType::BF16; return true; }
      return false;
    case C::Int:
      if (d.bits == 8) { *out = DType::I8; return true; }
      if (d.bits == 16) { *out = DType::I16; return true; }
      if (d.bits == 32) { *out = DType::I32; return true; }
      if (d.bits == 64) { *out = DType::I64; return true; }
      return false;
    case C::UInt:
      if (d.bits == 8) { *out = DType::U8; return true; }
      if (d.bits == 16) { *out = DType::U16; return true; }
      if (d.bits == 32) { *out = DType::U32; return true; }
      if (d.bits == 64) { *out = DType::U64; return true; }
      return false;
    case C::Bool:
      if (d.bits == 8) { *out = DType::BOOL; return true; }
      return false;
    case C::Float8_E4M3FN: *out = DType::F8_E4M3; return d.bits == 8;
    case C::Float8_E5M2: *out = DType::F8_E5M2; return d.bits == 8;
    case C::Float8_E8M0FNU: *out = DType::F8_E8M0; return d.bits == 8;
    default: return false;
  }
}

std::string dlpack_name(nb::dlpack::dtype d) {
  return "DLPack(code=" + std::to_string(int(d.code)) + ", bits=" + std::to_string(int(d.bits)) +
         ", lanes=" + std::to_string(int(d.lanes)) + ")";
}

bool is_c_contiguous(const nb::ndarray<nb::ro>& a) {
  for (size_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) == 0) return true;  // no elements: any strides describe the same (no) memory
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    const int64_t n = int64_t(a.shape(i));
    if (n != 1 && a.stride(i) != expected) return false;
    expected *= n;
  }
  return true;
}

}  // namespace

Tensor ArgArrays::wrap(nb::handle obj, const char* what, bool bytes_as_int8) {
  if (!obj.is_valid() || obj.is_none()) return {};
  nb::object cur = nb::borrow(obj);
  std::optional<DType> tag;
  if (is_numpy_array(cur)) {
    const std::string name = nb::cast<std::string>(cur.attr("dtype").attr("name"));
    for (const auto& r : kReinterpret)
      if (name == r.ml_name) {
        tag = r.dtype;
        cur = cur.attr("view")(r.as);
      }
  } else if (nb::hasattr(cur, "requires_grad") && nb::hasattr(cur, "detach") &&
             nb::cast<bool>(cur.attr("requires_grad"))) {
    cur = cur.attr("detach")();  // torch refuses to export a tensor that requires grad
  }
  nb::ndarray<nb::ro> arr;
  if (!nb::try_cast(cur, arr))
    throw nibble::Error(std::string(what) +
                        ": expected an array (numpy array, torch tensor or any DLPack / buffer "
                        "protocol object) of a supported dtype, got " + py_type_name(obj));
  if (arr.device_type() != nb::device::cpu::value)
    throw nibble::Error(std::string(what) + ": expected a CPU array, got DLPack device type " +
                        std::to_string(arr.device_type()) +
                        " (nibble runs on the CPU; move the tensor with .cpu())");
  if (!is_c_contiguous(arr)) {
    if (is_numpy_array(cur))
      cur = numpy_module().attr("ascontiguousarray")(cur);
    else if (nb::hasattr(cur, "contiguous"))
      cur = cur.attr("contiguous")();
    else
      throw nibble::Error(std::string(what) + ": expected a C-contiguous array");
    if (!nb::try_cast(cur, arr) || !is_c_contiguous(arr))
      throw nibble::Error(std::string(what) + ": could not make the array C-contiguous");
  }
  DType dtype;
  if (tag) {
    dtype = *tag;
  } else if (!dlpack_to_dtype(arr.dtype(), &dtype)) {
    throw nibble::Error(std::string(what) + ": unsupported element type " +
                        dlpack_name(arr.dtype()));
  }
  // The kernels load elements with their natural alignment (and vector loads assume at least
  // that): an array whose data starts at a misaligned address — e.g. a float32 view at an odd
  // byte offset of a bytes buffer — is copied into a fresh, aligned array rather than viewed.
  const size_t elem = nibble::dtype_size(dtype);
  if (elem > 1 && reinterpret_cast<uintptr_t>(arr.data()) % elem != 0) {
    if (is_numpy_array(cur))
      cur = numpy_module().attr("array")(cur, nb::arg("copy") = true);
    else if (nb::hasattr(cur, "clone"))
      cur = cur.attr("clone")();
    else
      throw nibble::Error(std::string(what) + ": the array's data is not aligned to its " +
                          std::to_string(elem) + "-byte elements; pass an aligned copy");
    if (!nb::try_cast(cur, arr) || reinterpret_cast<uintptr_t>(arr.data()) % elem != 0)
      throw nibble::Error(std::string(what) + ": could not make an aligned copy of the array");
  }
  if (bytes_as_int8 && dtype == DType::U8) dtype = DType::I8;  // packed nibbles: same bytes
  nibble::Shape shape(arr.ndim());
  for (size_t i = 0; i < arr.ndim(); ++i) shape[i] = int64_t(arr.shape(i));
  Tensor t = Tensor::view(dtype, shape, arr.data(), nullptr, /*writable=*/false);
  arrays_.push_back(arr);
  objects_.push_back(std::move(cur));
  return t;
}

bool ArgArrays::overlaps(const void* p, size_t n) const {
  const auto* b = static_cast<const uint8_t*>(p);
  for (const auto& a : arrays_) {
    const auto* ab = static_cast<const uint8_t*>(a.data());
    const size_t an = a.nbytes();
    if (n && an && b < ab + an && ab < b + n) return true;
  }
  return false;
}

nb::object to_numpy(const Tensor& t_in, const ArgArrays* args) {
  if (!t_in.defined()) return nb::none();
  Tensor t = t_in;
  if (args && t.nbytes() && args->overlaps(t.raw(), t.nbytes())) t = t.clone();
  using C = nb::dlpack::dtype_code;
  nb::dlpack::dtype dt{uint8_t(C::Float), 32, 1};
  const char* view_as = nullptr;
  switch (t.dtype()) {
    case DType::F64: dt = {uint8_t(C::Float), 64, 1}; break;
    case DType::F32: dt = {uint8_t(C::Float), 32, 1}; break;
    case DType::F16: dt = {uint8_t(C::Float), 16, 1}; break;
    case DType::BF16: dt = {uint8_t(C::UInt), 16, 1}; view_as = "bfloat16"; break;
    case DType::I64: dt = {uint8_t(C::Int), 64, 1}; break;
    case DType::I32: dt = {uint8_t(C::Int), 32, 1}; break;
    case DType::I16: dt = {uint8_t(C::Int), 16, 1}; break;
    case DType::I8: dt = {uint8_t(C::Int), 8, 1}; break;
    case DType::U64: dt = {uint8_t(C::UInt), 64, 1}; break;
    case DType::U32: dt = {uint8_t(C::UInt), 32, 1}; break;
    case DType::U16: dt = {uint8_t(C::UInt), 16, 1}; break;
    case DType::U8: dt = {uint8_t(C::UInt), 8, 1}; break;
    case DType::BOOL: dt = {uint8_t(C::Bool), 8, 1}; break;
    case DType::F8_E4M3: dt = {uint8_t(C::UInt), 8, 1}; view_as = "float8_e4m3fn"; break;
    case DType::F8_E5M2: dt = {uint8_t(C::UInt), 8, 1}; view_as = "float8_e5m2"; break;
    case DType::F8_E8M0: dt = {uint8_t(C::UInt), 8, 1}; view_as = "float8_e8m0fnu"; break;
    case DType::C64: dt = {uint8_t(C::Complex), 64, 1}; break;
    default:
      throw nibble::Error(std::string("a tensor of dtype ") +
                          std::string(nibble::dtype_name(t.dtype())) +
                          " has no numpy representation");
  }
  auto* holder = new Tensor(t);
  nb::capsule owner(holder, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  std::vector<size_t> shape(t.shape().begin(), t.shape().end());
  // numpy needs a non-null pointer even for an empty array.
  static const uint64_t kEmpty = 0;
  void* data = const_cast<void*>(t.raw() ? t.raw() : &kEmpty);
  nb::ndarray<nb::numpy> arr(data, shape.size(), shape.data(), owner, nullptr, dt);
  nb::object out = nb::cast(arr);
  if (!t.writable() || !t.raw()) out.attr("setflags")(nb::arg("write") = false);
  if (view_as) out = out.attr("view")(ml_dtypes_module().attr(view_as));
  return out;
}

DType parse_dtype_name(const std::string& name_in) {
  std::string name = name_in;
  if (name.rfind("torch.", 0) == 0) name = name.substr(6);
  struct Alias { const char* name; DType dtype; };
  static const Alias kAliases[] = {
      {"float64", DType::F64}, {"double", DType::F64}, {"float32", DType::F32},
      {"float", DType::F32},   {"float16", DType::F16}, {"half", DType::F16},
      {"bfloat16", DType::BF16}, {"int8", DType::I8},  {"uint8", DType::U8},
      {"int16", DType::I16},   {"int32", DType::I32},  {"int64", DType::I64},
      {"float8_e4m3fn", DType::F8_E4M3}, {"float8_e5m2", DType::F8_E5M2},
  };
  for (const auto& a : kAliases)
    if (name == a.name) return a.dtype;
  DType d;
  if (nibble::parse_dtype(name, &d)) return d;
  throw nibble::Error("unknown dtype '" + name_in +
                      "': expected one of float32, float16, bfloat16, float64 (or a safetensors "
                      "spelling: " + nibble::supported_dtype_names() + ")");
}

std::string dtype_display_name(DType t) {
  switch (t) {
    case DType::F64: return "float64";
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I8: return "int8";
    case DType::U8: return "uint8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::F8_E4M3: return "float8_e4m3fn";
    case DType::F8_E5M2: return "float8_e5m2";
    default: return std::string(nibble::dtype_name(t));
  }
}

}  // namespace nibble_py
