// Benchmark records and their printing (see devtools/bench_records.h).
#include "devtools/bench_records.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "nibble/error.h"

namespace nibble::bench {
namespace {
std::string json_escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    switch (c) {
      case '"': r += "\\\""; break;
      case '\\': r += "\\\\"; break;
      case '\n': r += "\\n"; break;
      case '\t': r += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) r += fmt::format("\\u{:04x}", int(c));
        else r += c;
    }
  }
  return r;
}
std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return fmt::format("{}", int64_t(v));
  return fmt::format("{:.6g}", v);
}
}  // namespace

std::string records_to_json(const std::vector<Record>& records) {
  std::string out = "[";
  for (size_t i = 0; i < records.size(); ++i) {
    out += i ? ",\n {" : "\n {";
    bool first = true;
    for (auto& [k, v] : records[i].text) {
      out += fmt::format("{}\"{}\": \"{}\"", first ? "" : ", ", json_escape(k), json_escape(v));
      first = false;
    }
    for (auto& [k, v] : records[i].num) {
      out += fmt::format("{}\"{}\": {}", first ? "" : ", ", json_escape(k), json_number(v));
      first = false;
    }
    out += "}";
  }
  out += records.empty() ? "]\n" : "\n]\n";
  return out;
}

std::string records_to_table(const std::vector<Record>& records, const std::vector<std::string>& columns,
                             int precision) {
  std::vector<std::vector<std::string>> cells;
  cells.push_back(columns);
  for (auto& r : records) {
    std::vector<std::string> row;
    for (auto& c : columns) {
      std::string v = "-";
      for (auto& [k, s] : r.text)
        if (k == c) v = s;
      for (auto& [k, x] : r.num)
        if (k == c) {
          if (!std::isfinite(x)) v = "-";
          else if (x == std::floor(x) && std::fabs(x) < 1e12) v = fmt::format("{}", int64_t(x));
          else v = fmt::format("{:.{}f}", x, precision);
        }
      row.push_back(v);
    }
    cells.push_back(std::move(row));
  }
  std::vector<size_t> w(columns.size(), 0);
  for (auto& row : cells)
    for (size_t j = 0; j < row.size(); ++j) w[j] = std::max(w[j], row[j].size());
  std::string out;
  for (size_t i = 0; i < cells.size(); ++i) {
    for (size_t j = 0; j < cells[i].size(); ++j)
      out += fmt::format("{:>{}}{}", cells[i][j], w[j], j + 1 < w.size() ? "  " : "\n");
    if (i == 0)
      for (size_t j = 0; j < w.size(); ++j) out += std::string(w[j], '-') + (j + 1 < w.size() ? "  " : "\n");
  }
  return out;
}

std::vector<Shape3> parse_shapes(const std::string& s, const std::string& what) {
  std::vector<Shape3> r;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ';')) {
    if (item.empty()) continue;
    Shape3 sh{};
    int used = 0;
    if (std::sscanf(item.c_str(), "%ld,%ld,%ld%n", &sh.M, &sh.K, &sh.N, &used) != 3 || size_t(used) != item.size() ||
        sh.M < 1 || sh.K < 64 || sh.K % 64 != 0 || sh.N < 1)
      throw Error(fmt::format("{}: --shapes item '{}': expected M,K,N with K a multiple of 64 (items separated by ';')",
                              what, item));
    r.push_back(sh);
  }
  return r;
}

}  // namespace nibble::bench
