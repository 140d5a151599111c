#!/usr/bin/env python3
"""Golden outputs of ComfyUI's own QwenImageTransformer2DModel for tests/test_qwen_image_model.cpp.

Usage: golden_comfyui.py COMFYUI_DIR OUT_DIR   (run by `make golden-comfyui COMFYUI_DIR=...`)

Builds a small Qwen-Image transformer with ComfyUI's class (imported from COMFYUI_DIR, nothing
copied): 2 blocks, hidden 64 = 2 heads x head_dim 32, RoPE axes (4, 14, 14), joint (context)
width 48, MLP 256, 16 latent channels. Seeded weights are rounded to bf16 and saved with
ComfyUI's key names (prefix "model.diffusion_model.") as OUT_DIR/qwen_image_golden_ckpt.safetensors;
the torch model holds the same values in fp32 and runs forward() in fp32 on the CPU. Cases:
  plain   batch 2, latent (2,16,1,5,7) (odd H and W: circular padding and crop), two timesteps
  refmask batch 1, latent (1,16,1,6,8), two reference latents ("index" method), an int64 text
          mask with the last two tokens masked
  tzero   the same inputs on the model built with default_ref_method="index_timestep_zero" and
          use_additional_t_cond=True (checkpoint + `__index_timestep_zero__` + the
          `time_text_embed.addition_t_embedding.weight` stored in the golden file)
  fmask   batch 1, latent (1,16,5,4) given as 5-D (T=1), float additive mask (-1.5 on one token)
Inputs and outputs go to OUT_DIR/qwen_image_golden.safetensors as "<case>.<name>".
"""
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, HEADS, HEAD_DIM, JOINT, BLOCKS, AXES = 64, 2, 32, 48, 2, (4, 14, 14)
PREFIX = "model.diffusion_model."


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    comfy_dir, out_dir = sys.argv[1], sys.argv[2]
    sys.path.insert(0, os.path.abspath(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no GPU here; model_management must not probe CUDA
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    torch.manual_seed(0)
    ops = comfy.ops.disable_weight_init

    def build(ref_method, add_t):
        return QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=BLOCKS, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=JOINT, axes_dims_rope=AXES,
            default_ref_method=ref_method, use_additional_t_cond=add_t, dtype=torch.float32, device="cpu",
            operations=ops).eval()

    model = build("index", False)
    rng = np.random.default_rng(20261130)
    sd = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith(".bias"):
            v = rng.normal(0.0, 0.05, shape)
        elif len(shape) == 1:  # RMSNorm weights
            v = 1.0 + 0.2 * rng.normal(size=shape)
        else:
            v = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        if ".img_mod." in name or ".txt_mod." in name or "norm_out.linear" in name:
            v = v * 0.5  # modulations of moderate size (1 + scale stays positive mostly)
        sd[name] = torch.tensor(v, dtype=torch.float32).to(torch.bfloat16)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    os.makedirs(out_dir, exist_ok=True)
    save_file({PREFIX + k: v.contiguous() for k, v in sd.items()},
              os.path.join(out_dir, "qwen_image_golden_ckpt.safetensors"),
              metadata={"made_by": "scripts/golden_comfyui.py (ComfyUI QwenImageTransformer2DModel)"})

    add_t = torch.tensor(rng.normal(0.0, 0.3, (2, HIDDEN)), dtype=torch.float32).to(torch.bfloat16)
    model_tz = build("index_timestep_zero", True)
    sd_tz = {k: v.float() for k, v in sd.items()}
    sd_tz["time_text_embed.addition_t_embedding.weight"] = add_t.float()
    sd_tz["__index_timestep_zero__"] = torch.tensor([])
    model_tz.load_state_dict(sd_tz)

    g = torch.Generator().manual_seed(7)
    out = {"tzero.addition_t_embedding": add_t.contiguous()}

    def run(case, m, x, t, ctx, mask=None, refs=None):
        with torch.no_grad():
            y = m(x, t, ctx, attention_mask=mask, ref_latents=refs, transformer_options={})
        out[f"{case}.latent"] = x.clone()
        out[f"{case}.timestep"] = t.clone()
        out[f"{case}.context"] = ctx.clone()
        if mask is not None:
            out[f"{case}.mask"] = mask.clone()
        for i, r in enumerate(refs or []):
            out[f"{case}.ref{i}"] = r.clone()
        out[f"{case}.out"] = y.float().contiguous().clone()
        print(f"{case}: out {tuple(y.shape)} |y|max {y.abs().max().item():.4f}")

    x = torch.randn(2, 16, 1, 5, 7, generator=g)
    ctx = torch.randn(2, 7, JOINT, generator=g) * 3.0
    run("plain", model, x, torch.tensor([0.37, 0.81]), ctx)

    x = torch.randn(1, 16, 1, 6, 8, generator=g)
    ctx = torch.randn(1, 9, JOINT, generator=g) * 3.0
    refs = [torch.randn(1, 16, 1, 4, 6, generator=g), torch.randn(1, 16, 1, 5, 3, generator=g)]
    mask = torch.ones(1, 9, dtype=torch.int64)
    mask[0, -2:] = 0
    run("refmask", model, x, torch.tensor([0.6]), ctx, mask, refs)
    run("tzero", model_tz, x, torch.tensor([0.6]), ctx, mask, refs)

    x = torch.randn(1, 16, 1, 5, 4, generator=g)
    ctx = torch.randn(1, 6, JOINT, generator=g) * 3.0
    fmask = torch.zeros(1, 6)
    fmask[0, 2] = -1.5
    run("fmask", model, x, torch.tensor([0.05]), ctx, fmask)

    save_file(out, os.path.join(out_dir, "qwen_image_golden.safetensors"),
              metadata={"made_by": "scripts/golden_comfyui.py (ComfyUI QwenImageTransformer2DModel, fp32 CPU)",
                        "torch": torch.__version__})


if __name__ == "__main__":
    main()
