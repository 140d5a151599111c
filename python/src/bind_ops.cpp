// The three kitchen ops (spec §6) and the dense helper, as module functions.
//
// Argument names, order and defaults follow comfy-kitchen; the Python layer (nibble/__init__.py)
// only adds framework round-tripping (torch in → torch out). Inputs are wrapped zero-copy, the
// kernels run with the GIL released, and the library's nibble::Error becomes nibble.Error (a
// ValueError).
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include "bindings.h"
#include "convert_arrays.h"
#include "nibble/ops.h"

namespace nibble_py {

using nibble::DType;
using nibble::Tensor;

namespace {

std::optional<DType> opt_dtype(const std::optional<std::string>& s) {
  if (!s) return std::nullopt;
  return parse_dtype_name(*s);
}

nb::object gemv_awq_w4a16(nb::handle x, nb::handle qweight, nb::handle wscales, nb::handle wzeros,
                          nb::handle bias, int64_t group_size,
                          const std::optional<std::string>& out_dtype) {
  using Fn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    int64_t, std::optional<DType>);
  Fn* fn = &nibble::gemv_awq_w4a16;
  ArgArrays args;
  const Tensor tx = args.wrap(x, "x");
  const Tensor tq = args.wrap(qweight, "qweight", /*bytes_as_int8=*/true);
  const Tensor ts = args.wrap(wscales, "wscales");
  const Tensor tz = args.wrap(wzeros, "wzeros");
  const Tensor tb = args.wrap(bias, "bias");
  const auto od = opt_dtype(out_dtype);
  Tensor y;
  {
    nb::gil_scoped_release unlocked;
    y = fn(tx, tq, ts, tz, tb, group_size, od);
  }
  return to_numpy(y, &args);
}

nb::tuple quantize_svdquant_w4a4(nb::handle x, nb::handle smooth, nb::handle lora_down,
                                 int64_t pad_size, bool act_unsigned, nb::handle lora_x,
                                 const std::optional<std::string>& lora_act_dtype) {
  auto* fn = &nibble::quantize_svdquant_w4a4;
  ArgArrays args;
  const Tensor tx = args.wrap(x, "x");
  const Tensor ts = args.wrap(smooth, "smooth");
  const Tensor td = args.wrap(lora_down, "lora_down");
  const Tensor tl = args.wrap(lora_x, "lora_x");
  const auto od = opt_dtype(lora_act_dtype);
  nibble::SvdquantActs r;
  {
    nb::gil_scoped_release unlocked;
    r = fn(tx, ts, td, pad_size, act_unsigned, tl, od);
  }
  return nb::make_tuple(to_numpy(r.q_x, &args), to_numpy(r.ascales, &args),
                        to_numpy(r.lora_act, &args));
}

nb::object scaled_mm_svdquant_w4a4(nb::handle act, nb::handle wgt, nb::handle ascales,
                                   nb::handle wscales, nb::handle lora_act_in, nb::handle lora_up,
                                   nb::handle bias, bool act_unsigned,
                                   const std::optional<std::string>& out_dtype) {
  auto* fn = &nibble::scaled_mm_svdquant_w4a4;
  ArgArrays args;
  const Tensor ta = args.wrap(act, "act", /*bytes_as_int8=*/true);
  const Tensor tw = args.wrap(wgt, "wgt", /*bytes_as_int8=*/true);
  const Tensor tas = args.wrap(ascales, "ascales");
  const Tensor tws = args.wrap(wscales, "wscales");
  const Tensor tla = args.wrap(lora_act_in, "lora_act_in");
  const Tensor tup = args.wrap(lora_up, "lora_up");
  const Tensor tb = args.wrap(bias, "bias");
  const auto od = opt_dtype(out_dtype);
  Tensor y;
  {
    nb::gil_scoped_release unlocked;
    y = fn(ta, tw, tas, tws, tla, tup, tb, act_unsigned, od);
  }
  return to_numpy(y, &args);
}

nb::object linear_f32(nb::handle x, nb::handle weight, nb::handle bias) {
  auto* fn = &nibble::linear_f32;
  ArgArrays args;
  const Tensor tx = args.wrap(x, "x");
  const Tensor tw = args.wrap(weight, "weight");
  const Tensor tb = args.wrap(bias, "bias");
  Tensor y;
  {
    nb::gil_scoped_release unlocked;
    y = fn(tx, tw, tb);
  }
  return to_numpy(y, &args);
}

}  // namespace

void bind_ops(nb::module_& m) {
  m.def("gemv_awq_w4a16", &gemv_awq_w4a16, nb::arg("x"), nb::arg("qweight"), nb::arg("wscales"),
        nb::arg("wzeros"), nb::arg("bias").none() = nb::none(), nb::arg("group_size") = 64,
        nb::arg("out_dtype").none() = nb::none());
  m.def("quantize_svdquant_w4a4", &quantize_svdquant_w4a4, nb::arg("x"), nb::arg("smooth"),
        nb::arg("lora_down"), nb::arg("pad_size") = 256, nb::arg("act_unsigned") = false,
        nb::arg("lora_x").none() = nb::none(), nb::arg("lora_act_dtype").none() = nb::none());
  m.def("scaled_mm_svdquant_w4a4", &scaled_mm_svdquant_w4a4, nb::arg("act"), nb::arg("wgt"),
        nb::arg("ascales"), nb::arg("wscales"), nb::arg("lora_act_in"), nb::arg("lora_up"),
        nb::arg("bias").none() = nb::none(), nb::arg("act_unsigned") = false,
        nb::arg("out_dtype").none() = nb::none());
  m.def("linear_f32", &linear_f32, nb::arg("x"), nb::arg("weight"),
        nb::arg("bias").none() = nb::none());
}

}  // namespace nibble_py
