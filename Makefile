# Thin front for CMake/Ninja. The two commands of the README: `make demo` and `make test`.
BUILD      ?= build
BUILD_ASAN ?= build-asan
JOBS       ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all setup configure build test test-slow test-asan demo bench fuzz clean test-kitchen quality-convert golden-comfyui fixtures-import test-comfyui

all: build

setup:
	@bash scripts/setup.sh

$(BUILD)/build.ninja: | setup
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null

configure: setup $(BUILD)/build.ninja

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

# Fast tests only (ctest label "fast"); slow ones: `make test-slow`.
test: build
	@cd $(BUILD) && ctest -L fast --output-on-failure -j $(JOBS) --timeout 900
	@if [ -f scripts/test_python.sh ]; then bash scripts/test_python.sh; fi

test-slow: build
	@cd $(BUILD) && ctest -L slow --output-on-failure --timeout 3600

test-asan: setup
	@cmake -S . -B $(BUILD_ASAN) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNIBBLE_SANITIZE=ON -DNIBBLE_BUILD_BENCH=OFF >/dev/null
	@cmake --build $(BUILD_ASAN) -j $(JOBS)
	@cd $(BUILD_ASAN) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest -L fast --output-on-failure -j $(JOBS) --timeout 1800

demo: build
	@./$(BUILD)/nibble demo

bench: build
	@./$(BUILD)/nibble bench

# libFuzzer targets over the reader and the config parser (clang); FUZZ_SECONDS per target.
fuzz: setup
	@bash scripts/fuzz.sh

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) build-fuzz

# Opt-in: nibble vs comfy-kitchen's eager backend (installs torch + comfy-kitchen from PyPI).
test-kitchen: build
	@bash scripts/test_kitchen.sh

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
