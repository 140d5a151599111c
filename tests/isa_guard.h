// tests/isa_guard.h — restores the active ISA level when a test that sweeps the levels ends (also on
// a failed assertion, which returns early).
#pragma once
#include "nibble/isa.h"

namespace nibble {
struct IsaGuard {
  Isa saved = active_isa();
  IsaGuard() = default;
  IsaGuard(const IsaGuard&) = delete;
  IsaGuard& operator=(const IsaGuard&) = delete;
  ~IsaGuard() { set_isa(saved); }
};
}  // namespace nibble
