#!/usr/bin/env bash
# Opt-in (`make test-kitchen`): installs torch and comfy-kitchen from PyPI into their own venv
# (.venv-kitchen, or $NIBBLE_KITCHEN_VENV; large: torch's PyPI wheel pulls the CUDA runtime), builds
# nibble into it, and runs python/tests/test_kitchen.py: the same random cases through
# comfy-kitchen's eager backend and nibble (registered as a kitchen backend by nibble.kitchen).
# With --bench-peers (`make bench-torch`) it runs scripts/bench_torch_peers.py in that venv instead.
set -euo pipefail
MODE=test
if [ "${1:-}" = "--bench-peers" ]; then MODE=bench; shift; fi
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${NIBBLE_KITCHEN_VENV:-$ROOT/.venv-kitchen}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "test_kitchen: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, comfy_kitchen, numpy, ml_dtypes, pytest, nanobind, scikit_build_core" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU-only wheel index is tried first (much smaller); plain PyPI otherwise.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "test_kitchen: installing torch (CPU index, else PyPI: large download)"
    "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "$VENV/bin/python" -m pip install -q torch
  fi
  echo "test_kitchen: installing comfy-kitchen numpy ml_dtypes pytest safetensors nanobind scikit-build-core"
  "$VENV/bin/python" -m pip install -q comfy-kitchen numpy ml_dtypes pytest safetensors nanobind scikit-build-core
fi
EXTRA=()
BUILD_DIR="$ROOT/build-python-kitchen"
if [ -n "${NIBBLE_ROOT:-}" ]; then  # build against another copy of the C++ sources
  EXTRA=(-C "cmake.define.NIBBLE_ROOT=$NIBBLE_ROOT")
  BUILD_DIR="$ROOT/build-python-kitchen-alt"
fi
LIB=${NIBBLE_LIBRARY:-}
if [ -z "$LIB" ] && [ -n "${MAKELEVEL:-}" ] && [ -f "$ROOT/${BUILD:-build}/libnibble.a" ]; then
  LIB="$ROOT/${BUILD:-build}/libnibble.a"   # `make test-kitchen` built it (target depends on build)
fi
if [ -n "$LIB" ]; then  # link an already built libnibble.a of the same tree
  EXTRA+=(-C "cmake.define.NIBBLE_LIBRARY=$LIB")
  BUILD_DIR="$BUILD_DIR-prebuilt"
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall \
  -C build-dir="$BUILD_DIR" "${EXTRA[@]}" ./python
"$VENV/bin/python" -c "import torch, comfy_kitchen; print('test_kitchen: torch', torch.__version__, '| comfy-kitchen', getattr(comfy_kitchen, '__version__', '?'))"
if [ "$MODE" = bench ]; then
  exec "$VENV/bin/python" scripts/bench_torch_peers.py "$@"
fi
cd python/tests
"$VENV/bin/python" -m pytest -q -s -p no:cacheprovider test_kitchen.py
