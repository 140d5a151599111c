// Streaming safetensors writer and the index writer.
//
// Every tensor is declared before the first byte is written, so the header (and every offset) is
// final up front and the data can be streamed in any chunk size without seeking back. The header
// JSON is produced here in a fixed order ("__metadata__" first, then the tensors in declaration
// order) and padded with spaces so the data section starts 8-byte aligned. Output goes through
// io::AtomicFile: nothing appears at the target path unless commit() succeeds.
#include <fmt/format.h>

#include <algorithm>
#include <set>

#include "io/atomic_file.h"
#include "io/json_strict.h"
#include "nibble/error.h"
#include "nibble/safetensors.h"

namespace nibble {

namespace {
void check_utf8(const std::string& s, const std::string& path, const char* what) {
  if (!io::is_valid_utf8(s))
    throw Error(fmt::format("safetensors writer '{}': {} is not valid UTF-8", path, what));
}
}  // namespace

struct SafetensorsWriter::Impl {
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t begin = 0, end = 0;
  };
  std::map<std::string, std::string> metadata;
  std::vector<Entry> entries;
  std::set<std::string, std::less<>> names;
  uint64_t data_bytes = 0;
  std::unique_ptr<io::AtomicFile> file;  // created by the first write()/commit()
  bool committed = false;
  size_t current = 0;          // first tensor not yet complete
  uint64_t current_done = 0;   // bytes of it written so far

  std::string header() const {
    std::string h = "{";
    if (!metadata.empty()) {
      h += "\"__metadata__\":{";
      bool first = true;
      for (const auto& [k, v] : metadata) {
        h += (first ? "" : ",") + io::json_quote(k) + ":" + io::json_quote(v);
        first = false;
      }
      h += "}";
    }
    for (size_t i = 0; i < entries.size(); ++i) {
      const Entry& e = entries[i];
      if (i > 0 || !metadata.empty()) h += ",";
      h += io::json_quote(e.name) + ":{\"dtype\":\"" + std::string(dtype_name(e.dtype)) + "\",\"shape\":[";
      for (size_t d = 0; d < e.shape.size(); ++d) h += (d ? "," : "") + std::to_string(e.shape[d]);
      h += fmt::format("],\"data_offsets\":[{},{}]}}", e.begin, e.end);
    }
    h += "}";
    // Pad with spaces (legal JSON whitespace) so 8 + header length is a multiple of 8.
    h.append((8 - h.size() % 8) % 8, ' ');
    return h;
  }

  // Creates the temporary file and writes the length prefix and the header.
  void start(const std::string& path) {
    file = std::make_unique<io::AtomicFile>(path);
    const std::string h = header();
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));  // little-endian
    file->write(len, 8);
    file->write(h.data(), h.size());
  }

  void skip_complete() {
    while (current < entries.size() && current_done == entries[current].end - entries[current].begin) {
      ++current;
      current_done = 0;
    }
  }
};

SafetensorsWriter::SafetensorsWriter(std::string path, std::map<std::string, std::string> metadata)
    : impl_(std::make_unique<Impl>()), path_(std::move(path)) {
  for (const auto& [k, v] : metadata) {
    check_utf8(k, path_, "a metadata key");
    check_utf8(v, path_, fmt::format("the metadata value of \"{}\"", k).c_str());
  }
  impl_->metadata = std::move(metadata);
}

SafetensorsWriter::~SafetensorsWriter() = default;  // an uncommitted AtomicFile removes itself

void SafetensorsWriter::add(std::string name, DType dtype, Shape shape) {
  Impl& m = *impl_;
  if (m.file || m.committed)
    throw Error(fmt::format("safetensors writer '{}': add('{}') after writing started; declare every tensor first",
                            path_, name));
  if (name == "__metadata__")
    throw Error(fmt::format("safetensors writer '{}': \"__metadata__\" is reserved and cannot name a tensor", path_));
  check_utf8(name, path_, "a tensor name");
  if (m.names.count(name))
    throw Error(fmt::format("safetensors writer '{}': tensor '{}' declared twice", path_, name));
  uint64_t nbytes;
  try {
    nbytes = dtype_nbytes(dtype, uint64_t(shape_numel(shape)));
  } catch (const Error& e) {
    throw Error(fmt::format("safetensors writer '{}': tensor '{}': {}", path_, name, e.what()));
  }
  if (m.data_bytes > UINT64_MAX - nbytes)
    throw Error(fmt::format("safetensors writer '{}': tensor '{}': total size overflows", path_, name));
  Impl::Entry e{name, dtype, std::move(shape), m.data_bytes, m.data_bytes + nbytes};
  m.data_bytes = e.end;
  m.names.insert(name);
  m.entries.push_back(std::move(e));
}

uint64_t SafetensorsWriter::planned_file_size() const { return 8 + impl_->header().size() + impl_->data_bytes; }

void SafetensorsWriter::write(std::string_view name, const void* data, size_t nbytes) {
  Impl& m = *impl_;
  if (m.committed) throw Error(fmt::format("safetensors writer '{}': write('{}') after commit()", path_, name));
  if (!m.file) m.start(path_);
  m.skip_complete();
  if (m.current >= m.entries.size() || m.entries[m.current].name != name) {
    // Zero bytes for an already complete (e.g. empty) tensor are harmless.
    const auto it = m.names.find(name);
    if (nbytes == 0 && it != m.names.end()) return;
    if (it == m.names.end())
      throw Error(fmt::format("safetensors writer '{}': write('{}'): no such tensor was declared", path_, name));
    if (m.current >= m.entries.size())
      throw Error(fmt::format("safetensors writer '{}': write('{}'): every tensor is already complete", path_, name));
    throw Error(fmt::format("safetensors writer '{}': write('{}'): expected bytes of tensor '{}' next (tensors are "
                            "written in declaration order)",
                            path_, name, m.entries[m.current].name));
  }
  const Impl::Entry& e = m.entries[m.current];
  const uint64_t remaining = e.end - e.begin - m.current_done;
  if (nbytes > remaining)
    throw Error(fmt::format("safetensors writer '{}': tensor '{}': {} bytes written but only {} remain of its {} "
                            "({} {})",
                            path_, name, nbytes, remaining, e.end - e.begin, dtype_name(e.dtype), shape_str(e.shape)));
  m.file->write(data, nbytes);
  m.current_done += nbytes;
  m.skip_complete();
}

void SafetensorsWriter::write_tensor(std::string_view name, const Tensor& t) {
  const auto it = std::find_if(impl_->entries.begin(), impl_->entries.end(),
                               [&](const Impl::Entry& e) { return e.name == name; });
  if (it == impl_->entries.end())
    throw Error(fmt::format("safetensors writer '{}': write_tensor('{}'): no such tensor was declared", path_, name));
  if (!t.defined() || t.dtype() != it->dtype || t.shape() != it->shape)
    throw Error(fmt::format("safetensors writer '{}': tensor '{}' was declared {} {}, got {} {}", path_, name,
                            dtype_name(it->dtype), shape_str(it->shape),
                            t.defined() ? dtype_name(t.dtype()) : "undefined", shape_str(t.shape())));
  write(name, t.raw(), t.nbytes());
}

void SafetensorsWriter::commit() {
  Impl& m = *impl_;
  if (m.committed) throw Error(fmt::format("safetensors writer '{}': commit() called twice", path_));
  if (!m.file) m.start(path_);
  m.skip_complete();
  if (m.current < m.entries.size())
    throw Error(fmt::format("safetensors writer '{}': commit() with tensor '{}' incomplete ({} of {} bytes written)",
                            path_, m.entries[m.current].name, m.current_done,
                            m.entries[m.current].end - m.entries[m.current].begin));
  m.file->commit();
  m.committed = true;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w(path, metadata);
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw Error(fmt::format("save_safetensors '{}': tensor '{}' is undefined", path, name));
    w.add(name, t.dtype(), t.shape());
  }
  for (const auto& [name, t] : tensors) w.write_tensor(name, t);
  w.commit();
}

void write_safetensors_index(const std::string& path, const std::map<std::string, std::string>& weight_map,
                             const std::map<std::string, std::string>& metadata) {
  std::string text = "{\n  \"metadata\": {";
  bool first = true;
  for (const auto& [k, v] : metadata) {
    check_utf8(k, path, "a metadata key");
    check_utf8(v, path, "a metadata value");
    text += (first ? "\n    " : ",\n    ") + io::json_quote(k) + ": " + io::json_quote(v);
    first = false;
  }
  text += first ? "},\n  \"weight_map\": {" : "\n  },\n  \"weight_map\": {";
  first = true;
  for (const auto& [name, shard] : weight_map) {
    check_utf8(name, path, "a tensor name");
    check_utf8(shard, path, "a shard file name");
    text += (first ? "\n    " : ",\n    ") + io::json_quote(name) + ": " + io::json_quote(shard);
    first = false;
  }
  text += first ? "}\n}\n" : "\n  }\n}\n";
  io::AtomicFile f(path);
  f.write(text.data(), text.size());
  f.commit();
}

}  // namespace nibble
