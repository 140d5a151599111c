// kernels/kernel_ref.h — a kernel's address for a dispatch plan, or nullptr when its ISA level was
// not compiled: the build then links without it, and active_isa() never returns such a level.
// For the op drivers (src/kernels/*.cpp) only.
#pragma once

#ifdef NIBBLE_HAVE_AVX2
#define NIBBLE_K2(f) &f
#else
#define NIBBLE_K2(f) nullptr
#endif
#ifdef NIBBLE_HAVE_AVX512
#define NIBBLE_K512(f) &f
#else
#define NIBBLE_K512(f) nullptr
#endif
