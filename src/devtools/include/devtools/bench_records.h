// devtools/bench_records.h — benchmark records (one row per case) printed as an aligned table or
// a JSON array, and the --shapes parser.
//
// Part of nibble_devtools (not of libnibble). Pure functions; thread-safe.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace nibble::bench {

struct Record {
  std::vector<std::pair<std::string, std::string>> text;  // key → string value (JSON string)
  std::vector<std::pair<std::string, double>> num;        // key → number (JSON number, NaN → null)
  Record& s(std::string k, std::string v) { text.emplace_back(std::move(k), std::move(v)); return *this; }
  Record& n(std::string k, double v) { num.emplace_back(std::move(k), v); return *this; }
};
// JSON array of objects (text fields first, then numbers, in insertion order).
std::string records_to_json(const std::vector<Record>& records);
// Aligned text table of the given columns (keys of either kind; missing → "-"); numbers are
// printed with `precision` decimals after the point (integers without).
std::string records_to_table(const std::vector<Record>& records, const std::vector<std::string>& columns,
                             int precision = 2);

// A benchmark shape list, "M,K,N;M,K,N;..." (--shapes); K must be a multiple of 64.
// `what` names the command in errors.
struct Shape3 { int64_t M, K, N; };
std::vector<Shape3> parse_shapes(const std::string& s, const std::string& what);

}  // namespace nibble::bench
