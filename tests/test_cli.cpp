// The `nibble` CLI as users run it: the built binary (path from CMake, NIBBLE_CLI_PATH) in a
// subprocess. Exit codes (README "CLI": 0 success; 1 bad file / unknown format / bad option value,
// the message naming the thing; CLI11's own code, >= 100, for usage errors; verify: 2 when a layer
// is missing from the float checkpoint), the --json documents, sharded output that reloads, a
// `bench --quick` smoke run, and that a failed convert leaves no output or temp file behind.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct Result {
  int code = -1;
  std::string out, err;
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string quote(const std::string& s) {
  std::string r = "'";
  for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return r + "'";
}

// A fresh directory per test (ctest runs the tests in parallel).
class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("nibble_cli_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  fs::path path(const std::string& name) const { return dir_ / name; }

  // Runs `nibble <args>` with -t 2 (the machine is shared), stdout and stderr captured apart.
  Result run(const std::string& args) const {
    const fs::path err = dir_ / ".stderr";
    const std::string cmd = quote(NIBBLE_CLI_PATH) + " -t 2 " + args + " 2>" + quote(err.string());
    Result r;
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return r;
    std::array<char, 4096> buf;
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
    const int status = ::pclose(p);
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.err = read_file(err);
    fs::remove(err);
    return r;
  }
  // Files in the test directory (names only).
  std::set<std::string> files() const {
    std::set<std::string> r;
    for (const auto& e : fs::directory_iterator(dir_)) r.insert(e.path().filename().string());
    return r;
  }
  std::string sample() {  // small kitchen-style checkpoint: one layer of every format
    const std::string p = path("sample.safetensors").string();
    const Result r = run("sample " + quote(p));
    EXPECT_EQ(r.code, 0) << r.err;
    return p;
  }
  std::string synth() {  // small bf16 Qwen-Image block to convert
    const std::string p = path("float.safetensors").string();
    const Result r = run("synth " + quote(p) + " --blocks 1 --hidden 128 --joint-dim 128 --no-top-level");
    EXPECT_EQ(r.code, 0) << r.err;
    return p;
  }

  fs::path dir_;
};

json parse(const std::string& text, const std::string& what) {
  try {
    return json::parse(text);
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": not JSON (" << e.what() << "):\n" << text.substr(0, 2000);
    return json();
  }
}

std::string fmt_shard(size_t i, size_t n) {
  char b[64];
  std::snprintf(b, sizeof b, "model-%05zu-of-%05zu.safetensors", i, n);
  return b;
}

void expect_keys(const json& j, std::initializer_list<const char*> keys, const std::string& what) {
  for (const char* k : keys) EXPECT_TRUE(j.is_object() && j.contains(k)) << what << ": missing key '" << k << "'";
}

}  // namespace

TEST_F(Cli, VersionAndHelpSucceed) {
  const Result v = run("--version");
  EXPECT_EQ(v.code, 0) << v.err;
  EXPECT_NE(v.out.find("compiled ISAs"), std::string::npos) << v.out;
  const Result h = run("--help");
  EXPECT_EQ(h.code, 0) << h.err;
  EXPECT_NE(h.out.find("convert"), std::string::npos);
}

TEST_F(Cli, UsageErrorsExitWithCli11Codes) {
  Result r = run("inspect --frobnicate x");
  EXPECT_GE(r.code, 100) << r.out << r.err;
  EXPECT_NE(r.err.find("--frobnicate"), std::string::npos) << r.err;
  r = run("inspect");  // missing the required path
  EXPECT_GE(r.code, 100) << r.out << r.err;
  EXPECT_NE(r.err.find("path"), std::string::npos) << r.err;
  r = run("no-such-command");
  EXPECT_GE(r.code, 100) << r.out << r.err;
  EXPECT_NE(r.err.find("no-such-command"), std::string::npos) << r.err;
}

TEST_F(Cli, BadFilesExit1NamingTheFile) {
  const std::string missing = path("missing.safetensors").string();
  Result r = run("inspect " + quote(missing));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("missing.safetensors"), std::string::npos) << r.err;

  const fs::path junk = path("junk.safetensors");
  std::ofstream(junk) << "this is not a safetensors file at all";
  r = run("inspect " + quote(junk.string()));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("junk.safetensors"), std::string::npos) << r.err;

  // a valid file cut short: the header promises more data than there is
  const std::string s = sample();
  const std::string bytes = read_file(s);
  const fs::path cut = path("cut.safetensors");
  std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  r = run("verify " + quote(cut.string()));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("cut.safetensors"), std::string::npos) << r.err;
}

TEST_F(Cli, BadOptionValuesExit1NamingTheValue) {
  const std::string s = sample();
  Result r = run("--isa nosuchisa inspect " + quote(s));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("nosuchisa"), std::string::npos) << r.err;
  r = run("bench --op nosuchop --quick");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("nosuchop"), std::string::npos) << r.err;
  const std::string f = synth();
  r = run("convert " + quote(f) + " -o " + quote(path("q.safetensors").string()) + " --tensor-type '.*=nosuchformat'");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("nosuchformat"), std::string::npos) << r.err;
  r = run("convert " + quote(f) + " -o " + quote(path("q.safetensors").string()) + " --preset qwen-image --layout diagonal");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("diagonal"), std::string::npos) << r.err;
}

TEST_F(Cli, InspectJsonHasTheDocumentedKeys) {
  const std::string s = sample();
  const Result r = run("inspect --json " + quote(s));
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = parse(r.out, "inspect --json");
  expect_keys(j, {"path", "tensor_count", "tensor_bytes", "layers", "float_layers", "summary"}, "inspect");
  ASSERT_TRUE(j["layers"].is_array());
  EXPECT_GE(j["layers"].size(), 7u);  // one layer of every kitchen format, and more
  for (const auto& l : j["layers"]) expect_keys(l, {"name", "format"}, "inspect layer");
  expect_keys(j["summary"], {"bytes_by_format"}, "inspect summary");
  EXPECT_TRUE(j["summary"]["bytes_by_format"].contains("awq_w4a16"));
  EXPECT_TRUE(j["summary"]["bytes_by_format"].contains("svdquant_w4a4"));
}

TEST_F(Cli, ConvertJsonReportAndVerifyJson) {
  const std::string f = synth();
  const std::string q = path("q.safetensors").string(), rep = path("report.json").string();
  Result r = run("convert " + quote(f) + " -o " + quote(q) + " --preset qwen-image --json " + quote(rep));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(q));
  const json j = parse(read_file(rep), "convert --json");
  expect_keys(j, {"layers", "bytes_in", "bytes_out", "file_size", "passthrough_tensors"}, "convert report");
  ASSERT_TRUE(j["layers"].is_array());
  ASSERT_FALSE(j["layers"].empty());
  std::set<std::string> formats;
  for (const auto& l : j["layers"]) {
    expect_keys(l, {"name", "format", "shape", "bytes_before", "bytes_after", "weight_rel_error"}, "convert layer");
    formats.insert(l["format"].get<std::string>());
  }
  EXPECT_TRUE(formats.count("awq_w4a16") && formats.count("svdquant_w4a4"));
  EXPECT_EQ(j["file_size"].get<uint64_t>(), fs::file_size(q));

  r = run("verify --json " + quote(q) + " --against " + quote(f) + " --rows 4");
  ASSERT_EQ(r.code, 0) << r.err;
  const json v = parse(r.out, "verify --json");
  ASSERT_TRUE(v.is_array());
  ASSERT_GE(v.size(), 2u);
  for (size_t i = 0; i + 1 < v.size(); ++i)
    expect_keys(v[i], {"layer", "format", "N", "K", "snr_db", "weight_rel_err", "reference"}, "verify record");
  const json& sum = v.back();
  expect_keys(sum, {"summary", "layers", "missing", "snr_min_db", "snr_mean_db", "worst_layer", "weight_rel_err_max"},
              "verify summary");
  EXPECT_EQ(sum["layers"].get<int>(), int(v.size()) - 1);
  EXPECT_EQ(sum["missing"].get<int>(), 0);
}

TEST_F(Cli, VerifyExits2WhenALayerIsMissingFromTheFloatCheckpoint) {
  const std::string f = synth();
  const std::string q = path("q.safetensors").string();
  ASSERT_EQ(run("convert " + quote(f) + " -o " + quote(q) + " --preset qwen-image").code, 0);
  const std::string other = path("other.safetensors").string();  // float checkpoint without the block's layers
  ASSERT_EQ(run("synth " + quote(other) + " --blocks 1 --hidden 128 --joint-dim 128 --prefix zz.").code, 0);
  const Result r = run("verify " + quote(q) + " --against " + quote(other) + " --rows 2");
  EXPECT_EQ(r.code, 2) << r.out << r.err;
}

TEST_F(Cli, ShardedConvertWritesHfNamedShardsThatReload) {
  const std::string f = synth();
  const std::string one = path("one.safetensors").string();
  ASSERT_EQ(run("convert " + quote(f) + " -o " + quote(one) + " --preset qwen-image").code, 0);
  fs::create_directories(path("sharded"));
  const std::string out = path("sharded/model.safetensors").string();
  const Result r = run("convert " + quote(f) + " -o " + quote(out) + " --preset qwen-image --shard-size 0.1");
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<std::string> shards;
  bool index = false;
  const std::regex shard_re(R"(model-(\d{5})-of-(\d{5})\.safetensors)");
  for (const auto& e : fs::directory_iterator(path("sharded"))) {
    const std::string n = e.path().filename().string();
    std::smatch m;
    if (std::regex_match(n, m, shard_re)) shards.push_back(n);
    else if (n == "model.safetensors.index.json") index = true;
    else ADD_FAILURE() << "unexpected file in the output directory: " << n;
  }
  ASSERT_TRUE(index);
  ASSERT_GE(shards.size(), 2u) << "0.1 MiB shards of a ~1 MiB checkpoint";
  std::sort(shards.begin(), shards.end());
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string want = fmt_shard(i + 1, shards.size());
    EXPECT_EQ(shards[i], want);
  }
  const json idx = parse(read_file(path("sharded/model.safetensors.index.json")), "index");
  ASSERT_TRUE(idx.contains("weight_map"));
  std::set<std::string> referenced;
  for (const auto& [k, v] : idx["weight_map"].items()) referenced.insert(v.get<std::string>());
  EXPECT_EQ(referenced, std::set<std::string>(shards.begin(), shards.end()));

  // the index and the directory reload to the same layers as the single file
  const Result a = run("inspect --json " + quote(one));
  const Result b = run("inspect --json " + quote(path("sharded/model.safetensors.index.json").string()));
  const Result c = run("inspect --json " + quote(path("sharded").string()));
  ASSERT_EQ(a.code, 0) << a.err;
  ASSERT_EQ(b.code, 0) << b.err;
  ASSERT_EQ(c.code, 0) << c.err;
  const json ja = parse(a.out, "inspect one"), jb = parse(b.out, "inspect index"), jc = parse(c.out, "inspect dir");
  EXPECT_EQ(ja["layers"], jb["layers"]);
  EXPECT_EQ(ja["layers"], jc["layers"]);
  EXPECT_EQ(ja["tensor_bytes"], jb["tensor_bytes"]);
  const Result v = run("verify " + quote(path("sharded").string()) + " --rows 2");
  EXPECT_EQ(v.code, 0) << v.err;
}

TEST_F(Cli, FailedConvertLeavesNoOutputOrTempFile) {
  const std::string f = synth();
  const std::set<std::string> before = files();
  const std::string q = path("q.safetensors").string();
  // unknown format, bad calibration file, bad input: nothing may appear in the directory
  EXPECT_EQ(run("convert " + quote(f) + " -o " + quote(q) + " --tensor-type '.*=nosuchformat'").code, 1);
  EXPECT_EQ(run("convert " + quote(f) + " -o " + quote(q) + " --preset qwen-image --calib " +
                quote(path("nocalib.safetensors").string()))
                .code,
            1);
  EXPECT_EQ(run("convert " + quote(path("nope.safetensors").string()) + " -o " + quote(q) + " --preset qwen-image").code,
            1);
  EXPECT_EQ(files(), before);
  // the rename fails after the whole temp file was written (the target is a directory): the temp
  // file is removed and the directory is untouched
  fs::create_directories(path("taken.safetensors"));
  const Result r = run("convert " + quote(f) + " -o " + quote(path("taken.safetensors").string()) + " --preset qwen-image");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("taken.safetensors"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::is_directory(path("taken.safetensors")));
  std::set<std::string> want = before;
  want.insert("taken.safetensors");
  EXPECT_EQ(files(), want);
  // an existing output survives a failed convert unchanged
  std::ofstream(q) << "previous output";
  EXPECT_EQ(run("convert " + quote(f) + " -o " + quote(q) + " --tensor-type '.*=nosuchformat'").code, 1);
  EXPECT_EQ(read_file(q), "previous output");
}

TEST_F(Cli, BenchQuickSmoke) {
  for (const char* op : {"awq", "w4a4"}) {
    const Result r = run(std::string("bench --op ") + op + " --quick -r 1 --json");
    ASSERT_EQ(r.code, 0) << op << ": " << r.err;
    const json j = parse(r.out, std::string("bench --json --op ") + op);
    ASSERT_TRUE(j.is_array()) << op;
    ASSERT_FALSE(j.empty()) << op;
    for (const auto& rec : j) expect_keys(rec, {"op", "M", "K", "N", "isa", "threads"}, std::string("bench ") + op);
  }
  const Result t = run("bench --op awq --quick -r 1");  // the table form
  EXPECT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("isa="), std::string::npos) << t.out;
}
