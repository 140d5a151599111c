// safetensors reader: mmap + complete header validation, zero-copy tensor views.
//
// Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data section. The
// header is checked completely before any tensor is exposed (see docs/io.md for the catalogue);
// after open() every TensorInfo is known to lie inside the data section, to have exactly
// dtype-size × elements bytes, and the tensors tile the data section without overlap or holes.
// Nothing is allocated from a header number: containers grow only with what the parser actually
// read (bounded by the 100 MB header cap).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <fmt/format.h>

#include "io/json_strict.h"
#include "nibble/error.h"
#include "nibble/safetensors.h"

namespace nibble {

namespace {
using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = uint64_t(100) << 20;

std::string file_what(const std::string& label) { return fmt::format("safetensors file '{}'", label); }

[[noreturn]] void fail_tensor(const std::string& label, const std::string& name, const std::string& msg) {
  throw Error(fmt::format("{}: tensor '{}': {}", file_what(label), name, msg));
}

const char* json_type(const json& v) { return v.type_name(); }

// A non-negative integer that fits int64 (or uint64 for offsets); JSON floats are not integers.
bool as_u64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) { *out = v.get<uint64_t>(); return true; }
  if (v.is_number_integer()) {
    const int64_t s = v.get<int64_t>();
    if (s < 0) return false;
    *out = uint64_t(s);
    return true;
  }
  return false;
}

TensorInfo parse_entry(const std::string& label, const std::string& name, const json& e) {
  if (!e.is_object())
    fail_tensor(label, name, fmt::format("entry must be an object with dtype, shape, data_offsets; got {}", json_type(e)));
  TensorInfo t;
  t.name = name;
  // dtype
  const auto dt = e.find("dtype");
  if (dt == e.end()) fail_tensor(label, name, "missing field \"dtype\"");
  if (!dt->is_string()) fail_tensor(label, name, fmt::format("\"dtype\" must be a string, got {}", json_type(*dt)));
  const auto& dts = dt->get_ref<const std::string&>();
  if (!parse_dtype(dts, &t.dtype))
    fail_tensor(label, name, fmt::format("unknown dtype \"{}\" (supported: {})", dts, supported_dtype_names()));
  // shape
  const auto sh = e.find("shape");
  if (sh == e.end()) fail_tensor(label, name, "missing field \"shape\"");
  if (!sh->is_array()) fail_tensor(label, name, fmt::format("\"shape\" must be an array of integers, got {}", json_type(*sh)));
  for (const auto& d : *sh) {
    if (d.is_number_integer() && !d.is_number_unsigned() && d.get<int64_t>() < 0)
      fail_tensor(label, name, fmt::format("negative dimension {} in \"shape\" {}", d.get<int64_t>(), sh->dump()));
    uint64_t u;
    if (!as_u64(d, &u))
      fail_tensor(label, name, fmt::format("\"shape\" must contain non-negative integers, got {} in {}", json_type(d), sh->dump()));
    if (u > uint64_t(INT64_MAX))
      fail_tensor(label, name, fmt::format("dimension {} in \"shape\" exceeds int64", u));
    t.shape.push_back(int64_t(u));
  }
  uint64_t numel;
  try {  // the same overflow rule as every later Tensor::view of this shape
    numel = uint64_t(shape_numel(t.shape));
  } catch (const Error&) {
    fail_tensor(label, name, fmt::format("shape {} has more elements than int64 can count", sh->dump()));
  }
  // data_offsets
  const auto off = e.find("data_offsets");
  if (off == e.end()) fail_tensor(label, name, "missing field \"data_offsets\"");
  if (!off->is_array() || off->size() != 2)
    fail_tensor(label, name, fmt::format("\"data_offsets\" must be an array [begin, end] of two integers, got {}", off->dump()));
  if (!as_u64((*off)[0], &t.begin) || !as_u64((*off)[1], &t.end))
    fail_tensor(label, name, fmt::format("\"data_offsets\" must hold non-negative integers, got {}", off->dump()));
  if (t.end < t.begin)
    fail_tensor(label, name, fmt::format("\"data_offsets\" [{}, {}] end before begin", t.begin, t.end));
  uint64_t expect;
  try {
    expect = dtype_nbytes(t.dtype, numel);
  } catch (const Error& err) {
    fail_tensor(label, name, fmt::format("shape {}: {}", sh->dump(), err.what()));
  }
  if (t.end - t.begin != expect)
    fail_tensor(label, name, fmt::format("byte length {} (data_offsets [{}, {}]) does not match {} {} = {} bytes",
                                         t.end - t.begin, t.begin, t.end, dts, shape_str(t.shape), expect));
  return t;
}
}  // namespace

namespace {
// The live file mappings (address ranges), so release_mapped_pages() can tell a file view from
// heap memory.
std::mutex g_maps_mu;
std::map<uintptr_t, size_t>& live_mappings() {
  static std::map<uintptr_t, size_t> m;
  return m;
}
}  // namespace

struct SafetensorsFile::Impl {
  // Keeps an mmap alive; the last Tensor view referencing it unmaps.
  struct Mapping {
    void* addr = nullptr;
    size_t len = 0;
    void track() {
      std::lock_guard<std::mutex> lk(g_maps_mu);
      live_mappings()[uintptr_t(addr)] = len;
    }
    ~Mapping() {
      if (!addr) return;
      {
        std::lock_guard<std::mutex> lk(g_maps_mu);
        live_mappings().erase(uintptr_t(addr));
      }
      ::munmap(addr, len);
    }
  };
};

size_t release_mapped_pages(const Tensor& t) {
  if (!t.defined() || t.nbytes() == 0) return 0;
  const uintptr_t b = uintptr_t(t.raw()), e = b + t.nbytes();
  {
    std::lock_guard<std::mutex> lk(g_maps_mu);
    auto& m = live_mappings();
    auto it = m.upper_bound(b);
    if (it == m.begin()) return 0;
    --it;
    if (b < it->first || e > it->first + it->second) return 0;  // not inside a file mapping
  }
  // The tensor keeps its mapping alive, so the range stays mapped while we advise on it.
  static const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const uintptr_t pb = (b + page - 1) & ~(page - 1), pe = e & ~(page - 1);
  if (pe <= pb) return 0;
  if (::madvise(reinterpret_cast<void*>(pb), pe - pb, MADV_DONTNEED) != 0) return 0;
  return size_t(pe - pb);
}

SafetensorsFile::~SafetensorsFile() = default;

void SafetensorsFile::parse(const void* data, size_t size) {
  const std::string what = file_what(path_);
  size_ = size;
  if (size < 8)
    throw IoError(fmt::format("{}: file is {} bytes, shorter than the 8-byte header length prefix (truncated?)",
                              what, size), path_);
  const auto* bytes = static_cast<const uint8_t*>(data);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian, independent of the host
  if (n > kMaxHeaderBytes)
    throw Error(fmt::format("{}: header length {} exceeds the 100 MB cap ({} bytes)", what, n, kMaxHeaderBytes));
  if (n > size - 8)
    throw IoError(fmt::format("{}: header length {} is larger than the file ({} bytes after the 8-byte prefix; "
                              "truncated?)", what, n, size - 8), path_);
  header_.assign(reinterpret_cast<const char*>(bytes + 8), size_t(n));
  const json root = io::parse_json_strict(header_, what);
  if (!root.is_object())
    throw Error(fmt::format("{}: header must be a JSON object, got {}", what, json_type(root)));

  const uint64_t data_size = size - 8 - n;
  data_section_ = bytes + 8 + n;
  tensors_.clear();
  index_.clear();
  metadata_.clear();
  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        throw Error(fmt::format("{}: \"__metadata__\" must be an object of strings, got {}", what, json_type(value)));
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          throw Error(fmt::format("{}: \"__metadata__\" value of key \"{}\" must be a string, got {}", what, mk,
                                  json_type(mv)));
        metadata_.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    TensorInfo t = parse_entry(path_, key, value);
    if (t.end > data_size)  // the header is whole but the data is not: a truncated file
      throw IoError(fmt::format("{}: tensor '{}': data_offsets [{}, {}] run past the data section ({} bytes); "
                                "truncated file?", what, key, t.begin, t.end, data_size), path_);
    tensors_.push_back(std::move(t));
  }
  // The tensors must tile [0, data_size) exactly: sort by offsets and walk.
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  uint64_t covered = 0;
  const TensorInfo* prev = nullptr;
  for (const auto& t : tensors_) {
    if (t.begin < covered)
      fail_tensor(path_, t.name, fmt::format("data_offsets [{}, {}] overlap tensor '{}' [{}, {}]", t.begin, t.end,
                                             prev->name, prev->begin, prev->end));
    if (t.begin > covered)
      fail_tensor(path_, t.name, fmt::format("data_offsets [{}, {}] leave a hole: bytes [{}, {}) of the data section "
                                             "belong to no tensor",
                                             t.begin, t.end, covered, t.begin));
    if (t.end > t.begin) {
      covered = t.end;
      prev = &t;
    }
  }
  if (covered != data_size)
    throw Error(fmt::format("{}: bytes [{}, {}) at the end of the data section belong to no tensor", what, covered,
                            data_size));
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::from_memory(std::shared_ptr<const void> keepalive,
                                                              const void* data, size_t size, std::string label) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = std::move(label);
  f->mapping_ = std::move(keepalive);
  f->parse(data, size);
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    throw IoError(fmt::format("cannot open safetensors file '{}': {}", path, std::strerror(e)), path, e);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw IoError(fmt::format("cannot stat safetensors file '{}': {}", path, std::strerror(e)), path, e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(fmt::format("safetensors file '{}': not a regular file", path), path);
  }
  const size_t size = size_t(st.st_size);
  auto mapping = std::make_shared<Impl::Mapping>();
  if (size > 0) {
    void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (addr == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      throw IoError(fmt::format("cannot mmap safetensors file '{}' ({} bytes): {}", path, size, std::strerror(e)),
                    path, e);
    }
    mapping->addr = addr;
    mapping->len = size;
    mapping->track();
  }
  ::close(fd);  // the mapping stays valid without the descriptor
  const void* base = mapping->addr;
  std::shared_ptr<const void> keepalive(mapping, mapping->addr);  // aliasing: owns the Mapping
  return from_memory(std::move(keepalive), base, size, path);
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Tensor SafetensorsFile::get(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (!t) throw Error(fmt::format("{}: no tensor named '{}'", file_what(path_), name));
  const uint8_t* p = data_section_ + t->begin;
  // Tensors are read through typed pointers, so their bytes must be aligned to the element size.
  // The format does not promise that (no padding between tensors; other writers may not pad the
  // header), so a misaligned tensor is returned as an aligned private copy instead of a view.
  const size_t align = t->dtype == DType::C64 ? 4 : std::max<size_t>(1, dtype_size(t->dtype));
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    // Read-only like every other tensor of a file; the copy lives as long as the view.
    auto copy = std::make_shared<Tensor>(Tensor::from_bytes(t->dtype, t->shape, p, t->nbytes()));
    const void* raw = copy->raw();
    return Tensor::view(t->dtype, t->shape, raw, std::shared_ptr<const void>(copy, raw));
  }
  return Tensor::view(t->dtype, t->shape, p, mapping_);
}

}  // namespace nibble
