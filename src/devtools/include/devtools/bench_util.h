// devtools/bench_util.h — every benchmark helper of nibble_devtools, one include:
//   bench_timing.h   clocks, the shared median, interleaved timing, pool settling, load average
//   bench_memory.h   read-bandwidth probe, cache-defeating operand copies, process RSS
//   bench_peers.h    OpenBLAS (dlopen), the bf16-weight GEMV, the int8 VNNI peak
//   bench_records.h  records as a table or JSON, --shapes
//   w4a4_stages.h    the SVDQuant layer with its stages timed apart
// Benchmarks report ratios measured in one process run: the host is shared and absolute figures
// drift by 2x between runs.
#pragma once
#include "devtools/bench_memory.h"
#include "devtools/bench_peers.h"
#include "devtools/bench_records.h"
#include "devtools/bench_timing.h"
#include "devtools/w4a4_stages.h"
