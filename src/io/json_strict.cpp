// Strict JSON: UTF-8 check, duplicate-key-rejecting SAX → DOM, string quoting for the writers.
#include "io/json_strict.h"

#include <fmt/format.h>

#include <unordered_set>
#include <vector>

#include "nibble/error.h"

namespace nibble::io {

size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) { ++i; continue; }
    size_t len;
    uint32_t cp, min_cp;
    if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; min_cp = 0x80; }
    else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; min_cp = 0x800; }
    else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; min_cp = 0x10000; }
    else return i;  // continuation byte or 0xf8..0xff as a lead byte
    if (n - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if (cp < min_cp || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += len;
  }
  return std::string_view::npos;
}

namespace {
using json = nlohmann::json;

// Forwards every event to nlohmann's DOM builder after checking keys and depth.
class StrictSax {
 public:
  StrictSax(json& root, const std::string& what, int max_depth)
      : dom_(root, /*allow_exceptions=*/false), what_(what), max_depth_(max_depth) {}

  bool null() { return dom_.null(); }
  bool boolean(bool v) { return dom_.boolean(v); }
  bool number_integer(json::number_integer_t v) { return dom_.number_integer(v); }
  bool number_unsigned(json::number_unsigned_t v) { return dom_.number_unsigned(v); }
  bool number_float(json::number_float_t v, const json::string_t& s) { return dom_.number_float(v, s); }
  bool string(json::string_t& v) { return dom_.string(v); }
  bool binary(json::binary_t& v) { return dom_.binary(v); }
  bool start_object(std::size_t n) {
    push();
    keys_.emplace_back();
    is_object_.push_back(true);
    return dom_.start_object(n);
  }
  bool key(json::string_t& k) {
    if (!keys_.back().insert(k).second) {
      std::string where;  // e.g. `object "w" of ` for a key inside a tensor entry
      for (size_t i = 1; i < path_.size(); ++i) where += (i > 1 ? "/" : "") + path_[i];
      if (!where.empty()) where = "object " + where + " of ";
      throw Error(fmt::format("{}: duplicate key \"{}\" in {}the header JSON (each key may appear only once)",
                              what_, k, where));
    }
    last_key_ = k;
    return dom_.key(k);
  }
  bool end_object() {
    keys_.pop_back();
    is_object_.pop_back();
    pop();
    return dom_.end_object();
  }
  bool start_array(std::size_t n) {
    push();
    is_object_.push_back(false);
    return dom_.start_array(n);
  }
  bool end_array() {
    is_object_.pop_back();
    pop();
    return dom_.end_array();
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) {
    // ex.what() reads "[json.exception.parse_error.101] parse error at line 1, column 7: ..."
    std::string msg = ex.what();
    const auto pos = msg.find("] ");
    if (pos != std::string::npos) msg = msg.substr(pos + 2);
    throw Error(fmt::format("{}: malformed header JSON: {}", what_, msg));
  }

 private:
  void push() {
    if (int(is_object_.size()) >= max_depth_)
      throw Error(fmt::format("{}: header JSON nests deeper than {} levels", what_, max_depth_));
    // remember which key we descended through (for duplicate-key messages)
    if (!is_object_.empty() && is_object_.back()) path_.push_back("\"" + last_key_ + "\"");
    else path_.push_back("[]");
  }
  void pop() { path_.pop_back(); }

  nlohmann::detail::json_sax_dom_parser<json> dom_;
  const std::string& what_;
  int max_depth_;
  std::vector<std::unordered_set<std::string>> keys_;
  std::vector<bool> is_object_;
  std::vector<std::string> path_;
  std::string last_key_;
};
}  // namespace

nlohmann::json parse_json_strict(std::string_view text, const std::string& what, int max_depth) {
  const size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos)
    throw Error(fmt::format("{}: header JSON is not valid UTF-8 (ill-formed byte 0x{:02x} at offset {} of the header)",
                            what, static_cast<unsigned char>(text[bad]), bad));
  json root;
  StrictSax sax(root, what, max_depth);
  const bool ok = json::sax_parse(text.begin(), text.end(), &sax, json::input_format_t::json, /*strict=*/true);
  if (!ok || root.is_discarded()) throw Error(fmt::format("{}: malformed header JSON", what));
  return root;
}

std::string json_quote(std::string_view s) {
  std::string r;
  r.reserve(s.size() + 2);
  r += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': r += "\\\""; break;
      case '\\': r += "\\\\"; break;
      case '\n': r += "\\n"; break;
      case '\t': r += "\\t"; break;
      case '\r': r += "\\r"; break;
      default:
        if (c < 0x20) r += fmt::format("\\u{:04x}", c);
        else r += ch;
    }
  }
  r += '"';
  return r;
}

}  // namespace nibble::io
