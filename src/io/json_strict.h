// Strict JSON parsing for checkpoint headers and index files.
//
// nlohmann's plain parse() silently keeps the last of two duplicate keys, so a header could say
// two different things about one tensor. Here one SAX pass builds the DOM (by forwarding to
// nlohmann's own DOM builder) while rejecting duplicate keys and capping the nesting depth (a
// valid safetensors header is 3 levels deep; the cap keeps hostile inputs from building deep
// trees). UTF-8 is validated separately first, so that error names the byte offset.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace nibble::io {

// Offset of the first byte that does not start a well-formed UTF-8 sequence (overlong forms,
// surrogates and code points past U+10FFFF are ill-formed), or std::string_view::npos.
size_t find_invalid_utf8(std::string_view s);
inline bool is_valid_utf8(std::string_view s) { return find_invalid_utf8(s) == std::string_view::npos; }

// Parses `text`; errors are nibble::Error("<what>: ..."). `what` names the file.
nlohmann::json parse_json_strict(std::string_view text, const std::string& what, int max_depth = 32);

// JSON string literal (with quotes) for UTF-8 text `s`; escapes quote, backslash and control bytes.
std::string json_quote(std::string_view s);

}  // namespace nibble::io
