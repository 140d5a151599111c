#!/usr/bin/env bash
# Opt-in (`make test-comfyui COMFYUI_DIR=/path/to/ComfyUI`): nibble inside a real ComfyUI checkout.
# Installs torch + comfy-kitchen (+ packaging, which comfy-kitchen 0.2.40 needs undeclared) and
# ComfyUI's own Python requirements from PyPI into a venv (.venv-comfyui, or $NIBBLE_COMFYUI_VENV;
# an existing venv that already has torch and comfy_kitchen is reused as is), builds nibble into
# it and runs python/tests/comfyui_e2e.py: a nibble-converted 1-block Qwen-Image checkpoint through
# comfy.sd.load_diffusion_model with the node pack of comfyui/, bf16/fp16/fp32, call counters,
# outputs vs nibble.load, block times. Work files go to $NIBBLE_COMFYUI_WORK (default
# build-comfyui/). $NIBBLE_COMFYUI_TORCH_SITE: site-packages of an existing torch venv to reuse
# (added through a .pth file instead of installing torch; here /work/.venv-torch).
# $NIBBLE_COMFYUI_ROUNDS: interleaved timing rounds per case (default 3); $NIBBLE_COMFYUI_S_IMG /
# $NIBBLE_COMFYUI_S_TXT: token counts (default 1024 / 64).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMFYUI_DIR=${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI checkout}
VENV=${NIBBLE_COMFYUI_VENV:-$ROOT/.venv-comfyui}
WORK=${NIBBLE_COMFYUI_WORK:-$ROOT/build-comfyui}
PYTHON=${PYTHON:-python3}
CLI=${NIBBLE_CLI:-$ROOT/${BUILD:-build}/nibble}
[ -x "$CLI" ] || { echo "test_comfyui: $CLI not built (make build)"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "test_comfyui: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -n "${NIBBLE_COMFYUI_TORCH_SITE:-}" ]; then
  echo "$NIBBLE_COMFYUI_TORCH_SITE" > "$SITE/zz_reused_torch.pth"
fi
if ! "$VENV/bin/python" -c "import torch, comfy_kitchen, packaging, safetensors, einops" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "test_comfyui: installing torch (CPU index, else PyPI: large download)"
    "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "$VENV/bin/python" -m pip install -q torch
  fi
  echo "test_comfyui: installing comfy-kitchen packaging and ComfyUI's requirements"
  "$VENV/bin/python" -m pip install -q comfy-kitchen packaging safetensors einops
fi
if ! "$VENV/bin/python" -c "import transformers, torchsde, scipy, yaml, PIL, av, comfy_aimdo, torchvision, torchaudio" 2>/dev/null && [ -f "$COMFYUI_DIR/requirements.txt" ]; then
  # ComfyUI's essential requirements except the front end / templates / docs packages, torch and
  # its audio/vision wheels (torch is there; they would pull another torch build) and its pinned
  # comfy-kitchen (the int4 layouts need >= 0.2.31).
  echo "test_comfyui: installing ComfyUI's requirements (without torch*, the front end, comfy-kitchen)"
  sed '/^#non essential/,$d' "$COMFYUI_DIR/requirements.txt" \
    | grep -v -E '^(torch|torchvision|torchaudio|torchsde|comfyui-|comfy-kitchen)\b' | grep -v '^[[:space:]]*$' \
    > "$VENV/comfyui-requirements.txt"
  "$VENV/bin/python" -m pip install -q -r "$VENV/comfyui-requirements.txt"
  "$VENV/bin/python" -m pip install -q --no-deps torchsde trampoline
  # imported by comfy.sd's model modules; --no-deps keeps the torch that is there (PyPI may not have
  # a torchvision built for it yet: ComfyUI only needs the Python parts here)
  "$VENV/bin/python" -c "import torchvision" 2>/dev/null || "$VENV/bin/python" -m pip install -q --no-deps torchvision
  "$VENV/bin/python" -c "import torchaudio" 2>/dev/null || "$VENV/bin/python" -m pip install -q --no-deps torchaudio
fi
"$VENV/bin/python" -m pip install -q numpy ml_dtypes nanobind scikit-build-core
EXTRA=()
BUILD_DIR="$ROOT/build-python-comfyui"
LIB=${NIBBLE_LIBRARY:-}
if [ -z "$LIB" ] && [ -f "$ROOT/${BUILD:-build}/libnibble.a" ]; then LIB="$ROOT/${BUILD:-build}/libnibble.a"; fi
if [ -n "$LIB" ]; then EXTRA=(-C "cmake.define.NIBBLE_LIBRARY=$LIB"); BUILD_DIR="$BUILD_DIR-prebuilt"; fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall \
  -C build-dir="$BUILD_DIR" "${EXTRA[@]}" ./python
"$VENV/bin/python" -c "import torch, comfy_kitchen, nibble; from importlib.metadata import version; print('test_comfyui: torch', torch.__version__, '| comfy-kitchen', version('comfy-kitchen'), '| nibble', nibble.__version__)"
(cd "$COMFYUI_DIR" && git log -1 --format='test_comfyui: ComfyUI %h %cd' 2>/dev/null || echo "test_comfyui: ComfyUI at $COMFYUI_DIR")
"$VENV/bin/python" python/tests/comfyui_e2e.py "$COMFYUI_DIR" "$CLI" "$WORK" ${NIBBLE_COMFYUI_S_IMG:-1024} ${NIBBLE_COMFYUI_S_TXT:-64}
