// One test per entry of the reader's error catalogue (docs/io.md): hand-crafted bad images, each
// must raise a nibble::Error that names the file, the tensor (where there is one) and the problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nibble/error.h"
#include "nibble/safetensors.h"
#include "test_io_common.h"

using namespace nibble;
using namespace nibble::testing_io;
using ::testing::AllOf;
using ::testing::HasSubstr;

namespace {

// Expects parse_image(img) to throw an Error whose message contains every fragment and the label.
void expect_rejected(const std::string& img, std::initializer_list<std::string> fragments) {
  try {
    parse_image(img);
    ADD_FAILURE() << "accepted a bad image";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_THAT(msg, HasSubstr("'mem.safetensors'"));
    for (const auto& f : fragments) EXPECT_THAT(msg, HasSubstr(f));
  }
}

std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

TEST(SafetensorsValidation, FileShorterThanEightBytes) {
  expect_rejected("", {"file is 0 bytes", "shorter than the 8-byte"});
  expect_rejected(std::string("\x02\0\0\0", 4), {"file is 4 bytes"});
}

TEST(SafetensorsValidation, FileShorterThanEightBytesViaOpen) {
  ScratchDir dir;
  write_bytes(dir.file("short.safetensors"), "abc");
  EXPECT_THAT([&] { SafetensorsFile::open(dir.file("short.safetensors")); },
              ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("short.safetensors"), HasSubstr("3 bytes"))));
  write_bytes(dir.file("empty.safetensors"), "");
  EXPECT_THAT([&] { SafetensorsFile::open(dir.file("empty.safetensors")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("file is 0 bytes")));
}

TEST(SafetensorsValidation, HeaderLengthLargerThanFile) {
  std::string img = make_image("{}");
  img[0] = 3;  // claims 3 bytes, 2 present
  expect_rejected(img, {"header length 3 is larger than the file (2 bytes"});
}

TEST(SafetensorsValidation, HeaderLengthAboveCap) {
  std::string img = make_image("{}");
  const uint64_t n = (uint64_t(100) << 20) + 1;
  for (int i = 0; i < 8; ++i) img[size_t(i)] = char(uint8_t(n >> (8 * i)));
  expect_rejected(img, {"exceeds the 100 MB cap"});
  for (int i = 0; i < 8; ++i) img[size_t(i)] = char(0xff);  // 2^64 - 1: must not wrap anything
  expect_rejected(img, {"exceeds the 100 MB cap"});
}

TEST(SafetensorsValidation, MalformedJson) {
  expect_rejected(make_image(R"({"a": {"dtype": "F32",)"), {"malformed header JSON"});
  expect_rejected(make_image("{} trailing"), {"malformed header JSON"});
  expect_rejected(make_image(std::string("{\"a\0\":1}", 8)), {"malformed header JSON"});
  expect_rejected(make_image(""), {"malformed header JSON"});
}

TEST(SafetensorsValidation, NonUtf8Json) {
  expect_rejected(make_image("{\"w\xff\": 1}"), {"not valid UTF-8", "0xff", "offset 3"});
  expect_rejected(make_image("{\"\xc0\xaf\": 1}"), {"not valid UTF-8"});          // overlong '/'
  expect_rejected(make_image("{\"\xed\xa0\x80\": 1}"), {"not valid UTF-8"});      // surrogate
  expect_rejected(make_image("{\"\xf4\x90\x80\x80\": 1}"), {"not valid UTF-8"});  // > U+10FFFF
  expect_rejected(make_image("{\"\xe2\x82\": 1}"), {"not valid UTF-8"});          // truncated
}

TEST(SafetensorsValidation, DuplicateKeys) {
  const std::string e = entry("U8", "[1]", "[0,1]");
  expect_rejected(make_image("{\"w\":" + e + ",\"w\":" + e + "}", "x"), {"duplicate key \"w\""});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", "x"),
                  {"duplicate key \"dtype\"", "object \"w\""});
  expect_rejected(make_image(R"({"__metadata__":{"k":"a","k":"b"}})"), {"duplicate key \"k\""});
  expect_rejected(make_image(R"({"__metadata__":{},"__metadata__":{}})"), {"duplicate key \"__metadata__\""});
}

TEST(SafetensorsValidation, DeepNestingIsRefused) {
  expect_rejected(make_image(std::string(100000, '[') + std::string(100000, ']')), {"nests deeper than"});
}

TEST(SafetensorsValidation, HeaderNotAnObject) {
  expect_rejected(make_image("[]"), {"header must be a JSON object, got array"});
  expect_rejected(make_image("42"), {"header must be a JSON object, got number"});
}

TEST(SafetensorsValidation, EntryNotAnObject) {
  expect_rejected(make_image(R"({"w": [1,2]})"), {"tensor 'w'", "entry must be an object", "got array"});
}

TEST(SafetensorsValidation, MissingFields) {
  expect_rejected(make_image(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", "x"), {"tensor 'w'", "missing field \"dtype\""});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", "x"), {"tensor 'w'", "missing field \"shape\""});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1]}})", "x"), {"tensor 'w'", "missing field \"data_offsets\""});
}

TEST(SafetensorsValidation, WrongFieldTypes) {
  expect_rejected(make_image(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", "x"),
                  {"tensor 'w'", "\"dtype\" must be a string, got number"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "x"),
                  {"tensor 'w'", "\"shape\" must be an array"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}})", "x"),
                  {"tensor 'w'", "non-negative integers, got number"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}})", "x"),
                  {"tensor 'w'", "got boolean"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "x"),
                  {"tensor 'w'", "\"data_offsets\" must be an array [begin, end]"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", "x"),
                  {"tensor 'w'", "\"data_offsets\" must be an array [begin, end]"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":{"a":0}}})", "x"),
                  {"tensor 'w'", "\"data_offsets\" must be an array"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", "x"),
                  {"tensor 'w'", "non-negative integers"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}})", "x"),
                  {"tensor 'w'", "non-negative integers"});
  // A number too large for uint64 becomes a JSON float: still not an integer.
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,99999999999999999999999]}})", "x"),
                  {"tensor 'w'", "non-negative integers"});
}

TEST(SafetensorsValidation, UnknownDtypeListsSupportedOnes) {
  expect_rejected(make_image(R"({"w":{"dtype":"F12","shape":[1],"data_offsets":[0,1]}})", "x"),
                  {"tensor 'w'", "unknown dtype \"F12\"", "supported: F64, F32, F16, BF16", "F8_E4M3", "F4"});
  expect_rejected(make_image(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "xxxx"),
                  {"unknown dtype \"f32\""});  // spellings are case-sensitive
}

TEST(SafetensorsValidation, NegativeDimension) {
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[2,-3],"data_offsets":[0,0]}})"),
                  {"tensor 'w'", "negative dimension -3"});
}

TEST(SafetensorsValidation, ShapeProductOverflow) {
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
                  {"tensor 'w'", "more elements than int64"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})"),
                  {"tensor 'w'", "exceeds int64"});
  // Elements fit int64 but bytes overflow: 2^62 F64 elements = 2^65 bytes.
  expect_rejected(make_image(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
                  {"tensor 'w'", "overflow"});
}

TEST(SafetensorsValidation, ByteLengthMismatch) {
  expect_rejected(make_image(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", std::string(20, 'x')),
                  {"tensor 'w'", "byte length 20", "F32 (2, 3) = 24 bytes"});
  // Sub-byte dtypes: 10 F4 codes are 5 bytes; 4 F6 values are 3 bytes.
  expect_rejected(make_image(R"({"w":{"dtype":"F4","shape":[10],"data_offsets":[0,10]}})", std::string(10, 'x')),
                  {"tensor 'w'", "= 5 bytes"});
  expect_rejected(make_image(R"({"w":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[0,4]}})", std::string(4, 'x')),
                  {"tensor 'w'", "= 3 bytes"});
  expect_rejected(make_image(R"({"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", "xx"),
                  {"tensor 'w'", "not a whole number of bytes"});
  // And the good cases parse.
  EXPECT_NO_THROW(parse_image(make_image(R"({"w":{"dtype":"F4","shape":[10],"data_offsets":[0,5]}})", "xxxxx")));
  EXPECT_NO_THROW(parse_image(make_image(R"({"w":{"dtype":"F6_E2M3","shape":[2,2],"data_offsets":[0,3]}})", "xxx")));
}

TEST(SafetensorsValidation, OffsetsOutOfBounds) {
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "xx"),
                  {"tensor 'w'", "run past the data section (2 bytes)"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551616]}})"),
                  {"tensor 'w'"});
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}})"),
                  {"tensor 'w'", "run past the data section"});
}

TEST(SafetensorsValidation, EndBeforeBegin) {
  expect_rejected(make_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[3,2]}})", "xxxx"),
                  {"tensor 'w'", "[3, 2] end before begin"});
}

TEST(SafetensorsValidation, OverlappingTensors) {
  const std::string h = "{\"a\":" + entry("U8", "[4]", "[0,4]") + ",\"b\":" + entry("U8", "[4]", "[2,6]") + "}";
  expect_rejected(make_image(h, "xxxxxx"), {"tensor 'b'", "overlap tensor 'a' [0, 4]"});
  // Two tensors on the very same bytes (aliasing) are overlap too.
  const std::string h2 = "{\"a\":" + entry("U8", "[4]", "[0,4]") + ",\"b\":" + entry("I8", "[4]", "[0,4]") + "}";
  expect_rejected(make_image(h2, "xxxx"), {"overlap"});
  // An empty tensor placed inside another one.
  const std::string h3 = "{\"a\":" + entry("U8", "[4]", "[0,4]") + ",\"e\":" + entry("U8", "[0]", "[2,2]") + "}";
  expect_rejected(make_image(h3, "xxxx"), {"tensor 'e'", "overlap"});
}

TEST(SafetensorsValidation, HolesInTheDataSection) {
  const std::string h = "{\"a\":" + entry("U8", "[2]", "[0,2]") + ",\"b\":" + entry("U8", "[2]", "[3,5]") + "}";
  expect_rejected(make_image(h, "xxxxx"), {"tensor 'b'", "leave a hole: bytes [2, 3)"});
  expect_rejected(make_image("{\"b\":" + entry("U8", "[2]", "[1,3]") + "}", "xxx"), {"tensor 'b'", "hole: bytes [0, 1)"});
  expect_rejected(make_image("{\"a\":" + entry("U8", "[2]", "[0,2]") + "}", "xxxx"),
                  {"bytes [2, 4) at the end of the data section belong to no tensor"});
  expect_rejected(make_image("{}", "x"), {"bytes [0, 1) at the end"});
  // Empty tensors between and after others are fine.
  const std::string ok = "{\"a\":" + entry("U8", "[2]", "[0,2]") + ",\"e\":" + entry("F32", "[0,3]", "[2,2]") +
                         ",\"b\":" + entry("U8", "[1]", "[2,3]") + ",\"z\":" + entry("U8", "[0]", "[3,3]") + "}";
  EXPECT_EQ(parse_image(make_image(ok, "xyz"))->tensors().size(), 4u);
}

TEST(SafetensorsValidation, MetadataMustBeStrings) {
  expect_rejected(make_image(R"({"__metadata__":{"a":"ok","n":3}})"), {"\"__metadata__\" value of key \"n\"", "got number"});
  expect_rejected(make_image(R"({"__metadata__":{"o":{}}})"), {"key \"o\"", "got object"});
  expect_rejected(make_image(R"({"__metadata__":{"z":null}})"), {"key \"z\"", "got null"});
  expect_rejected(make_image(R"({"__metadata__":["a"]})"), {"\"__metadata__\" must be an object of strings, got array"});
}

TEST(SafetensorsValidation, ErrorsThroughOpenNameThePath) {
  ScratchDir dir;
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, make_image(R"({"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", "x"));
  EXPECT_THAT([&] { SafetensorsFile::open(path); },
              ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("'" + path + "'"), HasSubstr("tensor 'w'"),
                                                    HasSubstr("unknown dtype \"Q4\""))));
  EXPECT_THAT([&] { Checkpoint::open(path); }, ::testing::ThrowsMessage<Error>(HasSubstr("unknown dtype")));
}

}  // namespace
