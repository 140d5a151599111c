// Runtime ISA detection and the NIBBLE_ISA override.
#include "nibble/isa.h"

#include <atomic>
#include <cstdlib>
#include <fmt/format.h>

#include "nibble/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace nibble {

namespace {
constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512vnni", "avx512bf16"};

bool built(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
#ifdef NIBBLE_HAVE_AVX2
    case Isa::Avx2: return true;
#endif
#ifdef NIBBLE_HAVE_AVX512
    case Isa::Avx512: case Isa::Avx512Vnni: case Isa::Avx512Bf16: return true;
#endif
    default: return false;
  }
}

#if defined(__x86_64__) || defined(__i386__)
// F16C (CPUID.1:ECX[29]) and BMI2 (CPUID.(7,0):EBX[8]) straight from CPUID: clang's
// __builtin_cpu_supports does not know "f16c".
bool has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
bool has_bmi2() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & bit_BMI2);
}
#endif

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // Every feature the AVX2 files are compiled with (-mavx2 -mfma -mf16c -mbmi2, CMakeLists.txt): a
  // CPU without one of them would fault on the first instruction the compiler picked from it.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    has_f16c() && has_bmi2();
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  const bool bf16 = vnni && __builtin_cpu_supports("avx512bf16");
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return avx2;
    case Isa::Avx512: return avx512;
    case Isa::Avx512Vnni: return vnni;
    case Isa::Avx512Bf16: return bf16;
  }
  return false;
#else
  return isa == Isa::Scalar;
#endif
}

std::string supported_list() {
  std::string r;
  for (Isa i : supported_isas()) r += (r.empty() ? "" : "|") + std::string(isa_name(i));
  return r;
}

Isa initial_isa() {
  Isa best = detected_isa();
  if (const char* env = std::getenv("NIBBLE_ISA"); env && *env) {
    Isa want;
    if (!parse_isa(env, &want))
      throw Error(fmt::format("NIBBLE_ISA={}: unknown ISA; supported here: auto|{}", env, supported_list()));
    if (!isa_supported(want))
      throw Error(fmt::format("NIBBLE_ISA={}: not supported by this CPU/build; supported here: {}", env,
                              supported_list()));
    best = want;
  }
  return best;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{int(initial_isa())};
  return slot;
}
}  // namespace

const char* isa_name(Isa isa) { return kNames[int(isa)]; }

bool parse_isa(std::string_view s, Isa* out) {
  if (s == "auto") { *out = detected_isa(); return true; }
  for (int i = 0; i < 5; ++i)
    if (s == kNames[i]) { *out = Isa(i); return true; }
  return false;
}

bool isa_supported(Isa isa) { return built(isa) && cpu_has(isa); }

Isa detected_isa() {
  Isa best = Isa::Scalar;
  for (int i = 0; i < 5; ++i)
    if (isa_supported(Isa(i))) best = Isa(i);
  return best;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> r;
  for (int i = 0; i < 5; ++i)
    if (isa_supported(Isa(i))) r.push_back(Isa(i));
  return r;
}

Isa active_isa() { return Isa(active_slot().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (!isa_supported(isa))
    throw Error(fmt::format("ISA {} is not supported by this CPU/build; supported here: {}", isa_name(isa),
                            supported_list()));
  active_slot().store(int(isa), std::memory_order_relaxed);
}

std::string compiled_isas_string() {
  std::string r;
  for (int i = 0; i < 5; ++i)
    if (built(Isa(i))) r += (r.empty() ? "" : " ") + std::string(kNames[i]);
  return r;
}

std::string cpu_features_string() {
  std::string r;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define NIBBLE_FEAT(f) if (__builtin_cpu_supports(f)) r += (r.empty() ? "" : " ") + std::string(f);
  NIBBLE_FEAT("avx2") NIBBLE_FEAT("fma")
  if (has_f16c()) r += (r.empty() ? "" : " ") + std::string("f16c");
  if (has_bmi2()) r += (r.empty() ? "" : " ") + std::string("bmi2");
  NIBBLE_FEAT("avx512f") NIBBLE_FEAT("avx512bw")
  NIBBLE_FEAT("avx512vl") NIBBLE_FEAT("avx512dq") NIBBLE_FEAT("avx512vnni") NIBBLE_FEAT("avx512bf16")
#undef NIBBLE_FEAT
#endif
  return r.empty() ? "none" : r;
}

}  // namespace nibble
