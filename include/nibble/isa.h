// nibble/isa.h — runtime ISA selection (one dispatch path enum for the whole library).
//
// Levels are ordered: a CPU at level L can run every kernel built for a level <= L.
//   scalar      plain C++ (the reference oracles; always built)
//   avx2        AVX2 + FMA + F16C + BMI2 (every flag the AVX2 files are compiled with)
//   avx512      AVX-512 F/BW/VL/DQ
//   avx512vnni  + AVX-512 VNNI (vpdpbusd)
//   avx512bf16  + AVX-512 BF16 (vdpbf16ps) — Zen 4, Sapphire Rapids
// The active level is chosen once from CPUID (`__builtin_cpu_supports`), capped by the env var
// NIBBLE_ISA (an unknown or unsupported value is an error naming the supported ones), and can be
// changed by set_isa() (tests use it to run every path). Kernels for levels that were not compiled
// are never selected: supported_isas() only lists levels that are both built and runnable.
//
// Thread safety: The queries are safe from any thread. active_isa() is an atomic load and
// set_isa() an atomic store; an op reads the ISA while it runs, so change it only while no op is
// running (tests switch it between cases).
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace nibble {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3, Avx512Bf16 = 4 };

const char* isa_name(Isa isa);                 // "scalar", "avx2", ...
bool parse_isa(std::string_view s, Isa* out);  // accepts the names above and "auto"=detected
Isa detected_isa();                            // best level both built and supported by the CPU
Isa active_isa();                              // what kernels use now
void set_isa(Isa isa);                         // throws nibble::Error if not supported/built
bool isa_supported(Isa isa);                   // built and runnable here
std::vector<Isa> supported_isas();             // ascending
std::string compiled_isas_string();            // "scalar avx2 avx512 ..."
std::string cpu_features_string();             // "avx2 fma f16c avx512f ... (detected)"

}  // namespace nibble
