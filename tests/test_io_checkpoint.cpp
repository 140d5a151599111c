// Checkpoint: single file, sharded index and directory of shards; their error cases.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "nibble/error.h"
#include "nibble/safetensors.h"
#include "test_io_common.h"

using namespace nibble;
using namespace nibble::testing_io;
using ::testing::AllOf;
using ::testing::HasSubstr;

namespace {

Tensor iota_u8(int64_t n, uint8_t start) {
  Tensor t = Tensor::empty(DType::U8, {n});
  for (int64_t i = 0; i < n; ++i) t.mutable_data<uint8_t>()[i] = uint8_t(start + i);
  return t;
}

// Two shards + index, the layout `transformers` writes.
void write_sharded(const ScratchDir& dir) {
  save_safetensors(dir.file("model-00001-of-00002.safetensors"),
                   {{"blocks.0.w", iota_u8(5, 0)}, {"blocks.0.b", iota_u8(2, 50)}}, {{"format", "pt"}, {"src", "shard1"}});
  save_safetensors(dir.file("model-00002-of-00002.safetensors"),
                   {{"blocks.1.w", iota_u8(7, 100)}, {"extra.not_in_map", iota_u8(1, 9)}});
  write_safetensors_index(dir.file("model.safetensors.index.json"),
                          {{"blocks.0.w", "model-00001-of-00002.safetensors"},
                           {"blocks.0.b", "model-00001-of-00002.safetensors"},
                           {"blocks.1.w", "model-00002-of-00002.safetensors"}},
                          {{"total_size", "14"}, {"src", "index"}});
}

TEST(Checkpoint, SingleFile) {
  ScratchDir dir;
  save_safetensors(dir.file("one.safetensors"), {{"b", iota_u8(3, 1)}, {"a", iota_u8(2, 7)}}, {{"k", "v"}});
  const Checkpoint ck = Checkpoint::open(dir.file("one.safetensors"));
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(ck.get("b").data<uint8_t>()[2], 3);
  EXPECT_EQ(ck.info("a").shape, Shape{2});
  EXPECT_EQ(ck.file_of("a"), dir.file("one.safetensors"));
  EXPECT_EQ(ck.metadata().at("k"), "v");
  EXPECT_EQ(ck.total_bytes(), 5u);
  EXPECT_EQ(ck.shards().size(), 1u);
  EXPECT_THAT([&] { ck.get("c"); }, ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("one.safetensors"), HasSubstr("'c'"))));
  EXPECT_THAT([&] { ck.info("c"); }, ::testing::ThrowsMessage<Error>(HasSubstr("no tensor named 'c'")));
}

TEST(Checkpoint, ShardedIndexRoundTrip) {
  ScratchDir dir;
  write_sharded(dir);
  const Checkpoint ck = Checkpoint::open(dir.file("model.safetensors.index.json"));
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"blocks.0.b", "blocks.0.w", "blocks.1.w"}));
  EXPECT_FALSE(ck.contains("extra.not_in_map"));  // only what the weight_map lists
  EXPECT_EQ(ck.get("blocks.1.w").data<uint8_t>()[6], 106);
  EXPECT_EQ(ck.get("blocks.0.b").data<uint8_t>()[1], 51);
  EXPECT_EQ(ck.file_of("blocks.1.w"), dir.file("model-00002-of-00002.safetensors"));
  EXPECT_EQ(ck.total_bytes(), 14u);
  EXPECT_EQ(ck.shards().size(), 2u);
  // shard 1's __metadata__ merged with the index metadata (the index wins on a shared key)
  EXPECT_EQ(ck.metadata().at("format"), "pt");
  EXPECT_EQ(ck.metadata().at("total_size"), "14");
  EXPECT_EQ(ck.metadata().at("src"), "index");
}

TEST(Checkpoint, IndexWrittenByOthersWithNumericTotalSize) {
  ScratchDir dir;
  save_safetensors(dir.file("s.safetensors"), {{"w", iota_u8(4, 0)}});
  write_bytes(dir.file("m.safetensors.index.json"),
              R"({"metadata": {"total_size": 4, "note": "x", "nested": {"a": 1}}, "weight_map": {"w": "s.safetensors"}})");
  const Checkpoint ck = Checkpoint::open(dir.file("m.safetensors.index.json"));
  EXPECT_EQ(ck.metadata().at("total_size"), "4");
  EXPECT_EQ(ck.metadata().at("note"), "x");
  EXPECT_EQ(ck.metadata().count("nested"), 0u);
  EXPECT_EQ(ck.names(), std::vector<std::string>{"w"});
}

TEST(Checkpoint, IndexFileIsWrittenAtomicallyAndParsesBack) {
  ScratchDir dir;
  write_sharded(dir);
  const std::string text = read_bytes(dir.file("model.safetensors.index.json"));
  EXPECT_THAT(text, HasSubstr("\"weight_map\""));
  EXPECT_EQ(dir.entries().size(), 3u);  // no temporary file left behind
  write_safetensors_index(dir.file("empty.safetensors.index.json"), {});
  // an empty index is a valid, empty checkpoint
  EXPECT_TRUE(Checkpoint::open(dir.file("empty.safetensors.index.json")).names().empty());
}

TEST(Checkpoint, DirectoryOfShards) {
  ScratchDir dir;
  write_sharded(dir);
  write_bytes(dir.file("notes.txt"), "not a shard");
  const Checkpoint ck = Checkpoint::open(dir.path().string());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"blocks.0.b", "blocks.0.w", "blocks.1.w", "extra.not_in_map"}));
  ASSERT_EQ(ck.shards().size(), 2u);
  EXPECT_EQ(ck.shards()[0]->path(), dir.file("model-00001-of-00002.safetensors"));  // sorted
  EXPECT_EQ(ck.metadata().at("src"), "shard1");
  EXPECT_EQ(ck.get("extra.not_in_map").data<uint8_t>()[0], 9);
}

TEST(Checkpoint, DirectoryDuplicateTensorAcrossShardsIsAnError) {
  ScratchDir dir;
  save_safetensors(dir.file("a.safetensors"), {{"w", iota_u8(1, 0)}});
  save_safetensors(dir.file("b.safetensors"), {{"w", iota_u8(1, 0)}});
  EXPECT_THAT([&] { Checkpoint::open(dir.path().string()); },
              ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("tensor 'w' appears in two shards"),
                                                    HasSubstr("a.safetensors"), HasSubstr("b.safetensors"))));
}

TEST(Checkpoint, EmptyDirectoryIsAnError) {
  ScratchDir dir;
  EXPECT_THAT([&] { Checkpoint::open(dir.path().string()); },
              ::testing::ThrowsMessage<Error>(HasSubstr("holds no *.safetensors files")));
}

TEST(Checkpoint, IndexMissingShardFile) {
  ScratchDir dir;
  write_sharded(dir);
  std::filesystem::remove(dir.file("model-00002-of-00002.safetensors"));
  EXPECT_THAT([&] { Checkpoint::open(dir.file("model.safetensors.index.json")); },
              ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("model.safetensors.index.json"),
                                                    HasSubstr("shard file '" + dir.file("model-00002-of-00002.safetensors")),
                                                    HasSubstr("is missing"))));
}

TEST(Checkpoint, IndexNameMissingFromItsShard) {
  ScratchDir dir;
  write_sharded(dir);
  write_safetensors_index(dir.file("model.safetensors.index.json"),
                          {{"blocks.0.w", "model-00001-of-00002.safetensors"},
                           {"blocks.1.w", "model-00001-of-00002.safetensors"}});
  EXPECT_THAT([&] { Checkpoint::open(dir.file("model.safetensors.index.json")); },
              ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("tensor 'blocks.1.w' is listed in weight_map but missing"),
                                                    HasSubstr("model-00001-of-00002.safetensors"))));
}

TEST(Checkpoint, IndexStructureErrors) {
  ScratchDir dir;
  save_safetensors(dir.file("s.safetensors"), {{"w", iota_u8(4, 0)}});
  auto expect_bad = [&](const std::string& text, const std::string& fragment) {
    write_bytes(dir.file("i.safetensors.index.json"), text);
    EXPECT_THAT([&] { Checkpoint::open(dir.file("i.safetensors.index.json")); },
                ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("i.safetensors.index.json"), HasSubstr(fragment))))
        << text;
  };
  expect_bad("[]", "must be a JSON object");
  expect_bad("{}", "missing \"weight_map\"");
  expect_bad(R"({"weight_map": []})", "\"weight_map\" must be an object");
  expect_bad(R"({"weight_map": {"w": 3}})", "weight_map entry 'w' must be a shard file name");
  expect_bad(R"({"weight_map": {"w": "s.safetensors", "w": "s.safetensors"}})", "duplicate key \"w\"");
  expect_bad(R"({"weight_map": {"w": "../s.safetensors"}})", "must be a relative path");
  expect_bad(R"({"weight_map": {"w": "/etc/passwd"}})", "must be a relative path");
  expect_bad(R"({"weight_map": {"w": "s.safetensors"}, "metadata": 5})", "\"metadata\" must be an object");
  expect_bad("{\"weight_map\": {", "malformed");
  expect_bad("{\"weight_map\": {\"\xff\": \"s.safetensors\"}}", "not valid UTF-8");
}

TEST(Checkpoint, MissingPath) {
  EXPECT_THAT([&] { Checkpoint::open("/nonexistent/dir/model.safetensors"); },
              ::testing::ThrowsMessage<Error>(AllOf(HasSubstr("/nonexistent/dir/model.safetensors"),
                                                    HasSubstr("No such file"))));
}

TEST(Checkpoint, BadShardErrorNamesTheShard) {
  ScratchDir dir;
  save_safetensors(dir.file("a.safetensors"), {{"w", iota_u8(1, 0)}});
  write_bytes(dir.file("b.safetensors"), "garbage!garbage");
  EXPECT_THAT([&] { Checkpoint::open(dir.path().string()); },
              ::testing::ThrowsMessage<Error>(HasSubstr(dir.file("b.safetensors"))));
}

}  // namespace
