// The sample checkpoint written → read → every layer bound → dequantize() of each checked against
// an independent per-element scalar formula written here from the spec (§2.1, §3.2, §3.5, §4.2).
//
// Tolerances: formulas that are one rounding of the same exact value (fp8 × scale, nvfp4, mxfp8,
// float conversions) must match exactly. The Hadamard formats are compared with a double-precision
// O(n²) rotation; the library's butterfly does log4(n) passes of 3 fp32 additions each, so the
// bound is (3·log4(n) + 2)·u·Σ|x_j|/√n (+ the input rounding), u = 2⁻²⁴. AWQ and SVDQuant use
// the bound of their few fp32 operations (see each check).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "formats/hadamard.h"
#include "nibble/formats.h"
#include "nibble/sample.h"
#include "test_io_common.h"

using namespace nibble;
using nibble::testing_io::ScratchDir;

namespace {

constexpr double kU = 1.0 / (1 << 24);  // unit roundoff of fp32

float elem(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::F32: return t.data<float>()[i];
    case DType::BF16: return bf16_to_f32(t.data<uint16_t>()[i]);
    case DType::F16: return f16_to_f32(t.data<uint16_t>()[i]);
    default: throw Error("test: elem dtype");
  }
}

// E2M1 from its bits (sign, 2-bit exponent with bias 1, 1-bit mantissa), not from a table.
float e2m1(int code) {
  const int sign = code >> 3, e = (code >> 1) & 3, m = code & 1;
  const float mag = e == 0 ? 0.5f * m : std::ldexp(1.0f + 0.5f * m, e - 1);
  return sign ? -mag : mag;
}

// Un-swizzle cuBLAS block scales into a plain (rows_padded, cols_padded) matrix by walking the
// blocked layout in storage order: 128×4 blocks row-major over blocks; inside a block the storage
// order is (row % 32, row / 32, col).
std::vector<uint8_t> unswizzle(const Tensor& t) {
  const int64_t R = t.size(0), C = t.size(1);
  std::vector<uint8_t> m(size_t(R * C));
  const uint8_t* p = t.data<uint8_t>();
  int64_t pos = 0;
  for (int64_t rb = 0; rb < R / 128; ++rb)
    for (int64_t cb = 0; cb < C / 4; ++cb)
      for (int64_t r32 = 0; r32 < 32; ++r32)
        for (int64_t r4 = 0; r4 < 4; ++r4)
          for (int64_t c = 0; c < 4; ++c) m[size_t((rb * 128 + r4 * 32 + r32) * C + cb * 4 + c)] = p[pos++];
  return m;
}

int h4(int i, int j) {
  static const int H[4][4] = {{1, 1, 1, -1}, {1, 1, -1, 1}, {1, -1, 1, 1}, {-1, 1, 1, 1}};
  return H[i][j];
}
int hsign(int64_t n, int64_t i, int64_t j) {
  int s = 1;
  for (int64_t m = 1; m < n; m *= 4) s *= h4(int((i / m) % 4), int((j / m) % 4));
  return s;
}

// Expected rotated row (double) and the per-group tolerance, from the unrotated fp32 row x.
void check_rotated(const std::string& what, const float* got, const std::vector<float>& x, int64_t n) {
  const int64_t K = int64_t(x.size());
  int levels = 0;
  for (int64_t m = n; m > 1; m /= 4) ++levels;
  for (int64_t g = 0; g < K; g += n) {
    double l1 = 0;
    for (int64_t j = 0; j < n; ++j) l1 += std::fabs(x[size_t(g + j)]);
    const double tol = (3.0 * levels + 2.0) * kU * l1 / std::sqrt(double(n));
    for (int64_t i = 0; i < n; ++i) {
      double ref = 0;
      for (int64_t j = 0; j < n; ++j) ref += double(hsign(n, i, j)) * x[size_t(g + j)];
      ref /= std::sqrt(double(n));
      ASSERT_NEAR(got[g + i], ref, tol) << what << " k=" << g + i;
    }
  }
}

const std::set<std::string> kSampleQuantized = {
    "transformer_blocks.0.img_mod.1",          "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",          "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",      "transformer_blocks.0.img_mlp.net.0.proj",
    "transformer_blocks.0.img_mlp.net.2",      "extra.float8_e4m3fn",
    "extra.float8_e5m2",                       "extra.nvfp4",
    "extra.mxfp8",                             "extra.int8_tensorwise",
    "extra.int8_tensorwise_convrot",           "extra.int4_tensorwise",
    "extra.convrot_w4a4",                      "extra.asym_w4a8_int8"};
const std::set<std::string> kSampleFloat = {"transformer_blocks.0.txt_mod.1", "transformer_blocks.0.attn.add_q_proj",
                                            "img_in"};

// Natural svdquant tensors from a possibly tile-packed layer (spec §3.2 index mapping).
struct SvdNatural {
  std::vector<int> q;        // (N, K) signed codes
  std::vector<float> scale;  // (K/64, N)
  std::vector<float> up;     // (N, R)
};
SvdNatural svd_natural(const LayerSource& src, int64_t N, int64_t K, int64_t R) {
  SvdNatural s;
  s.q.resize(size_t(N * K));
  s.scale.resize(size_t(K / 64 * N));
  s.up.resize(size_t(N * R));
  const Tensor& w = src.tensors.at("weight");
  const Tensor& ws = src.tensors.at("weight_scale");
  const Tensor& up = src.tensors.count("proj_up") ? src.tensors.at("proj_up") : src.tensors.at("weight_proj_up");
  const uint8_t* wb = w.data<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < K / 2; ++c) {
      int64_t off = n * (K / 2) + c;
      if (w.dim() == 4) off = ((n / 128 * (K / 64) + c / 32) * 128 + n % 128) * 32 + c % 32;
      const uint8_t byte = wb[off];
      const int lo = byte & 0xF, hi = byte >> 4;
      s.q[size_t(n * K + 2 * c)] = lo < 8 ? lo : lo - 16;
      s.q[size_t(n * K + 2 * c + 1)] = hi < 8 ? hi : hi - 16;
    }
  for (int64_t g = 0; g < K / 64; ++g)
    for (int64_t n = 0; n < N; ++n)
      s.scale[size_t(g * N + n)] = elem(ws, ws.dim() == 3 ? (n / 128 * (K / 64) + g) * 128 + n % 128 : g * N + n);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < R; ++r)
      s.up[size_t(n * R + r)] = elem(up, up.dim() == 3 ? (n / 128 * R + r) * 128 + n % 128 : n * R + r);
  return s;
}

const Tensor& either(const LayerSource& s, const char* a, const char* b) {
  return s.tensors.count(a) ? s.tensors.at(a) : s.tensors.at(b);
}

// Checks one bound layer against the formulas.
void check_layer(const LayerSource& src, const QuantizedLayer& l, const Tensor& W) {
  const std::string fmt = l.format ? l.format->name : "float";
  SCOPED_TRACE(src.name + " (" + fmt + ")");
  ASSERT_EQ(W.dtype(), DType::F32);
  ASSERT_EQ(W.shape(), (Shape{l.N, l.K}));
  const int64_t N = l.N, K = l.K;
  const float* w = W.data<float>();
  for (int64_t i = 0; i < W.numel(); ++i) ASSERT_TRUE(std::isfinite(w[i])) << "i=" << i;
  const auto& t = src.tensors;

  if (!l.format) {
    const Tensor& wt = t.at("weight");
    for (int64_t i = 0; i < N * K; ++i) ASSERT_EQ(w[i], elem(wt, i));
  } else if (fmt == "awq_w4a16") {
    const Tensor& q = t.at("weight");
    const Tensor& s = t.at("weight_scale");
    const Tensor& z = either(src, "weight_zeros", "weight_zero");
    const int64_t G = l.group_size;
    EXPECT_EQ(G, 64);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = q.data<uint8_t>()[n * (K / 2) + k / 2];
        const int code = k % 2 ? byte >> 4 : byte & 0xF;
        const double sv = elem(s, (k / G) * N + n), zv = elem(z, (k / G) * N + n);
        const double ref = (code - 8) * sv + zv;
        // two fp32 operations
        ASSERT_NEAR(w[n * K + k], ref, 2 * kU * (std::fabs((code - 8) * sv) + std::fabs(zv)) + 1e-30)
            << n << "," << k;
      }
  } else if (fmt == "svdquant_w4a4") {
    const Tensor& smooth = either(src, "smooth_factor", "weight_smooth_factor");
    const Tensor& down = either(src, "proj_down", "weight_proj_down");
    const int64_t R = down.size(1);
    EXPECT_EQ(l.rank, R);
    EXPECT_EQ(l.tile_packed, t.at("weight").dim() == 4);
    const SvdNatural s = svd_natural(src, N, K, R);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const double main = s.q[size_t(n * K + k)] * double(s.scale[size_t(k / 64 * N + n)]) / elem(smooth, k);
        double low = 0, mag = std::fabs(main);
        for (int64_t r = 0; r < R; ++r) {
          const double p = double(s.up[size_t(n * R + r)]) * elem(down, k * R + r);
          low += p;
          mag += std::fabs(p);
        }
        // fp32: a product and a division on the main path, R products and R+1 additions
        ASSERT_NEAR(w[n * K + k], main + low, (double(R) + 4) * kU * mag + 1e-30) << n << "," << k;
      }
  } else if (fmt == "float8_e4m3fn" || fmt == "float8_e5m2") {
    const Tensor& q = t.at("weight");
    const float scale = elem(t.at("weight_scale"), 0);
    for (int64_t i = 0; i < N * K; ++i) {
      const uint8_t c = q.data<uint8_t>()[i];
      ASSERT_EQ(w[i], (fmt == "float8_e4m3fn" ? fp8_e4m3_to_f32(c) : fp8_e5m2_to_f32(c)) * scale) << i;
    }
  } else if (fmt == "nvfp4") {
    const Tensor& q = t.at("weight");
    const std::vector<uint8_t> blocks = unswizzle(t.at("weight_scale"));
    const int64_t C = t.at("weight_scale").size(1);
    const float s2 = elem(t.at("weight_scale_2"), 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = q.data<uint8_t>()[n * (K / 2) + k / 2];
        const int code = k % 2 == 0 ? byte >> 4 : byte & 0xF;  // even element in the HIGH nibble
        const double exact = double(e2m1(code)) * fp8_e4m3_to_f32(blocks[size_t(n * C + k / 16)]) * s2;
        ASSERT_EQ(w[n * K + k], float(exact)) << n << "," << k;  // one rounding of the exact product
      }
  } else if (fmt == "mxfp8") {
    const Tensor& q = t.at("weight");
    const std::vector<uint8_t> blocks = unswizzle(t.at("weight_scale"));
    const int64_t C = t.at("weight_scale").size(1);
    int zero_scales = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int e = blocks[size_t(n * C + k / 32)];
        zero_scales += e == 0;
        const float v = fp8_e4m3_to_f32(q.data<uint8_t>()[n * K + k]);
        ASSERT_EQ(w[n * K + k], e == 0 ? 0.0f : std::ldexp(v, e - 127)) << n << "," << k;
      }
    EXPECT_GT(zero_scales, 0);  // the sample exercises the e = 0 rule
  } else if (fmt == "int8_tensorwise" || fmt == "int4_tensorwise" || fmt == "convrot_w4a4") {
    const Tensor& q = t.at("weight");
    const Tensor& s = t.at("weight_scale");
    const bool rotate = fmt == "convrot_w4a4" || l.config.convrot;
    for (int64_t n = 0; n < N; ++n) {
      const float scale = elem(s, s.numel() == 1 ? 0 : n);
      std::vector<float> x(static_cast<size_t>(K));
      for (int64_t k = 0; k < K; ++k) {
        int v;
        if (fmt == "int8_tensorwise") {
          v = q.data<int8_t>()[n * K + k];
        } else {
          const uint8_t byte = q.data<uint8_t>()[n * (K / 2) + k / 2];
          const int nib = k % 2 ? byte >> 4 : byte & 0xF;
          v = nib < 8 ? nib : nib - 16;
        }
        x[size_t(k)] = float(v) * scale;
      }
      if (rotate) {
        check_rotated(src.name, w + n * K, x, l.config.convrot_groupsize);
      } else {
        for (int64_t k = 0; k < K; ++k) ASSERT_EQ(w[n * K + k], x[size_t(k)]);
      }
    }
  } else if (fmt == "asym_w4a8_int8") {
    const Tensor& q = t.at("weight");
    const Tensor& rel = t.at("weight_s_rel");
    const Tensor& ch = t.at("weight_s_channel");
    const int64_t G = l.group_size;
    int clamped = 0;
    for (int64_t n = 0; n < N; ++n) {
      std::vector<float> x(static_cast<size_t>(K));
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = q.data<uint8_t>()[n * (K / 2) + k / 2];
        const int c = k % 2 ? byte >> 4 : byte & 0xF;
        const float v = t.count("weight_codebook") ? elem(t.at("weight_codebook"), c) : float(c - 8);
        const float prod = v * fp8_e4m3_to_f32(rel.data<uint8_t>()[n * (K / G) + k / G]);
        float r = std::nearbyint(prod);
        if (r > 127 || r < -127) ++clamped;
        r = std::max(-127.0f, std::min(127.0f, r));
        x[size_t(k)] = r * elem(ch, n);
      }
      check_rotated(src.name, w + n * K, x, l.config.convrot_groupsize);
    }
    EXPECT_GT(clamped, 0);  // the sample exercises the clamp
  } else {
    FAIL() << "no formula for " << fmt;
  }
}

struct Bound {
  LayerSource src;
  QuantizedLayer layer;
  Tensor W;
};

// Binds and dequantizes every layer (any error fails the test).
std::vector<Bound> bind_all(const Checkpoint& ck) {
  std::vector<Bound> out;
  for (const auto& src : collect_layers(ck)) {
    QuantizedLayer l = bind_layer(src);
    Tensor W = dequantize(l);
    out.push_back({src, std::move(l), std::move(W)});
  }
  return out;
}

}  // namespace

TEST(FormatsDequant, HadamardMatchesExplicitMatrix) {
  for (int64_t n : {1, 4, 16, 64, 256, 1024}) {
    EXPECT_TRUE(formats::is_power_of_4(n));
    std::vector<float> x(size_t(2 * n));
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(std::sin(double(i) * 1.7 + 0.3)) * float(1 + i % 7);
    std::vector<float> y = x;
    formats::hadamard_rotate_groups(y.data(), 2 * n, n);
    check_rotated("n=" + std::to_string(n), y.data(), x, n);
    for (int64_t i = 0; i < n; i += std::max<int64_t>(1, n / 16))
      for (int64_t j = 0; j < n; ++j) ASSERT_EQ(formats::hadamard_sign(n, i, j), hsign(n, i, j));
    // orthonormal and symmetric, hence self-inverse
    formats::hadamard_rotate_groups(y.data(), 2 * n, n);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(y[i], x[i], 1e-5 * (1 + std::fabs(x[i])));
  }
  for (int64_t n : {0, 2, 8, 32, 128, 255}) EXPECT_FALSE(formats::is_power_of_4(n)) << n;
}

TEST(FormatsDequant, SampleEveryLayerMatchesScalarFormula) {
  ScratchDir dir;
  const std::string path = dir.file("sample.safetensors");
  write_sample_checkpoint(path, {});
  const Checkpoint ck = Checkpoint::open(path);
  ASSERT_TRUE(has_quant_configs(ck));
  const auto bound = bind_all(ck);
  std::set<std::string> quantized, floats, formats_seen;
  for (const auto& b : bound) {
    (b.layer.format ? quantized : floats).insert(b.layer.name);
    if (b.layer.format) formats_seen.insert(b.layer.format->name);
    check_layer(b.src, b.layer, b.W);
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_EQ(floats, kSampleFloat);
  EXPECT_EQ(quantized.size(), kSampleQuantized.size());
  for (const auto& n : quantized) EXPECT_TRUE(kSampleQuantized.count(n)) << n;
  // one layer of every registered format
  for (const auto& f : all_formats()) {
    EXPECT_TRUE(formats_seen.count(f.name)) << f.name;
  }
  // spot checks of the resolved fields
  for (const auto& b : bound) {
    if (b.layer.name == "transformer_blocks.0.img_mod.1") {
      EXPECT_EQ(b.layer.N, 6 * 256);
      EXPECT_EQ(b.layer.K, 256);
      EXPECT_TRUE(b.layer.has_param("weight_zeros"));  // stored as `weight_zero`
      EXPECT_TRUE(b.layer.bias.defined());
    }
    if (b.layer.name == "transformer_blocks.0.img_mlp.net.0.proj") {
      EXPECT_EQ(b.layer.N, 1024);
      EXPECT_EQ(b.layer.K, 256);
      EXPECT_TRUE(b.layer.tile_packed);
    }
    if (b.layer.name == "transformer_blocks.0.img_mlp.net.2") {
      EXPECT_TRUE(b.layer.act_unsigned);
    }
    if (b.layer.name == "extra.nvfp4") {
      EXPECT_EQ(b.layer.N * 1000 + b.layer.K, 144 * 1000 + 272);
    }
  }
}

TEST(FormatsDequant, SampleConventionsAgree) {
  // Configs in metadata and a "model.diffusion_model." prefix give the same layers and weights.
  ScratchDir dir;
  const std::string a = dir.file("a.safetensors"), b = dir.file("b.safetensors");
  SampleOptions oa, ob;
  oa.hidden = ob.hidden = 128;
  oa.rank = ob.rank = 8;
  ob.prefix = "model.diffusion_model.";
  ob.configs_in_metadata = true;
  write_sample_checkpoint(a, oa);
  write_sample_checkpoint(b, ob);
  const auto la = bind_all(Checkpoint::open(a));
  const auto lb = bind_all(Checkpoint::open(b));
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) {
    EXPECT_EQ(ob.prefix + la[i].layer.name, lb[i].layer.name);
    EXPECT_EQ(la[i].layer.config.to_json(), lb[i].layer.config.to_json());
    ASSERT_EQ(la[i].W.shape(), lb[i].W.shape());
    EXPECT_EQ(0, std::memcmp(la[i].W.raw(), lb[i].W.raw(), la[i].W.nbytes())) << la[i].layer.name;
  }
  // without the comfy_quant tensors the metadata file has fewer tensors
  EXPECT_LT(Checkpoint::open(b).names().size(), Checkpoint::open(a).names().size());
}

TEST(FormatsDequant, SampleIsDeterministic) {
  ScratchDir dir;
  write_sample_checkpoint(dir.file("1.safetensors"), {});
  write_sample_checkpoint(dir.file("2.safetensors"), {});
  SampleOptions other;
  other.seed = 7;
  write_sample_checkpoint(dir.file("3.safetensors"), other);
  EXPECT_EQ(testing_io::read_bytes(dir.file("1.safetensors")), testing_io::read_bytes(dir.file("2.safetensors")));
  EXPECT_NE(testing_io::read_bytes(dir.file("1.safetensors")), testing_io::read_bytes(dir.file("3.safetensors")));
  SampleOptions bad;
  bad.hidden = 100;
  EXPECT_THROW(write_sample_checkpoint(dir.file("4.safetensors"), bad), Error);
}
