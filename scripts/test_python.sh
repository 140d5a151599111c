#!/usr/bin/env bash
# Builds the nibble Python module into a virtual environment and runs its pytest suite
# (called by `make test`). The venv (.venv, or $NIBBLE_VENV) and the CMake build directory
# (build-python/) are reused, so repeat runs only rebuild what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${NIBBLE_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
DEPS=(numpy ml_dtypes pytest safetensors nanobind scikit-build-core)

if [ ! -x "$VENV/bin/python" ]; then
  echo "test_python: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import numpy, ml_dtypes, pytest, safetensors, nanobind, scikit_build_core" 2>/dev/null; then
  echo "test_python: installing ${DEPS[*]} (PyPI)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${DEPS[@]}"
fi
# No build isolation: the build requirements are already in the venv (no download per run), and
# the build directory survives between runs. NIBBLE_ROOT=<tree> builds against another copy of
# the C++ sources (e.g. a `git archive` of HEAD), in its own build directory.
EXTRA=()
BUILD_DIR="$ROOT/build-python"
if [ -n "${NIBBLE_ROOT:-}" ]; then
  EXTRA=(-C "cmake.define.NIBBLE_ROOT=$NIBBLE_ROOT")
  BUILD_DIR="$ROOT/build-python-alt"
elif [ -n "${MAKELEVEL:-}" ] && [ -f "$ROOT/${BUILD:-build}/libnibble.a" ]; then
  # Under `make test` the C++ build has just produced libnibble.a from this tree: link it
  # instead of compiling the library a second time.
  EXTRA=(-C "cmake.define.NIBBLE_LIBRARY=$ROOT/${BUILD:-build}/libnibble.a")
  BUILD_DIR="$ROOT/build-python-prebuilt"
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall \
  -C build-dir="$BUILD_DIR" "${EXTRA[@]}" ./python
cd python/tests  # not the repo root: `import nibble` must find the installed package
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider .
