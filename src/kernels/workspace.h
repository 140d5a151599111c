// src/kernels/workspace.h — scratch memory of the kernel drivers.
//
// Micro-kernels (the ISA files) never allocate: the drivers pass every buffer in. A driver task
// takes its scratch from the calling thread's grow-only slots here (no allocation or page faults for
// a shape the thread has seen; the STL code lives in this generic object, never in one compiled
// with ISA flags, so no AVX-512 instantiation of a shared inline can be picked by the linker).
//
// Accumulators and outputs are not initialized in production. Tests poison them instead:
// set_test_fill(NaN) makes every buffer a driver hands to a kernel (and the output block a kernel
// writes in place) start as that value, so an element a kernel skips shows up as NaN.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>

namespace nibble::kernels {

// Slots of the per-thread scratch; one buffer per slot, live until the thread's next request of it.
// KitchenX / KitchenLoraX: the SVDQuant kitchen quantize's widened x / lora_x rows, live across the
// activation stage it runs on them (which takes Stage / Shift itself).
enum class Slot : int {
  Stage = 0, Weights = 1, Acc = 2, Shift = 3, AttnK = 4, AttnV = 5, AttnBias = 6, KitchenX = 7, KitchenLoraX = 8,
  Count = 9
};

// At least `bytes` bytes, 64-byte aligned, of this thread's scratch `slot` (contents unspecified,
// or the test fill value in every float when one is set).
void* thread_scratch(Slot slot, size_t bytes);
template <class T>
static inline T* thread_scratch(Slot slot, int64_t n) {  // static: ISA files call it too (isa_local.h)
  return static_cast<T*>(thread_scratch(slot, size_t(n) * sizeof(T)));
}

// Tests only: the value new driver buffers start with (std::nullopt, the default: left as they are).
void set_test_fill(std::optional<float> v);
// Writes the fill value into p[0, n) when one is set (drivers call it on buffers they allocate
// themselves and on output blocks a kernel writes directly).
void test_fill(float* p, int64_t n);
bool test_fill_active();

}  // namespace nibble::kernels
