"""The nibble nodes. ComfyUI internals (model folders, a MODEL's weights) via comfy_compat."""
from __future__ import annotations

import os
import tempfile

from . import comfy_compat

CATEGORY = "nibble"
FORMATS = ["svdquant_w4a4", "awq_w4a16", "qwen-image preset"]
NONE = "(none)"


def _out_path(filename: str, kind: str = "diffusion_models") -> str:
    name = filename.strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"nibble: output file name {filename!r} must be a plain file name")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    path = os.path.join(comfy_compat.output_dir(kind), name)
    if os.path.exists(path):
        raise ValueError(f"nibble: {path} exists; choose another output name")
    return path


class QuantizeKitchenNative:
    """Runs nibble's converter (nibble.convert) on a checkpoint file of models/diffusion_models or
    on a loaded MODEL's diffusion-model weights; writes a kitchen-native int4 checkpoint to
    models/diffusion_models (load it with the UNET loader)."""

    @classmethod
    def INPUT_TYPES(cls):
        try:
            files = comfy_compat.list_files("diffusion_models")
        except Exception:
            files = []
        return {
            "required": {
                "format": (FORMATS, {"default": "qwen-image preset"}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 1024}),
                "output_name": ("STRING", {"default": "model_nibble_int4"}),
            },
            "optional": {
                "model": ("MODEL",),
                "checkpoint": ([NONE] + files, {"default": NONE}),
                "calibration": ("STRING", {"default": ""}),   # statistics file (nibble.calib)
                "exclude": ("STRING", {"default": ""}),       # comma-separated regexes
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "quantize"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def quantize(self, format, rank, output_name, model=None, checkpoint=NONE, calibration="",
                 exclude=""):
        import nibble

        if (model is None) == (checkpoint in (None, "", NONE)):
            raise ValueError("nibble: connect a MODEL or choose a checkpoint (exactly one)")
        out = _out_path(output_name)
        kw = dict(rank=int(rank), exclude=[e.strip() for e in exclude.split(",") if e.strip()])
        if format == "qwen-image preset":
            kw["preset"] = "qwen-image"
        elif format in ("svdquant_w4a4", "awq_w4a16"):
            kw["format"] = format
        else:
            raise ValueError(f"nibble: unknown format {format!r}; choose one of {FORMATS}")
        if calibration.strip():
            kw["calib"] = calibration.strip()
        tmp = None
        try:
            if model is not None:
                sd = comfy_compat.diffusion_model_state_dict(model)
                tensors = {}
                for k, v in sd.items():
                    if k.endswith("comfy_quant") or type(v).__name__ == "QuantizedTensor":
                        raise ValueError(f"nibble: the MODEL is already quantized ({k}); "
                                         "quantize its float checkpoint instead")
                    tensors[k] = v.detach().to("cpu").contiguous()
                fd, tmp = tempfile.mkstemp(suffix=".safetensors",
                                           dir=comfy_compat.output_dir("diffusion_models"))
                os.close(fd)
                nibble.save_file(tensors, tmp)
                src = tmp
            else:
                src = comfy_compat.full_path("diffusion_models", checkpoint)
            report = nibble.convert(src, out, **kw)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
        n = report.get("quantized", report.get("layers_quantized", "?")) if isinstance(report, dict) else "?"
        return {"ui": {"text": [f"{out} ({n} layers quantized)"]}, "result": (out,)}


class ApplyLoraInt4:
    """Bakes a LoRA into a kitchen-native int4 checkpoint with nibble (svdquant layers grow their
    low-rank branch exactly, awq layers are requantized, float layers merged; docs/lora.md) and
    writes the result to models/diffusion_models."""

    @classmethod
    def INPUT_TYPES(cls):
        try:
            models, loras = comfy_compat.list_files("diffusion_models"), comfy_compat.list_files("loras")
        except Exception:
            models, loras = [], []
        return {
            "required": {
                "checkpoint": (models,),
                "lora": (loras,),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
                "output_name": ("STRING", {"default": "model_nibble_lora"}),
            },
            "optional": {"skip_unmatched": ("BOOLEAN", {"default": False})},
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "apply"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def apply(self, checkpoint, lora, strength, output_name, skip_unmatched=False):
        import nibble

        out = _out_path(output_name)
        ckpt = comfy_compat.full_path("diffusion_models", checkpoint)
        lora_path = comfy_compat.full_path("loras", lora)
        stats = nibble.apply_loras(ckpt, [(lora_path, float(strength))], out, partial=bool(skip_unmatched))
        return {"ui": {"text": [f"{out}: {stats}"]}, "result": (out,)}


NODE_CLASS_MAPPINGS = {
    "NibbleQuantizeKitchenNative": QuantizeKitchenNative,
    "NibbleApplyLoraInt4": ApplyLoraInt4,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NibbleQuantizeKitchenNative": "Quantize model to kitchen-native (nibble)",
    "NibbleApplyLoraInt4": "Apply LoRA to int4 model (nibble)",
}
