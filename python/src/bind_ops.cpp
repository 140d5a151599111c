// The three kitchen ops (spec §6) and the dense helper, as module functions.
//
// Argument names, order and defaults follow comfy-kitchen; the Python layer (nibble/__init__.py)
// only adds framework round-tripping (torch in → torch out). The prepared-weight entries of the
// kitchen adapter's cache (KitchenPrepared) and the padding-row skip of scaled_mm are here too. Inputs are wrapped zero-copy, the
// kernels run with the GIL released, and the library's nibble::Error becomes nibble.Error (a
// ValueError).
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cmath>

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

// ---- the prepared-weight cache entries of the kitchen adapter (python/nibble/kitchen.py)
// Owned derived buffers only (never the weights): the adapter keys an entry to the weight tensor
// and passes the weights again on every call.
struct KitchenPrepared {
  std::shared_ptr<const nibble::SvdquantW4A4Prepared> svd;  // scaled_mm's packed GEMM side
  Tensor awq_stream;                                       // gemv's tiled stream (may be undefined)
  bool awq = false;
  bool finite = false;  // wscales and proj_up all finite: padding rows provably give 0 + bias
  int64_t nbytes = 0;
};

bool all_finite(const Tensor& t) {
  const Tensor f = t.to_f32();
  const float* p = f.data<float>();
  for (int64_t i = 0; i < f.numel(); ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

bool zero_at(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::F32: return (t.data<uint32_t>()[i] & 0x7FFFFFFFu) == 0;
    case DType::BF16: case DType::F16: return (t.data<uint16_t>()[i] & 0x7FFFu) == 0;
    default: return false;
  }
}

// Trailing rows of a scaled_mm call whose ascales and lora_act are all zero (the kitchen's M
// padding, spec §3.3 step 5): with finite weight scales and proj_up their output is exactly 0 + bias.
int64_t rows_to_compute(const Tensor& ascales, const Tensor& lora_act) {
  if (ascales.dim() != 2 || lora_act.dim() != 2) return -1;
  const int64_t G = ascales.size(0), M = ascales.size(1), R = lora_act.size(1);
  if (lora_act.size(0) != M) return -1;
  int64_t m = M;
  for (; m > 0; --m) {
    bool zero = true;
    for (int64_t g = 0; g < G && zero; ++g) zero = zero_at(ascales, g * M + (m - 1));
    for (int64_t r = 0; r < R && zero; ++r) zero = zero_at(lora_act, (m - 1) * R + r);
    if (!zero) break;
  }
  return m;
}

KitchenPrepared prepare_scaled_mm(nb::handle wgt, nb::handle wscales, nb::handle lora_up) {
  ArgArrays args;
  const Tensor tw = args.wrap(wgt, "wgt", /*bytes_as_int8=*/true);
  const Tensor ts = args.wrap(wscales, "wscales");
  const Tensor tu = args.wrap(lora_up, "lora_up");
  KitchenPrepared k;
  {
    nb::gil_scoped_release unlocked;
    k.svd = nibble::prepare_svdquant_w4a4_gemm(tw, ts, tu);
    k.finite = all_finite(ts) && all_finite(tu);
  }
  k.nbytes = nibble::prepared_nbytes(*k.svd);
  return k;
}

KitchenPrepared prepare_gemv_awq(nb::handle qweight, nb::handle wscales, nb::handle wzeros,
                                 int64_t group_size) {
  ArgArrays args;
  const Tensor tq = args.wrap(qweight, "qweight", /*bytes_as_int8=*/true);
  const Tensor ts = args.wrap(wscales, "wscales");
  const Tensor tz = args.wrap(wzeros, "wzeros");
  KitchenPrepared k;
  k.awq = true;
  {
    nb::gil_scoped_release unlocked;
    k.awq_stream = nibble::prepare_awq_w4a16_stream(tq, ts, tz, group_size);
  }
  k.nbytes = k.awq_stream.defined() ? int64_t(k.awq_stream.nbytes()) : 0;
  return k;
}

const KitchenPrepared* prepared_arg(nb::handle h, bool awq, const char* op) {
  if (h.is_none()) return nullptr;
  const KitchenPrepared* k = nb::cast<const KitchenPrepared*>(h);
  if (k->awq != awq)
    throw nibble::Error(std::string(op) + ": prepared weights of the other op");
  return k;
}

nb::object gemv_awq_w4a16(nb::handle x, nb::handle qweight, nb::handle wscales, nb::handle wzeros,
                          nb::handle bias, int64_t group_size,
                          const std::optional<std::string>& out_dtype, nb::handle prepared) {
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
  const KitchenPrepared* k = prepared_arg(prepared, true, "gemv_awq_w4a16");
  Tensor y;
  {
    nb::gil_scoped_release unlocked;
    y = k ? nibble::gemv_awq_w4a16_prepared(tx, tq, ts, tz, tb, group_size, od, k->awq_stream)
          : fn(tx, tq, ts, tz, tb, group_size, od);
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
                                   const std::optional<std::string>& out_dtype,
                                   nb::handle prepared, bool skip_padding) {
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
  const KitchenPrepared* k = prepared_arg(prepared, false, "scaled_mm_svdquant_w4a4");
  Tensor y;
  {
    nb::gil_scoped_release unlocked;
    if (k) {
      const int64_t rows = skip_padding && k->finite ? rows_to_compute(tas, tla) : -1;
      y = nibble::scaled_mm_svdquant_w4a4_prepared(ta, tw, tas, tws, tla, tup, tb, act_unsigned, od,
                                                   *k->svd, rows);
    } else {
      y = fn(ta, tw, tas, tws, tla, tup, tb, act_unsigned, od);
    }
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
  nb::class_<KitchenPrepared>(m, "KitchenPrepared",
                              "Weight side of a kitchen op prepared once (owned buffers only).")
      .def_ro("nbytes", &KitchenPrepared::nbytes)
      .def_ro("finite", &KitchenPrepared::finite)
      .def_prop_ro("op", [](const KitchenPrepared& k) {
        return k.awq ? "gemv_awq_w4a16" : "scaled_mm_svdquant_w4a4";
      });
  m.def("prepare_scaled_mm_svdquant_w4a4", &prepare_scaled_mm, nb::arg("wgt"), nb::arg("wscales"),
        nb::arg("lora_up"));
  m.def("prepare_gemv_awq_w4a16", &prepare_gemv_awq, nb::arg("qweight"), nb::arg("wscales"),
        nb::arg("wzeros"), nb::arg("group_size") = 64);
  m.def("gemv_awq_w4a16", &gemv_awq_w4a16, nb::arg("x"), nb::arg("qweight"), nb::arg("wscales"),
        nb::arg("wzeros"), nb::arg("bias").none() = nb::none(), nb::arg("group_size") = 64,
        nb::arg("out_dtype").none() = nb::none(), nb::arg("prepared").none() = nb::none());
  m.def("quantize_svdquant_w4a4", &quantize_svdquant_w4a4, nb::arg("x"), nb::arg("smooth"),
        nb::arg("lora_down"), nb::arg("pad_size") = 256, nb::arg("act_unsigned") = false,
        nb::arg("lora_x").none() = nb::none(), nb::arg("lora_act_dtype").none() = nb::none());
  m.def("scaled_mm_svdquant_w4a4", &scaled_mm_svdquant_w4a4, nb::arg("act"), nb::arg("wgt"),
        nb::arg("ascales"), nb::arg("wscales"), nb::arg("lora_act_in"), nb::arg("lora_up"),
        nb::arg("bias").none() = nb::none(), nb::arg("act_unsigned") = false,
        nb::arg("out_dtype").none() = nb::none(), nb::arg("prepared").none() = nb::none(),
        nb::arg("skip_padding") = false);
  m.def("linear_f32", &linear_f32, nb::arg("x"), nb::arg("weight"),
        nb::arg("bias").none() = nb::none());
}

}  // namespace nibble_py
