// Checkpoint: one name space over a single file, an HF-style index, or a directory of shards.
//
// Index (`*.safetensors.index.json`): {"metadata": {...}, "weight_map": {name: shard}}; shards are
// resolved relative to the index's directory and must be plain relative paths (no "..", not
// absolute) so an index cannot point outside its checkpoint. Every weight_map name must exist in
// its shard; tensors present in a shard but absent from the weight_map are not exposed (as in
// transformers). Directory: every regular `*.safetensors` file in it, sorted by name; a tensor
// name in two shards is an error.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "io/json_strict.h"
#include "nibble/error.h"
#include "nibble/safetensors.h"

namespace nibble {

namespace {
using json = nlohmann::json;

constexpr uint64_t kMaxIndexBytes = uint64_t(100) << 20;

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir == ".") return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string dir_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string read_small_file(const std::string& path, uint64_t cap, const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    throw IoError(fmt::format("cannot open {}: {}", what, std::strerror(e)), path, e);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(fmt::format("{}: not a regular file", what), path);
  }
  if (uint64_t(st.st_size) > cap) {
    ::close(fd);
    throw Error(fmt::format("{}: {} bytes exceed the {} byte cap for an index file", what, st.st_size, cap));
  }
  std::string text(size_t(st.st_size), '\0');  // size checked against the cap above
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t r = ::read(fd, text.data() + got, text.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += size_t(r);
  }
  ::close(fd);
  text.resize(got);
  return text;
}

// A shard path from an index must stay inside the index's directory.
bool is_safe_relative(const std::string& p) {
  if (p.empty() || p[0] == '/') return false;
  size_t start = 0;
  while (start <= p.size()) {
    const size_t slash = p.find('/', start);
    const std::string part = p.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (part == "..") return false;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return true;
}
}  // namespace

Checkpoint Checkpoint::open(const std::string& path) {
  Checkpoint ck;
  ck.path_ = path;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int e = errno;
    throw IoError(fmt::format("cannot open checkpoint '{}': {}", path, std::strerror(e)), path, e);
  }

  auto add_all_tensors = [&ck](size_t shard) {
    const auto& f = ck.shards_[shard];
    for (size_t i = 0; i < f->tensors().size(); ++i) {
      const std::string& name = f->tensors()[i].name;
      const auto [it, inserted] = ck.where_.emplace(name, std::make_pair(shard, i));
      if (!inserted)
        throw Error(fmt::format("checkpoint '{}': tensor '{}' appears in two shards: '{}' and '{}'", ck.path_, name,
                                ck.shards_[it->second.first]->path(), f->path()));
    }
  };

  if (S_ISDIR(st.st_mode)) {
    std::vector<std::string> files;
    DIR* d = ::opendir(path.c_str());
    if (!d) {
      const int e = errno;
      throw IoError(fmt::format("cannot list checkpoint directory '{}': {}", path, std::strerror(e)), path, e);
    }
    while (const dirent* ent = ::readdir(d)) {
      const std::string name = ent->d_name;
      if (name.empty() || name[0] == '.' || !ends_with(name, ".safetensors")) continue;
      struct stat fst {};
      if (::stat(join_path(path, name).c_str(), &fst) == 0 && S_ISREG(fst.st_mode)) files.push_back(name);
    }
    ::closedir(d);
    if (files.empty()) throw Error(fmt::format("checkpoint directory '{}' holds no *.safetensors files", path));
    std::sort(files.begin(), files.end());
    for (const auto& name : files) {
      ck.shards_.push_back(SafetensorsFile::open(join_path(path, name)));
      add_all_tensors(ck.shards_.size() - 1);
    }
    ck.metadata_ = ck.shards_[0]->metadata();
  } else if (ends_with(path, ".json")) {
    const std::string what = fmt::format("checkpoint index '{}'", path);
    const std::string text = read_small_file(path, kMaxIndexBytes, what);
    const json root = io::parse_json_strict(text, what);
    if (!root.is_object()) throw Error(fmt::format("{}: must be a JSON object, got {}", what, root.type_name()));
    const auto wm = root.find("weight_map");
    if (wm == root.end()) throw Error(fmt::format("{}: missing \"weight_map\"", what));
    if (!wm->is_object())
      throw Error(fmt::format("{}: \"weight_map\" must be an object name → shard file, got {}", what, wm->type_name()));
    const std::string dir = dir_of(path);
    std::map<std::string, size_t> shard_of_file;
    for (const auto& [name, file] : wm->items()) {
      if (!file.is_string())
        throw Error(fmt::format("{}: weight_map entry '{}' must be a shard file name (string), got {}", what, name,
                                file.type_name()));
      const std::string& rel = file.get_ref<const std::string&>();
      if (!is_safe_relative(rel))
        throw Error(fmt::format("{}: weight_map entry '{}': shard '{}' must be a relative path inside the index "
                                "directory",
                                what, name, rel));
      auto it = shard_of_file.find(rel);
      if (it == shard_of_file.end()) {
        const std::string shard_path = join_path(dir, rel);
        struct stat sst {};
        if (::stat(shard_path.c_str(), &sst) != 0)
          throw IoError(fmt::format("{}: shard file '{}' (for tensor '{}') is missing", what, shard_path, name),
                        shard_path, errno);
        ck.shards_.push_back(SafetensorsFile::open(shard_path));
        it = shard_of_file.emplace(rel, ck.shards_.size() - 1).first;
      }
      const auto& shard = ck.shards_[it->second];
      const TensorInfo* info = shard->find(name);
      if (!info)
        throw Error(fmt::format("{}: tensor '{}' is listed in weight_map but missing from its shard '{}'", what, name,
                                shard->path()));
      ck.where_.emplace(name, std::make_pair(it->second, size_t(info - shard->tensors().data())));
    }
    if (!ck.shards_.empty()) ck.metadata_ = ck.shards_[0]->metadata();
    const auto md = root.find("metadata");
    if (md != root.end() && !md->is_object())
      throw Error(fmt::format("{}: \"metadata\" must be an object, got {}", what, md->type_name()));
    if (md != root.end()) {
      // Index metadata commonly holds numbers (total_size): scalars are kept as their JSON text.
      for (const auto& [k, v] : md->items()) {
        if (v.is_string()) ck.metadata_[k] = v.get<std::string>();
        else if (v.is_number() || v.is_boolean()) ck.metadata_[k] = v.dump();
      }
    }
  } else {
    ck.shards_.push_back(SafetensorsFile::open(path));
    add_all_tensors(0);
    ck.metadata_ = ck.shards_[0]->metadata();
  }

  ck.names_.reserve(ck.where_.size());
  for (const auto& [name, loc] : ck.where_) ck.names_.push_back(name);  // std::map: already sorted
  return ck;
}

bool Checkpoint::contains(std::string_view name) const { return where_.find(name) != where_.end(); }

const TensorInfo& Checkpoint::info(std::string_view name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) throw Error(fmt::format("checkpoint '{}': no tensor named '{}'", path_, name));
  return shards_[it->second.first]->tensors()[it->second.second];
}

Tensor Checkpoint::get(std::string_view name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) throw Error(fmt::format("checkpoint '{}': no tensor named '{}'", path_, name));
  return shards_[it->second.first]->get(name);
}

const std::string& Checkpoint::file_of(std::string_view name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) throw Error(fmt::format("checkpoint '{}': no tensor named '{}'", path_, name));
  return shards_[it->second.first]->path();
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t total = 0;
  for (const auto& [name, loc] : where_) total += shards_[loc.first]->tensors()[loc.second].nbytes();
  return total;
}

}  // namespace nibble
