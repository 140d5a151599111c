#!/usr/bin/env bash
# Opt-in (`make golden-comfyui COMFYUI_DIR=...`): regenerates tests/data/qwen_image_golden*.safetensors
# by running ComfyUI's own QwenImageTransformer2DModel (scripts/golden_comfyui.py). Needs a ComfyUI
# checkout (python files are enough) and a venv with what its model imports need: torch, numpy,
# safetensors, einops, pillow, psutil, scipy, tqdm, pyyaml, comfy-kitchen, comfy-aimdo. The venv is
# $NIBBLE_GOLDEN_VENV or .venv-golden (created here); TORCH_SITE=<site-packages of an existing torch
# venv> reuses its torch instead of downloading one (PyPI's torch wheel is large).
set -euo pipefail
cd "$(dirname "$0")/.."
COMFYUI_DIR=${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI checkout}
VENV=${NIBBLE_GOLDEN_VENV:-$PWD/.venv-golden}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "golden-comfyui: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ -n "${TORCH_SITE:-}" ]; then
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$TORCH_SITE" > "$SITE/torch_site.pth"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "golden-comfyui: installing torch (CPU index, else PyPI: large download)"
  "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q torch
fi
if ! "$VENV/bin/python" -c "import numpy, safetensors, einops, PIL, psutil, scipy, tqdm, yaml, comfy_kitchen, comfy_aimdo" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q numpy safetensors einops pillow psutil scipy tqdm pyyaml comfy-kitchen comfy-aimdo
fi
"$VENV/bin/python" scripts/golden_comfyui.py "$COMFYUI_DIR" tests/data
ls -l tests/data/qwen_image_golden*.safetensors
