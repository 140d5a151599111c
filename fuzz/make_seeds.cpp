// Writes the seed corpora for the fuzz targets:
//   fuzz_make_seeds <safetensors_dir> <config_dir> [<dequantize_dir>]
//
// safetensors seeds are small valid files made by nibble's own writer, stored in both input modes
// of fuzz_safetensors (even first byte: raw image; odd first byte: "<header>\0<data>"), plus a
// few hand-made headers of other writers' styles. Config seeds are the per-layer quant JSON
// objects that FORMATS.md §4.1 lists.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "nibble/formats.h"
#include "nibble/safetensors.h"
#include "nibble/sample.h"

using namespace nibble;

namespace {
std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
}
// Both fuzzer modes of one image.
void emit_image(const std::string& dir, const std::string& name, const std::string& image) {
  write_all(dir + "/" + name + ".raw", std::string(1, '\0') + image);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(image[size_t(i)]);
  write_all(dir + "/" + name + ".split", std::string(1, '\1') + image.substr(8, n) + std::string(1, '\0') +
                                             image.substr(8 + n));
}
Tensor patterned(DType dt, Shape shape) {
  Tensor t = Tensor::empty(dt, std::move(shape));
  auto* p = static_cast<uint8_t*>(t.mutable_raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(i * 37 + 11);
  return t;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: %s <safetensors_seed_dir> <config_seed_dir> [<dequantize_seed_dir>]\n", argv[0]);
    return 2;
  }
  const std::string sdir = argv[1], cdir = argv[2];
  const std::string tmp = sdir + "/.tmp.safetensors";
  auto via_writer = [&](const std::string& name, const std::vector<std::pair<std::string, Tensor>>& ts,
                        const std::map<std::string, std::string>& md) {
    save_safetensors(tmp, ts, md);
    emit_image(sdir, name, read_all(tmp));
    std::remove(tmp.c_str());
  };
  via_writer("empty", {}, {});
  via_writer("metadata_only", {}, {{"format", "pt"}, {"_quantization_metadata", R"({"layers":{}})"}});
  via_writer("one_f32", {{"w", patterned(DType::F32, {2, 3})}}, {});
  via_writer("awq_layer",
             {{"blk.0.weight", patterned(DType::I8, {4, 8})},
              {"blk.0.weight_scale", patterned(DType::BF16, {1, 4})},
              {"blk.0.weight_zeros", patterned(DType::BF16, {1, 4})},
              {"blk.0.comfy_quant", patterned(DType::U8, {4})},
              {"blk.0.bias", patterned(DType::BF16, {4})}},
             {{"format", "pt"}});
  std::vector<std::pair<std::string, Tensor>> all;
  const DType dts[] = {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I16,
                       DType::I8, DType::U64, DType::U32, DType::U16, DType::U8, DType::BOOL, DType::F8_E4M3,
                       DType::F8_E5M2, DType::F8_E8M0, DType::F4, DType::F6_E2M3, DType::F6_E3M2, DType::C64};
  for (DType dt : dts) all.emplace_back(std::string(dtype_name(dt)), patterned(dt, {4}));
  via_writer("every_dtype", all, {});
  via_writer("scalars_and_empty",
             {{"s", patterned(DType::F32, {})}, {"e", patterned(DType::F16, {0, 7})}, {"v", patterned(DType::U8, {3})}},
             {});
  // Other writers: unpadded, out of offset order, with whitespace and escapes.
  auto hand = [&](const std::string& name, const std::string& header, const std::string& data) {
    std::string img(8, '\0');
    for (int i = 0; i < 8; ++i) img[size_t(i)] = char(uint8_t(uint64_t(header.size()) >> (8 * i)));
    emit_image(sdir, name, img + header + data);
  };
  hand("unordered",
       R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]},"a":{"dtype":"I8","shape":[3],"data_offsets":[0,3]}})",
       "abcde");
  hand("escaped", "{ \"__metadata__\" : { \"k\\u00e9\" : \"v\\n\" } ,\n \"t\\\"q\" : {\"dtype\":\"F16\",\"shape\":[1,1],"
                  "\"data_offsets\":[0,2]} }",
       "xy");

  const char* configs[] = {
      R"({"format": "awq_w4a16", "group_size": 64})",
      R"({"format": "svdquant_w4a4", "act_unsigned": true, "layout": "kitchen_row_major", "lowrank_branch_input_basis": "raw", "proj_down_smooth_folded": false})",
      R"({"format": "svdquant_w4a4", "layout": "nunchaku_zgemm_tile_packed"})",
      R"({"format": "float8_e4m3fn", "full_precision_matrix_mult": true})",
      R"({"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256, "per_row": true})",
      R"({"format": "convrot_w4a4", "linear_dtype": "int4", "convrot_groupsize": 256})",
      R"({"format": "asym_w4a8_int8", "group_size": 16, "params": {"convrot_groupsize": 256}})",
      R"({"format": "nvfp4", "num_experts": 8})",
      R"({"format": "mxfp8"})",
      R"({})",
      // edge values: integers past int64 / as huge floats (config.cpp must reject, not cast)
      R"({"format": "awq_w4a16", "group_size": 18446744073709551615})",
      R"({"format": "awq_w4a16", "group_size": 1e300})",
      R"({"format": "awq_w4a16", "group_size": -64.0, "params": {"group_size": 64}})",
  };
  int i = 0;
  for (const char* c : configs) write_all(cdir + "/config_" + std::to_string(i++) + ".json", c);

  // fuzz_dequantize: one small checkpoint per layer of the sample block (every kitchen format, both
  // config conventions), so mutations start next to a valid layer of each format.
  if (argc == 4) {
    const std::string ddir = argv[3];
    for (const bool in_metadata : {false, true}) {
      SampleOptions o;
      o.hidden = 128;
      o.rank = 16;
      o.configs_in_metadata = in_metadata;
      const std::string whole = ddir + "/.sample.safetensors";
      write_sample_checkpoint(whole, o);
      const Checkpoint ck = Checkpoint::open(whole);
      for (const LayerSource& l : collect_layers(ck)) {
        std::vector<std::pair<std::string, Tensor>> ts;
        uint64_t bytes = 0;
        for (const auto& [suffix, t] : l.tensors) {
          ts.emplace_back(l.name + "." + suffix, t);
          bytes += t.nbytes();
        }
        if (bytes > (64u << 10)) continue;  // keep the seeds small (the larger layers repeat a format)
        std::map<std::string, std::string> md;
        if (l.config) {
          if (in_metadata)
            md["_quantization_metadata"] = R"({"format_version":"1.0","layers":{")" + l.name + R"(":)" + l.config->json + "}}";
          else {
            Tensor cq = Tensor::empty(DType::U8, {int64_t(l.config->json.size())});
            std::memcpy(cq.mutable_raw(), l.config->json.data(), l.config->json.size());
            ts.emplace_back(l.name + ".comfy_quant", cq);
          }
        }
        save_safetensors(tmp, ts, md);
        std::string name = l.name + (in_metadata ? ".md" : ".cq");
        for (char& c : name)
          if (c == '/') c = '_';
        emit_image(ddir, name, read_all(tmp));
        std::remove(tmp.c_str());
      }
      std::remove(whole.c_str());
    }
    // zero-element shapes with huge dimensions (K = 2·2^62 used to overflow int64 in bind)
    const std::string cfg = R"({"format":"awq_w4a16","group_size":64})";
    const std::string hdr = R"({"blk.weight":{"dtype":"I8","shape":[0,4611686018427387904],"data_offsets":[0,0]},)"
                            R"("blk.weight_scale":{"dtype":"BF16","shape":[0,0],"data_offsets":[0,0]},)"
                            R"("blk.weight_zeros":{"dtype":"BF16","shape":[0,0],"data_offsets":[0,0]},)"
                            R"("blk.comfy_quant":{"dtype":"U8","shape":[)" + std::to_string(cfg.size()) +
                            R"(],"data_offsets":[0,)" + std::to_string(cfg.size()) + "]}}";
    write_all(ddir + "/zero_huge.split", std::string(1, '\1') + hdr + std::string(1, '\0') + cfg);
  }
  return 0;
}
