#!/usr/bin/env bash
# `make quality-convert`: converter quality on real weights (the BERT encoder shipped in the PyPI
# package rxnfp) with activations from real inputs — legacy vs current searches, svdquant r32 and
# awq. Needs torch, numpy, safetensors: QUALITY_VENV (default .venv-quality, created and filled
# from PyPI when missing; e.g. QUALITY_VENV=/work/.venv-torch reuses an existing one).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${QUALITY_VENV:-$ROOT/.venv-quality}
BUILD=${BUILD:-build}
if ! "$VENV/bin/python" -c "import torch, numpy, safetensors" 2>/dev/null; then
  echo "quality-convert: creating $VENV (torch, numpy, safetensors from PyPI)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch numpy safetensors
fi
exec "$VENV/bin/python" scripts/quality_convert.py "$ROOT/$BUILD/nibble" "$ROOT/$BUILD/quality-convert"
