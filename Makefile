# Thin front for CMake/Ninja. The two commands of the README: `make demo` and `make test`.
BUILD      ?= build
BUILD_ASAN ?= build-asan
BUILD_TSAN ?= build-tsan
BUILD_NOAVX512 ?= build-noavx512
BUILD_SCALAR ?= build-scalar
JOBS       ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all setup configure build test test-slow test-asan test-tsan test-isa test-noavx512 test-scalar-build test-isa-builds demo bench fuzz clean test-kitchen bench-torch quality-convert golden-comfyui fixtures-import test-comfyui test-tsan-pool psnr-full

all: build

setup:
	@bash scripts/setup.sh

$(BUILD)/build.ninja: | setup
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null

configure: setup $(BUILD)/build.ninja

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

# Fast tests only (ctest label "fast"); slow ones: `make test-slow`. --no-tests=error: a label
# that selects nothing is a failure, not a pass.
test: build
	@cd $(BUILD) && ctest -L fast --no-tests=error --output-on-failure -j $(JOBS) --timeout 900
	@if [ -f scripts/test_python.sh ]; then bash scripts/test_python.sh; fi

test-slow: build
	@cd $(BUILD) && ctest -L slow --no-tests=error --output-on-failure --timeout 3600

test-asan: setup
	@cmake -S . -B $(BUILD_ASAN) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNIBBLE_SANITIZE=ON -DNIBBLE_BUILD_BENCH=OFF >/dev/null
	@cmake --build $(BUILD_ASAN) -j $(JOBS)
	@cd $(BUILD_ASAN) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest -L fast --no-tests=error --output-on-failure -j $(JOBS) --timeout 1800

# The pool alone under TSan (seconds to build: tests/tsan/pool_stress.cpp + src/core/thread_pool.cpp).
test-tsan-pool:
	@mkdir -p $(BUILD_TSAN)
	@$(CXX) -std=c++20 -O1 -g -fsanitize=thread -Iinclude -Isrc tests/tsan/pool_stress.cpp src/core/thread_pool.cpp \
	  $$(pkg-config --libs fmt 2>/dev/null || echo -lfmt) -o $(BUILD_TSAN)/pool_stress
	@TSAN_OPTIONS="halt_on_error=1" ./$(BUILD_TSAN)/pool_stress

# ThreadSanitizer: the pool under concurrent callers and resizes (tests/test_threads.cpp), the pool's
# own tests and the thread-count tests of every op. TSan stops at the first report.
TSAN_TESTS = test_threads test_core test_awq_w4a16 test_svdquant_w4a4 test_nn_linear_f32
test-tsan: setup
	@cmake -S . -B $(BUILD_TSAN) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNIBBLE_TSAN=ON -DNIBBLE_BUILD_BENCH=OFF $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD_TSAN) -j $(JOBS) --target $(TSAN_TESTS)
	@export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"; set -e; cd $(BUILD_TSAN)/tests; \
	  ./test_threads; \
	  ./test_core --gtest_filter='ThreadPool.*'; \
	  ./test_awq_w4a16 --gtest_filter='*ThreadCount*'; \
	  ./test_svdquant_w4a4 --gtest_filter='*ThreadCount*'; \
	  ./test_nn_linear_f32 --gtest_filter='*ThreadCount*'

# The tests that do not sweep set_isa themselves (layers, model, block, plans, threads), rerun with
# the ISA forced to AVX2 and then scalar (the kernel test files already run every supported ISA).
ISA_TESTS = test_nn_quantized test_nn_model test_block_qwen_image test_kernel_plan test_threads
test-isa: build
	@cmake --build $(BUILD) -j $(JOBS) --target $(ISA_TESTS)
	@set -e; cd $(BUILD)/tests; for isa in avx2 scalar; do \
	  echo "test-isa: NIBBLE_ISA=$$isa"; \
	  for t in $(ISA_TESTS); do NIBBLE_ISA=$$isa ./$$t --gtest_brief=1; done; done

# Builds CI does not otherwise try. test-noavx512: the library, CLI and kernel tests without the
# AVX-512 kernels (AVX2 + scalar; it used to fail to link); test-scalar-build: no ISA kernels at all.
# test-isa-builds: both, with every fast test.
KERNEL_TESTS = test_kernel_plan test_awq_w4a16 test_svdquant_w4a4 test_nn_linear_f32 test_cli
define isa_build
	@cmake -S . -B $(1) -G Ninja -DCMAKE_BUILD_TYPE=Release $(2) -DNIBBLE_BUILD_BENCH=OFF $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(1) -j $(JOBS) --target nibble_cli $(3)
endef
test-noavx512: setup
	$(call isa_build,$(BUILD_NOAVX512),-DNIBBLE_BUILD_AVX512=OFF,$(KERNEL_TESTS))
	@set -e; cd $(BUILD_NOAVX512)/tests; for t in $(KERNEL_TESTS); do ./$$t --gtest_brief=1; done
test-scalar-build: setup
	$(call isa_build,$(BUILD_SCALAR),-DNIBBLE_BUILD_AVX2=OFF,$(KERNEL_TESTS))
	@set -e; cd $(BUILD_SCALAR)/tests; for t in $(KERNEL_TESTS); do ./$$t --gtest_brief=1; done
test-isa-builds: setup
	$(call isa_build,$(BUILD_NOAVX512),-DNIBBLE_BUILD_AVX512=OFF,)
	@cmake --build $(BUILD_NOAVX512) -j $(JOBS)
	@cd $(BUILD_NOAVX512) && ctest -L fast --no-tests=error --output-on-failure -j $(JOBS) --timeout 900
	$(call isa_build,$(BUILD_SCALAR),-DNIBBLE_BUILD_AVX2=OFF,)
	@cmake --build $(BUILD_SCALAR) -j $(JOBS)
	@cd $(BUILD_SCALAR) && ctest -L fast --no-tests=error --output-on-failure -j $(JOBS) --timeout 900

demo: build
	@./$(BUILD)/nibble demo

bench: build
	@./$(BUILD)/nibble bench

# Full-depth PSNR (issue 11): 60 true-width blocks (4 distinct converted blocks, cycled), 256 image
# + 32 text tokens, 8 steps, CFG 2.5, vs --baseline dequantized (tests/test_slow_model_psnr_full.cpp).
# ~12 GiB of disk in PSNR_DIR, ~16 GiB RAM, long (the baseline dequantizes every block per step).
PSNR_DIR ?= $(if $(TMPDIR),$(TMPDIR),/tmp)/nibble_psnr_full
psnr-full: configure
	@cmake --build $(BUILD) -j $(JOBS) --target test_slow_model_psnr_full
	@cd $(BUILD) && NIBBLE_PSNR_FULL=1 NIBBLE_PSNR_DIR=$(PSNR_DIR) ./tests/test_slow_model_psnr_full

# libFuzzer targets over the reader, the config parser and reader → bind → dequantize (clang-14);
# FUZZ_SECONDS per target.
fuzz: setup
	@bash scripts/fuzz.sh

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_TSAN) $(BUILD_NOAVX512) $(BUILD_SCALAR) build-fuzz

# Opt-in: nibble vs comfy-kitchen's eager backend (installs torch + comfy-kitchen from PyPI).
test-kitchen: build
	@bash scripts/test_kitchen.sh

# Opt-in: nibble through the kitchen ops vs torch bf16 F.linear, same process (torch venv as test-kitchen).
bench-torch: build
	@bash scripts/test_kitchen.sh --bench-peers $(TRIES)

# Opt-in: converter quality on real weights with real activations (legacy vs current searches;
# downloads the rxnfp wheel and, without QUALITY_VENV, torch from PyPI). Not part of `make test`.
quality-convert: build
	@bash scripts/quality_convert.sh

# Opt-in: regenerate tests/data/qwen_image_golden*.safetensors with ComfyUI's own Qwen-Image model
# (torch from PyPI in .venv-golden; TORCH_SITE=<site-packages> reuses an installed torch).
golden-comfyui:
	@COMFYUI_DIR=$(COMFYUI_DIR) bash scripts/golden_comfyui.sh

# Opt-in: regenerate tests/data/import_* with the real packers (AutoAWQ from PyPI, nunchaku's
# NunchakuWeightPacker from NUNCHAKU_DIR). TORCH_PYTHON: a python with torch, numpy, safetensors
# (default: a venv made here with pip). docs/import.md.
NUNCHAKU_DIR ?=
TORCH_PYTHON ?=
FIXTURES_VENV ?= $(BUILD)/venv-fixtures
fixtures-import:
	@test -n "$(NUNCHAKU_DIR)" || { echo "set NUNCHAKU_DIR=/path/to/nunchaku (a checkout of github.com/nunchaku-tech/nunchaku)"; exit 1; }
	@py="$(TORCH_PYTHON)"; if [ -z "$$py" ]; then \
	  [ -x $(FIXTURES_VENV)/bin/python ] || python3 -m venv $(FIXTURES_VENV); \
	  $(FIXTURES_VENV)/bin/pip install -q torch numpy safetensors; py=$(FIXTURES_VENV)/bin/python; fi; \
	  $$py -m pip install -q --no-deps --target $(BUILD)/pydeps-awq autoawq==0.2.9 && \
	  $$py scripts/fixtures_import.py --nunchaku-dir "$(NUNCHAKU_DIR)" --autoawq-dir $(BUILD)/pydeps-awq --out tests/data

# Opt-in: nibble inside a real ComfyUI checkout (COMFYUI_DIR=...; torch + comfy-kitchen from PyPI).
test-comfyui: build
	@bash scripts/test_comfyui.sh
