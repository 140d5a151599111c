// safetensors reader/writer: round trips of every dtype, streaming, atomicity, zero-copy views.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/resource.h>

#include <csignal>
#include <cstring>
#include <random>

#include "nibble/error.h"
#include "nibble/safetensors.h"
#include "test_io_common.h"

using namespace nibble;
using namespace nibble::testing_io;
using ::testing::HasSubstr;

namespace {

Tensor random_tensor(DType dt, Shape shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(dt, std::move(shape));
  auto* p = static_cast<uint8_t*>(t.mutable_raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(rng());
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

const DType kAllDTypes[] = {DType::F64,     DType::F32,     DType::F16,     DType::BF16,    DType::I64,
                            DType::I32,     DType::I16,     DType::I8,      DType::U64,     DType::U32,
                            DType::U16,     DType::U8,      DType::BOOL,    DType::F8_E4M3, DType::F8_E5M2,
                            DType::F8_E8M0, DType::F4,      DType::F6_E2M3, DType::F6_E3M2, DType::C64};

// Declaration order deliberately not sorted by name, to prove the writer keeps it.
std::vector<std::pair<std::string, Tensor>> every_dtype_tensors(std::mt19937& rng) {
  std::vector<std::pair<std::string, Tensor>> v;
  for (DType dt : kAllDTypes) {
    const std::string n(dtype_name(dt));
    v.emplace_back("z." + n + ".matrix", random_tensor(dt, {3, 4}, rng));  // 12 elements: F4, F6 byte-aligned
    v.emplace_back("a." + n + ".empty", random_tensor(dt, {0, 5}, rng));
    if (dtype_size(dt) != 0) v.emplace_back("m." + n + ".scalar", random_tensor(dt, {}, rng));
    v.emplace_back("b." + n + ".vec", random_tensor(dt, {dtype_bits(dt) % 8 ? int64_t(8) : int64_t(7)}, rng));
  }
  return v;
}

TEST(Safetensors, RoundTripEveryDtypeBytesShapesMetadata) {
  ScratchDir dir;
  std::mt19937 rng(1234);
  const auto tensors = every_dtype_tensors(rng);
  const std::map<std::string, std::string> md = {
      {"format", "pt"}, {"quote\"back\\slash", "line\nbreak\ttab\x01"}, {"unicode", "größe → 量子化"}, {"empty", ""}};
  const std::string path = dir.file("all.safetensors");
  save_safetensors(path, tensors, md);

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->metadata(), md);
  ASSERT_EQ(f->tensors().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(f->contains(name));
    const Tensor r = f->get(name);
    EXPECT_EQ(r.dtype(), t.dtype());
    EXPECT_EQ(r.shape(), t.shape());
    EXPECT_TRUE(same_bytes(r, t));
    EXPECT_FALSE(r.writable());
  }
  // Header in declaration order, "__metadata__" first, data section 8-byte aligned.
  const std::string& h = f->header_json();
  EXPECT_EQ(h.rfind("{\"__metadata__\":{", 0), 0u) << h.substr(0, 40);
  EXPECT_EQ((8 + h.size()) % 8, 0u);
  size_t last = 0;
  for (const auto& [name, t] : tensors) {
    const size_t at = h.find("\"" + name + "\"");
    ASSERT_NE(at, std::string::npos);
    EXPECT_GT(at, last);
    last = at;
  }
  // tensors() is in data-offset order, which is declaration order here.
  uint64_t prev_end = 0;
  for (const auto& t : f->tensors()) {
    EXPECT_EQ(t.begin, prev_end);
    prev_end = t.end;
  }
  EXPECT_EQ(8 + h.size() + prev_end, f->file_size());
  // The same image parses from memory too.
  const std::string bytes = read_bytes(path);
  EXPECT_EQ(parse_image(bytes)->tensors().size(), tensors.size());
}

TEST(Safetensors, SubByteScalarIsRejectedByTheWriter) {
  ScratchDir dir;
  SafetensorsWriter w(dir.file("x.safetensors"));
  EXPECT_THAT([&] { w.add("s", DType::F4, {}); },
              ::testing::ThrowsMessage<Error>(HasSubstr("not a whole number of bytes")));
  EXPECT_THAT([&] { w.add("s", DType::F6_E2M3, {3}); },
              ::testing::ThrowsMessage<Error>(HasSubstr("not a whole number of bytes")));
}

TEST(Safetensors, EmptyFileAndMetadataOnly) {
  ScratchDir dir;
  save_safetensors(dir.file("none.safetensors"), {});
  auto f = SafetensorsFile::open(dir.file("none.safetensors"));
  EXPECT_TRUE(f->tensors().empty());
  EXPECT_TRUE(f->metadata().empty());
  EXPECT_EQ(f->file_size(), 16u);  // "{}" padded to 8 bytes

  save_safetensors(dir.file("md.safetensors"), {}, {{"k", "v"}});
  EXPECT_EQ(SafetensorsFile::open(dir.file("md.safetensors"))->metadata().at("k"), "v");
}

TEST(Safetensors, ChunkedStreamingEqualsOneShot) {
  ScratchDir dir;
  std::mt19937 rng(7);
  // One tensor larger than the writer's 4 MiB buffer, some tiny ones, an empty one in between.
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"big", random_tensor(DType::BF16, {1500, 1500}, rng)},
      {"tiny", random_tensor(DType::U8, {3}, rng)},
      {"empty", random_tensor(DType::F32, {0}, rng)},
      {"mid", random_tensor(DType::F32, {333, 77}, rng)},
      {"f4", random_tensor(DType::F4, {64, 10}, rng)},
  };
  save_safetensors(dir.file("oneshot.safetensors"), tensors, {{"a", "b"}});

  SafetensorsWriter w(dir.file("chunked.safetensors"), {{"a", "b"}});
  for (const auto& [n, t] : tensors) w.add(n, t.dtype(), t.shape());
  EXPECT_EQ(w.planned_file_size(), read_bytes(dir.file("oneshot.safetensors")).size());
  for (const auto& [n, t] : tensors) {
    const auto* p = static_cast<const uint8_t*>(t.raw());
    size_t done = 0;
    while (done < t.nbytes()) {
      // chunk sizes from 1 byte to ~6 MiB, so both the buffered and the direct path are taken
      const size_t want = rng() % 4 == 0 ? size_t(rng() % (6u << 20)) : size_t(1 + rng() % 5000);
      const size_t c = std::min(t.nbytes() - done, std::max<size_t>(want, 1));
      w.write(n, p + done, c);
      done += c;
    }
  }
  w.commit();
  EXPECT_EQ(read_bytes(dir.file("chunked.safetensors")), read_bytes(dir.file("oneshot.safetensors")));
  EXPECT_EQ(dir.entries().size(), 2u);  // no temporary file left
}

TEST(Safetensors, WriterEnforcesDeclarationOrderAndSizes) {
  ScratchDir dir;
  const std::string path = dir.file("w.safetensors");
  SafetensorsWriter w(path);
  w.add("a", DType::F32, {2});
  w.add("e", DType::F32, {0});
  w.add("b", DType::U8, {3});
  EXPECT_THAT([&] { w.add("a", DType::F32, {1}); }, ::testing::ThrowsMessage<Error>(HasSubstr("declared twice")));
  EXPECT_THAT([&] { w.add("__metadata__", DType::F32, {1}); }, ::testing::ThrowsMessage<Error>(HasSubstr("reserved")));
  EXPECT_THAT([&] { w.add("neg", DType::F32, {-1}); },
              ::testing::ThrowsMessage<Error>(HasSubstr("negative dimension")));
  const float a[2] = {1, 2};
  const uint8_t b[4] = {1, 2, 3, 4};
  EXPECT_THAT([&] { w.write("b", b, 3); }, ::testing::ThrowsMessage<Error>(HasSubstr("expected bytes of tensor 'a'")));
  EXPECT_THAT([&] { w.write("nope", b, 3); }, ::testing::ThrowsMessage<Error>(HasSubstr("no such tensor")));
  EXPECT_THAT([&] { w.write("a", a, 12); }, ::testing::ThrowsMessage<Error>(HasSubstr("only 8 remain")));
  EXPECT_THAT([&] { w.add("late", DType::F32, {1}); },
              ::testing::ThrowsMessage<Error>(HasSubstr("after writing started")));
  w.write("a", a, 4);
  EXPECT_THAT([&] { w.commit(); }, ::testing::ThrowsMessage<Error>(HasSubstr("'a' incomplete (4 of 8 bytes")));
  w.write("a", a + 1, 4);
  w.write("e", nullptr, 0);  // zero bytes for an empty tensor: allowed, a no-op
  EXPECT_THAT([&] { w.write_tensor("b", Tensor::zeros(DType::U8, {4})); },
              ::testing::ThrowsMessage<Error>(HasSubstr("declared U8 (3,), got U8 (4,)")));
  w.write("b", b, 3);
  EXPECT_THAT([&] { w.write("b", b, 1); }, ::testing::ThrowsMessage<Error>(HasSubstr("already complete")));
  EXPECT_FALSE(std::filesystem::exists(path));  // nothing at the target before commit
  w.commit();
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->get("a").data<float>()[1], 2.0f);
  EXPECT_EQ(f->get("b").data<uint8_t>()[2], 3);
  EXPECT_THAT([&] { w.commit(); }, ::testing::ThrowsMessage<Error>(HasSubstr("twice")));
}

TEST(Safetensors, WriterDestroyedWithoutCommitLeavesNothing) {
  ScratchDir dir;
  const std::string path = dir.file("out.safetensors");
  {
    SafetensorsWriter w(path);
    w.add("a", DType::U8, {100});
    std::vector<uint8_t> d(50, 7);
    w.write("a", d.data(), d.size());
    EXPECT_EQ(dir.entries().size(), 1u);  // the temporary file exists while writing
  }
  EXPECT_TRUE(dir.entries().empty());
}

TEST(Safetensors, ExceptionMidWriteLeavesNothingAndKeepsTheOldFile) {
  ScratchDir dir;
  const std::string path = dir.file("out.safetensors");
  save_safetensors(path, {{"old", Tensor::zeros(DType::U8, {4})}});
  const std::string before = read_bytes(path);
  auto produce = [&] {
    SafetensorsWriter w(path);
    w.add("a", DType::U8, {1000});
    std::vector<uint8_t> d(400, 1);
    w.write("a", d.data(), d.size());
    throw std::runtime_error("producer failed half-way");
  };
  EXPECT_THROW(produce(), std::runtime_error);
  EXPECT_EQ(read_bytes(path), before);  // the previous file is intact
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"out.safetensors"});
}

TEST(Safetensors, ReadOnlyDirectoryIsAClearErrorAndNoFile) {
  ScratchDir dir;
  std::filesystem::create_directory(dir.path() / "ro");
  std::string ro = (dir.path() / "ro").string();
  ::chmod(ro.c_str(), 0555);
  // root ignores directory permissions: fall back to a directory no one can create files in.
  if (::access(ro.c_str(), W_OK) == 0) ro = "/proc";
  const std::string path = ro + "/x.safetensors";
  EXPECT_THAT([&] { save_safetensors(path, {{"a", Tensor::zeros(DType::F32, {2})}}); },
              ::testing::ThrowsMessage<Error>(
                  ::testing::AllOf(HasSubstr(path), HasSubstr("cannot create a temporary file in directory '" + ro))));
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_THAT([&] { write_safetensors_index(ro + "/m.safetensors.index.json", {{"a", "x.safetensors"}}); },
              ::testing::ThrowsMessage<Error>(HasSubstr("cannot create a temporary file")));
  // A missing directory too.
  EXPECT_THAT([&] { save_safetensors(dir.file("missing/x.safetensors"), {}); },
              ::testing::ThrowsMessage<Error>(HasSubstr("No such file or directory")));
}

TEST(Safetensors, WriteErrorIsReportedAndLeavesNothing) {
  // A full disk, simulated by a file size limit: write() fails with EFBIG instead of SIGXFSZ.
  ScratchDir dir;
  const std::string path = dir.file("big.safetensors");
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 1 << 20;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string message;
  {
    SafetensorsWriter w(path);
    w.add("a", DType::U8, {int64_t(8) << 20});
    std::vector<uint8_t> chunk(size_t(1) << 20, 1);
    try {
      for (int i = 0; i < 8; ++i) w.write("a", chunk.data(), chunk.size());
      w.commit();
    } catch (const Error& e) {
      message = e.what();
    }
    // after a failed write the writer refuses to go on rather than produce a corrupt file
    if (!message.empty()) {
      EXPECT_THAT([&] { w.commit(); }, ::testing::ThrowsMessage<Error>(::testing::AnyOf(
                                           HasSubstr("earlier write failed"), HasSubstr("incomplete"))));
    }
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_THAT(message, ::testing::AllOf(HasSubstr(path), HasSubstr("File too large")));
  EXPECT_TRUE(dir.entries().empty());
}

TEST(Safetensors, ViewsOutliveTheFileObject) {
  ScratchDir dir;
  const std::string path = dir.file("v.safetensors");
  std::vector<float> vals = {1.5f, -2.0f, 3.25f};
  save_safetensors(path, {{"w", Tensor::from_bytes(DType::F32, {3}, vals.data(), 12)}});
  Tensor w;
  {
    auto f = SafetensorsFile::open(path);
    w = f->get("w");
  }
  std::filesystem::remove(path);  // the mapping survives unlink, and the file object is gone
  EXPECT_EQ(w.data<float>()[2], 3.25f);
  EXPECT_THAT([&] { w.mutable_raw(); }, ::testing::ThrowsMessage<Error>(HasSubstr("read-only")));
}

TEST(Safetensors, MisalignedTensorsComeBackAlignedWithTheSameBytes) {
  // Unpadded header (7 bytes of JSON would leave the data at offset 15) and a U8 tensor of 3 bytes
  // before an F32 one: both are legal, neither is aligned.
  const std::string h = R"({"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},)"
                        R"("f":{"dtype":"F32","shape":[2],"data_offsets":[3,11]},)"
                        R"("h":{"dtype":"BF16","shape":[1],"data_offsets":[11,13]}})";
  const float vals[2] = {1.25f, -3.5f};
  std::string data = "abc";
  data.append(reinterpret_cast<const char*>(vals), 8);
  data += "\x80\x3f";  // bf16 1.0
  for (int pad = 0; pad < 8; ++pad) {  // every misalignment of the data section
    const std::string img = make_image(h + std::string(size_t(pad), ' '), data);
    auto f = parse_image(img);
    const Tensor t = f->get("f");
    ASSERT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 4, 0u) << pad;
    EXPECT_EQ(t.data<float>()[0], 1.25f);
    EXPECT_EQ(t.data<float>()[1], -3.5f);
    const Tensor bh = f->get("h");
    ASSERT_EQ(reinterpret_cast<uintptr_t>(bh.raw()) % 2, 0u) << pad;
    EXPECT_EQ(bh.to_f32().data<float>()[0], 1.0f);
    EXPECT_EQ(std::string(f->get("b").data<char>(), 3), "abc");
  }
}

TEST(Safetensors, GetAndFindOfMissingNames) {
  ScratchDir dir;
  save_safetensors(dir.file("g.safetensors"), {{"x", Tensor::zeros(DType::I8, {2})}});
  auto f = SafetensorsFile::open(dir.file("g.safetensors"));
  EXPECT_EQ(f->find("y"), nullptr);
  EXPECT_THAT([&] { f->get("y"); },
              ::testing::ThrowsMessage<Error>(::testing::AllOf(HasSubstr("g.safetensors"), HasSubstr("'y'"))));
  EXPECT_THAT([&] { SafetensorsFile::open(dir.file("nothere.safetensors")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("nothere.safetensors")));
  EXPECT_THAT([&] { SafetensorsFile::open(dir.path().string()); },
              ::testing::ThrowsMessage<Error>(HasSubstr("not a regular file")));
}

TEST(Safetensors, ReadsHeadersOfOtherWriters) {
  // Compact header without padding, tensors listed out of offset order, unknown extra fields
  // ignored, whitespace everywhere: all legal.
  const std::string h =
      R"( { "b" : {"dtype":"U8","shape":[2],"data_offsets":[3,5]},
            "a": {"shape": [3], "data_offsets": [0, 3], "dtype": "I8", "extra": 1} } )";
  auto f = parse_image(make_image(h, "\x01\x02\x03\x04\x05"));
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->tensors()[0].name, "a");
  EXPECT_EQ(f->get("b").data<uint8_t>()[1], 5);
}

}  // namespace
