#!/usr/bin/env python3
"""Generate the importer fixtures tests/data/import_*.safetensors by running the REAL packers.

    make fixtures-import NUNCHAKU_DIR=/path/to/nunchaku    (AutoAWQ is pip-installed by the target)

* AutoAWQ 0.2.9 (PyPI): `WQLinear_GEMM.from_linear` packs an AutoAWQ GEMM layer; `pack_intweight`
  of `gemv_fast.py` packs the TinyChat layout that nunchaku's AWQ W4A16 modulation linears use.
* nunchaku (NUNCHAKU_DIR): `nunchaku/lora/flux/packer.py` `NunchakuWeightPacker` packs the SVDQuant
  INT4 weights, scales, smoothing, bias and low-rank factors.
Only the packers are imported (their parent packages are stubbed so that the CUDA extension,
transformers, accelerate, huggingface_hub are not needed). The steps DeepCompressor's converter
performs around the packer (fusing q/k/v, interleaving the modulation chunks and folding +1 into the
scale chunks' bias, zero-point → pre-scaled zero) are restated here from ../shared/spec/FORMATS.md §9;
DeepCompressor itself is not run.

Every layer starts from known logical values (codes, scales, zero points, factors, smoothing, bias):
they are written to *_truth.safetensors in kitchen orientation, the packed form to the importer's
input file. `make test` (tests/test_import_*.cpp) imports the packed file and compares every value.
"""
import argparse
import os
import sys
import types

import numpy as np
import torch
from safetensors.torch import save_file


def stub_package(name, path):
    m = types.ModuleType(name)
    m.__path__ = [path]
    sys.modules[name] = m


def load_autoawq(awq_dir):
    stub_package("awq", os.path.join(awq_dir, "awq"))
    try:
        import accelerate  # noqa: F401
    except ImportError:
        sys.modules["accelerate"] = types.ModuleType("accelerate")
    import awq.modules.linear.gemm as gemm
    import awq.modules.linear.gemv_fast as gemv_fast
    return gemm.WQLinear_GEMM, gemv_fast.pack_intweight


def load_nunchaku(nk_dir):
    root = os.path.join(nk_dir, "nunchaku")
    stub_package("nunchaku", root)
    stub_package("nunchaku.lora", os.path.join(root, "lora"))
    stub_package("nunchaku.lora.flux", os.path.join(root, "lora", "flux"))
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        hf = types.ModuleType("huggingface_hub")
        hf.hf_hub_download = None
        sys.modules["huggingface_hub"] = hf
    from nunchaku.lora.flux.packer import NunchakuWeightPacker
    return NunchakuWeightPacker


def kitchen_pack(codes):
    """(N, K) int codes → (N, K/2) int8, low nibble = even column (spec §1)."""
    c = codes.to(torch.int32) & 0xF
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8).view(torch.int8).contiguous()


def bf16(shape, g, lo=-1.0, hi=1.0):
    return (torch.rand(shape, generator=g) * (hi - lo) + lo).to(torch.bfloat16)


# ------------------------------------------------------------------------------------------ AutoAWQ
def autoawq_layers(WQLinear_GEMM, g):
    tensors, truth = {}, {}
    for name, N, K, G, with_bias in [("model.layers.0.self_attn.q_proj", 192, 256, 128, True),
                                     ("model.layers.0.mlp.up_proj", 64, 128, 64, False)]:
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        z = torch.randint(0, 16, (K // G, N), generator=g, dtype=torch.int32)
        s = (torch.rand((K // G, N), generator=g) * 0.02 + 0.001).to(torch.float16)
        # W = (q − z)·s, exact in fp32; from_linear recovers q = round((W + z·s)/s) exactly.
        W = (q.float() - z.float().repeat_interleave(G, 0).t()) * s.float().repeat_interleave(G, 0).t()
        lin = torch.nn.Linear(K, N, bias=with_bias)
        with torch.no_grad():
            lin.weight.copy_(W)
            if with_bias:
                lin.bias.copy_(torch.rand(N, generator=g) - 0.5)
        m = WQLinear_GEMM.from_linear(lin, 4, G, scales=s.float(), zeros=z.float())
        tensors[name + ".qweight"] = m.qweight.contiguous()
        tensors[name + ".qzeros"] = m.qzeros.contiguous()
        tensors[name + ".scales"] = m.scales.contiguous()
        if with_bias:
            tensors[name + ".bias"] = m.bias.contiguous()
            truth[name + ".bias"] = m.bias.contiguous()
        truth[name + ".codes"] = kitchen_pack(q)
        truth[name + ".zero_points"] = z.to(torch.uint8)
        truth[name + ".scales"] = s
    tensors["model.embed_tokens.weight"] = torch.randn((16, 64), generator=g).to(torch.float16)
    return tensors, truth


# ------------------------------------------------------------------------------------------ nunchaku
def nunchaku_w4a4(P, packer, name, N, K, R, g, tensors, truth, v0_keys=False, smooth_ones=False, smooth=None):
    codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int32)
    wscales = (torch.rand((N, K // 64), generator=g) * 0.05 + 0.001).to(torch.bfloat16)
    if smooth is None:
        smooth = torch.ones(K, dtype=torch.bfloat16) if smooth_ones else bf16((K,), g, 0.25, 4.0)
    down = bf16((R, K), g, -0.1, 0.1)   # low-rank down as (R, K), raw-input basis
    up = bf16((N, R), g, -0.1, 0.1)
    bias = bf16((N,), g, -0.5, 0.5)
    pk = packer(bits=4)
    qw = pk.pack_weight(pk.pad_weight(codes))
    sc = pk.pack_scale(pk.pad_scale(wscales.view(N, 1, K // 64, 1), group_size=64), group_size=64)
    sm = pk.pack_scale(pk.pad_scale(smooth, group_size=-1), group_size=-1)
    bi = pk.pack_scale(pk.pad_scale(bias, group_size=-1), group_size=-1)
    pd = pk.pack_lowrank_weight(pk.pad_lowrank_weight(down, down=True), down=True)
    pu = pk.pack_lowrank_weight(pk.pad_lowrank_weight(up, down=False), down=False)
    keys = ("smooth", "lora_down", "lora_up") if v0_keys else ("smooth_factor", "proj_down", "proj_up")
    tensors[name + ".qweight"] = qw.contiguous()
    tensors[name + ".wscales"] = sc.contiguous()
    tensors[name + "." + keys[0]] = sm.contiguous()
    tensors[name + (".smooth_orig" if v0_keys else ".smooth_factor_orig")] = sm.clone()
    tensors[name + "." + keys[1]] = pd.contiguous()
    tensors[name + "." + keys[2]] = pu.contiguous()
    tensors[name + ".bias"] = bi.contiguous()
    truth[name + ".codes"] = kitchen_pack(codes)
    truth[name + ".wscales"] = wscales.t().contiguous()       # kitchen (K/64, N)
    truth[name + ".smooth"] = smooth.clone()
    truth[name + ".proj_down"] = down.t().contiguous()          # kitchen (K, R)
    truth[name + ".proj_up"] = up
    truth[name + ".bias"] = bias


def nunchaku_awq_mod(pack_intweight, name, D, K, g, tensors, truth, S=6):
    N = S * D
    G = 64
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)       # ComfyUI order: row c·D + d
    z = torch.randint(0, 16, (K // G, N), generator=g, dtype=torch.int32)
    s = (torch.rand((K // G, N), generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    b = bf16((N,), g, -0.5, 0.5)                                             # ComfyUI bias (no +1)
    # DeepCompressor's modulation steps (spec §9.2): interleave the chunks (stored o = S·d + c),
    # fold +1 into the bias of chunks 1 and S−2 (bf16), pre-scaled zeros −bf16(z·s), pad the group
    # rows to a multiple of 16 with zeros.
    perm = torch.tensor([c * D + d for d in range(D) for c in range(S)])    # stored o ← logical perm[o]
    q_st, z_st, s_st, b_st = q[perm], z[:, perm], s[:, perm], b[perm].float()
    chunk = torch.arange(N) % S
    b_st = torch.where((chunk == 1) | (chunk == S - 2), b_st + 1, b_st).to(torch.bfloat16)
    qweight = pack_intweight(q_st.contiguous(), interleave=4, kstride=64)    # int16 (N/4, K)
    ng = K // G
    ngp = (ng + 15) // 16 * 16
    ws = torch.zeros((ngp, N), dtype=torch.bfloat16)
    wz = torch.zeros((ngp, N), dtype=torch.bfloat16)
    ws[:ng] = s_st
    wz[:ng] = -(s_st.float() * z_st.float()).to(torch.bfloat16)
    tensors[name + ".qweight"] = qweight.view(torch.int32).contiguous()     # nunchaku: int32 (N/4, K/2)
    tensors[name + ".wscales"] = ws
    tensors[name + ".wzeros"] = wz
    tensors[name + ".bias"] = b_st
    truth[name + ".codes"] = kitchen_pack(q)
    truth[name + ".zero_points"] = z.to(torch.uint8)
    truth[name + ".scales"] = s
    truth[name + ".bias"] = b
    truth[name + ".stored_bias"] = b_st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nunchaku-dir", required=True)
    ap.add_argument("--autoawq-dir", required=True, help="a directory containing the awq package (pip --target)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data"))
    a = ap.parse_args()
    WQLinear_GEMM, pack_intweight = load_autoawq(a.autoawq_dir)
    Packer = load_nunchaku(a.nunchaku_dir)
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator().manual_seed(20261130)

    t, tr = autoawq_layers(WQLinear_GEMM, g)
    save_file(t, os.path.join(a.out, "import_autoawq.safetensors"), metadata={"source": "AutoAWQ 0.2.9 WQLinear_GEMM.from_linear"})
    save_file(tr, os.path.join(a.out, "import_autoawq_truth.safetensors"))

    # A one-block nunchaku Qwen-Image checkpoint: D = 192 (pads to 256), F = 4·D, rank 20 (pads to 32).
    D, F, R = 192, 768, 20
    t, tr = {}, {}
    b = "transformer_blocks.0."
    nunchaku_w4a4(None, Packer, b + "attn.to_qkv", 3 * D, D, R, g, t, tr)
    nunchaku_w4a4(None, Packer, b + "attn.add_qkv_proj", 3 * D, D, R, g, t, tr, v0_keys=True)
    nunchaku_w4a4(None, Packer, b + "attn.to_out.0", D, D, R, g, t, tr, smooth_ones=True)
    nunchaku_w4a4(None, Packer, b + "img_mlp.net.0.proj", F, D, R, g, t, tr)
    nunchaku_w4a4(None, Packer, b + "img_mlp.net.2", D, F, R, g, t, tr)
    nunchaku_awq_mod(pack_intweight, b + "img_mod.1", D, D, g, t, tr)
    t["img_in.weight"] = bf16((D, 64), g)
    t[b + "attn.norm_q.weight"] = bf16((128,), g)
    meta = {"quantization_config": '{"method": "svdquant", "weight": {"dtype": "int4"}, "rank": 32}',
            "source": "nunchaku NunchakuWeightPacker (packer.py) + AutoAWQ pack_intweight"}
    save_file(t, os.path.join(a.out, "import_nunchaku_qwen.safetensors"), metadata=meta)
    save_file(tr, os.path.join(a.out, "import_nunchaku_qwen_truth.safetensors"))
    # A one-double-block, one-single-block nunchaku FLUX.1 checkpoint in the module names and key
    # generation of nunchaku's FLUX files (the C++ runtime's names: qkv_proj, mlp_fc1, norm1.linear,
    # …; v0 suffixes smooth/lora_down/lora_up, one layer with the v1 suffixes), D = 128 (2 heads of
    # 64), MLP 4·D, rank 12 (pads to 16); the float rest under diffusers' names as nunchaku keeps them.
    g = torch.Generator().manual_seed(20261201)
    D, F, R = 128, 512, 12
    t, tr = {}, {}
    b = "transformer_blocks.0."
    for ctx in ("", "_context"):
        nunchaku_w4a4(None, Packer, b + "qkv_proj" + ctx, 3 * D, D, R, g, t, tr, v0_keys=ctx == "")
        nunchaku_w4a4(None, Packer, b + "out_proj" + ctx, D, D, R, g, t, tr, v0_keys=True, smooth_ones=True)
        nunchaku_w4a4(None, Packer, b + "mlp" + ctx + "_fc1", F, D, R, g, t, tr, v0_keys=True)
        nunchaku_w4a4(None, Packer, b + "mlp" + ctx + "_fc2", D, F, R, g, t, tr, v0_keys=True)
    nunchaku_awq_mod(pack_intweight, b + "norm1.linear", D, D, g, t, tr, S=6)
    nunchaku_awq_mod(pack_intweight, b + "norm1_context.linear", D, D, g, t, tr, S=6)
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        t[b + n + ".weight"] = bf16((64,), g, 0.5, 1.5)
    s1 = "single_transformer_blocks.0."
    shared = bf16((D,), g, 0.25, 4.0)  # DC smooths qkv_proj and mlp_fc1 of a single block together
    nunchaku_w4a4(None, Packer, s1 + "qkv_proj", 3 * D, D, R, g, t, tr, v0_keys=True, smooth=shared)
    nunchaku_w4a4(None, Packer, s1 + "mlp_fc1", F, D, R, g, t, tr, v0_keys=True, smooth=shared)
    nunchaku_w4a4(None, Packer, s1 + "out_proj", D, D, R, g, t, tr, v0_keys=True)
    nunchaku_w4a4(None, Packer, s1 + "mlp_fc2", D, F, R, g, t, tr, v0_keys=True)
    nunchaku_awq_mod(pack_intweight, s1 + "norm.linear", D, D, g, t, tr, S=3)
    for n in ("norm_q", "norm_k"):
        t[s1 + n + ".weight"] = bf16((64,), g, 0.5, 1.5)
    for name, shape in [("x_embedder", (D, 64)), ("context_embedder", (D, 32)),
                        ("time_text_embed.timestep_embedder.linear_1", (D, 32)),
                        ("time_text_embed.timestep_embedder.linear_2", (D, D)),
                        ("time_text_embed.guidance_embedder.linear_1", (D, 32)),
                        ("time_text_embed.guidance_embedder.linear_2", (D, D)),
                        ("time_text_embed.text_embedder.linear_1", (D, 48)),
                        ("time_text_embed.text_embedder.linear_2", (D, D)),
                        ("norm_out.linear", (2 * D, D)), ("proj_out", (64, D))]:
        t[name + ".weight"] = bf16(shape, g, -0.1, 0.1)
        t[name + ".bias"] = bf16((shape[0],), g, -0.1, 0.1)
    cfg = '{"num_attention_heads": 2, "attention_head_dim": 64, "num_layers": 1, "num_single_layers": 1}'
    meta = {"quantization_config": '{"method": "svdquant", "weight": {"dtype": "int4"}, "rank": 16}', "config": cfg,
            "model_class": "NunchakuFluxTransformer2dModel",
            "source": "nunchaku NunchakuWeightPacker (packer.py) + AutoAWQ pack_intweight"}
    save_file(t, os.path.join(a.out, "import_nunchaku_flux.safetensors"), metadata=meta)
    save_file(tr, os.path.join(a.out, "import_nunchaku_flux_truth.safetensors"))
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out) if f.startswith("import_"))
    print(f"wrote tests/data/import_* ({total} bytes)")


if __name__ == "__main__":
    main()
