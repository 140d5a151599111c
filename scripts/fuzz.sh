#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) in build-fuzz and runs each one for
# FUZZ_SECONDS (default 300) on a seed corpus of valid small files.
#
#   FUZZ_SECONDS=600 make fuzz            # longer run
#   FUZZ_TARGETS=fuzz_safetensors make fuzz
#   FUZZ_JOBS=2 make fuzz                  # parallel fuzzing processes per target (default 1)
#   FUZZ_FORK=1 make fuzz                  # keep going after a crash (libFuzzer -fork mode), so one
#                                          # known finding does not hide the next ones
#
# The corpus grows in build-fuzz/fuzz/corpus/<target> across runs; crashes, leaks and timeouts are
# written to build-fuzz/fuzz/artifacts/<target>/ and make the script fail. To replay one:
#   build-fuzz/fuzz/fuzz_safetensors build-fuzz/fuzz/artifacts/fuzz_safetensors/crash-<sha>
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_FUZZ=${BUILD_FUZZ:-build-fuzz}
FUZZ_SECONDS=${FUZZ_SECONDS:-300}
FUZZ_JOBS=${FUZZ_JOBS:-1}
CC_FUZZ=${CC_FUZZ:-clang-14}
CXX_FUZZ=${CXX_FUZZ:-clang++-14}

# clang-14 and its libFuzzer/sanitizer runtimes (Debian 12: clang-14, libclang-rt-14-dev).
if ! command -v "$CXX_FUZZ" >/dev/null || ! ls /usr/lib/llvm-14/lib/clang/14*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  if [ "$CXX_FUZZ" = clang++-14 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "fuzz: installing clang-14 libclang-rt-14-dev"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang-14 libclang-rt-14-dev >/dev/null
  fi
  command -v "$CXX_FUZZ" >/dev/null || { echo "fuzz: $CXX_FUZZ not found (apt-get install clang-14 libclang-rt-14-dev)"; exit 1; }
fi

CC=$CC_FUZZ CXX=$CXX_FUZZ cmake -S . -B "$BUILD_FUZZ" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DNIBBLE_BUILD_FUZZ=ON -DNIBBLE_BUILD_TESTS=OFF -DNIBBLE_BUILD_BENCH=OFF >/dev/null

available=(fuzz_safetensors)
[ -f src/formats/config.cpp ] && available+=(fuzz_quant_config fuzz_dequantize)
read -r -a targets <<< "${FUZZ_TARGETS:-${available[*]}}"
cmake --build "$BUILD_FUZZ" -j "$(nproc)" --target fuzz_make_seeds "${targets[@]}"

out="$BUILD_FUZZ/fuzz"
mkdir -p "$out/seeds/fuzz_safetensors" "$out/seeds/fuzz_quant_config" "$out/seeds/fuzz_dequantize"
"$out/fuzz_make_seeds" "$out/seeds/fuzz_safetensors" "$out/seeds/fuzz_quant_config" "$out/seeds/fuzz_dequantize"

status=0
for t in "${targets[@]}"; do
  case "$t" in
    fuzz_safetensors) dict=fuzz/safetensors.dict; maxlen=16384 ;;
    fuzz_quant_config) dict=fuzz/quant_config.dict; maxlen=4096 ;;
    fuzz_dequantize) dict=fuzz/dequantize.dict; maxlen=131072 ;;
    *) echo "fuzz: unknown target $t"; exit 1 ;;
  esac
  corpus="$out/corpus/$t"; artifacts="$out/artifacts/$t"; log="$out/$t.log"
  mkdir -p "$corpus" "$artifacts"
  echo "fuzz: $t for ${FUZZ_SECONDS}s (log: $log)"
  jobargs=()
  if [ "${FUZZ_FORK:-0}" != 0 ]; then
    jobargs=(-fork="$FUZZ_JOBS" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
  elif [ "$FUZZ_JOBS" -gt 1 ]; then
    jobargs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
  fi
  set +e
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$out/$t" "$corpus" "$out/seeds/$t" -dict="$dict" -max_len=$maxlen -timeout=10 -rss_limit_mb=2048 \
      -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 -artifact_prefix="$artifacts/" "${jobargs[@]}" \
      >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -h "stat::number_of_executed_units" "$log" "$out"/fuzz-*.log 2>/dev/null | awk '{s+=$2} END {print s+0}' || true)
  if [ "${FUZZ_FORK:-0}" != 0 ]; then  # fork mode reports "#<execs>: cov: ..." lines instead
    execs=$(grep -Eo "^#[0-9]+:" "$log" | tail -1 | tr -d '#:' || true)
  fi
  cov=$(grep -Eo "cov: [0-9]+" "$log" | tail -1 || true)
  found=$(find "$artifacts" -type f | wc -l || true)
  echo "fuzz: $t: exit $rc, $execs executions, ${cov:-cov: ?}, corpus $(ls "$corpus" | wc -l) files, $found artifact(s)"
  if [ "$rc" -ne 0 ] || [ "$found" -ne 0 ]; then
    status=1
    tail -n 40 "$log"
  fi
done
exit $status
