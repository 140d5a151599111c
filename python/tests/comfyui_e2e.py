"""nibble inside a real ComfyUI (opt-in: `make test-comfyui COMFYUI_DIR=...`, scripts/test_comfyui.sh).

A nibble-converted 1-block Qwen-Image checkpoint (true widths: `nibble synth --blocks 1` →
`nibble.convert(preset="qwen-image")`) goes through ComfyUI's UNETLoader path
(`comfy.sd.load_diffusion_model`) with the node pack started as ComfyUI starts it, in bf16, fp16
and fp32 model dtypes. Checked: every int4 layer is a kitchen QuantizedTensor; the block runs with
call counters proving no eager kitchen call; each int4 layer and the block output agree with
nibble.load (the same layers through nibble's own runtime) within the spec's eager-vs-fused
criterion (relative L2 < 1e-2, FORMATS.md §5). Printed: block time through the kitchen ops vs
through nibble.load layers vs the kitchen's eager backend (bf16).
Usage: python comfyui_e2e.py COMFYUI_DIR NIBBLE_CLI WORKDIR [S_IMG] [S_TXT]
"""
import importlib.util
import os
import pathlib
import subprocess
import sys
import time

COMFY, CLI, WORK = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
S_IMG = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
S_TXT = int(sys.argv[5]) if len(sys.argv) > 5 else 64
PACK = pathlib.Path(__file__).resolve().parents[2] / "comfyui"
WORK.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, COMFY)

import torch  # noqa: E402

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy_kitchen as ck  # noqa: E402

import nibble  # noqa: E402

# ---- the node pack, imported the way ComfyUI imports a custom node directory
spec = importlib.util.spec_from_file_location("comfyui_nibble", PACK / "__init__.py",
                                              submodule_search_locations=[str(PACK)])
pack = importlib.util.module_from_spec(spec)
sys.modules["comfyui_nibble"] = pack
spec.loader.exec_module(pack)
import nibble.kitchen as nk  # noqa: E402

rep = pack.setup()
print(f"[comfyui] setup: threads={rep['threads']} kitchen={rep['kitchen']['registered']} "
      f"ops={rep['kitchen']['ops']} formats_added={rep['formats_added']} error={rep['error']}")
assert rep["error"] is None and nk.registered, rep

# ---- the checkpoint
ckpt = WORK / "qwen_image_1block_int4.safetensors"
if not ckpt.exists():
    synth = WORK / "qwen_image_1block_bf16.safetensors"
    if not synth.exists():
        subprocess.run([CLI, "synth", str(synth), "--blocks", "1", "--joint-dim", "3584"], check=True)
    t = time.time()
    nibble.convert(synth, ckpt, preset="qwen-image")
    print(f"[comfyui] converted {synth.name} → {ckpt.name} in {time.time() - t:.0f} s")
ref = nibble.load(ckpt)
int4 = {n: l for n, l in ref.layers.items() if l.format in ("awq_w4a16", "svdquant_w4a4")}
print(f"[comfyui] {len(int4)} int4 layers: " + ", ".join(sorted({l.format for l in int4.values()})))

# ---- call counters on the kitchen's eager backend and on nibble's
registry = ck.registry
counts = {"eager": 0, "nibble": 0}


def counted(fn, who):
    def f(*a, **k):
        counts[who] += 1
        return fn(*a, **k)
    return f


eager_mod = registry._backends["eager"]
for op in nk.OPS:
    setattr(eager_mod, op, counted(getattr(eager_mod, op), "eager"))
    setattr(nk._Backend, op, staticmethod(counted(getattr(nk._Backend, op), "nibble")))


def rel_l2(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def best(f, n=2):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def block_inputs(dm, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, S_IMG, 3072, generator=g).to(dtype)
    txt = torch.randn(1, S_TXT, 3072, generator=g).to(dtype)
    temb = torch.randn(1, 3072, generator=g).to(dtype)
    ids = torch.zeros(1, S_TXT + S_IMG, 3)
    ids[0, :, 1] = torch.arange(S_TXT + S_IMG) % 64
    ids[0, :, 2] = torch.arange(S_TXT + S_IMG) // 64
    pe = dm.pe_embedder(ids).to(dtype).contiguous()
    return dict(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None,
                temb=temb, image_rotary_emb=pe)


class NibbleLoadLinears:
    """Runs the block's int4 linears through nibble.load's layers instead of the kitchen ops."""

    def __init__(self, block, prefix):
        self.saved = []
        for name, mod in block.named_modules():
            layer = int4.get(f"{prefix}{name}")
            if layer is not None:
                self.saved.append((mod, mod.forward))
                mod.forward = (lambda l: lambda x, *a, **k: nibble._like(l(x), x))(layer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for mod, fwd in self.saved:
            mod.forward = fwd


failures = []
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    name = str(dtype).replace("torch.", "")
    model = comfy.sd.load_diffusion_model(str(ckpt), model_options={"dtype": dtype})
    dm = model.model.diffusion_model
    block = dm.transformer_blocks[0]
    qt = {n: type(m.weight).__name__ for n, m in block.named_modules()
          if f"transformer_blocks.0.{n}" in int4}
    assert len(qt) == sum(1 for n in int4 if n.startswith("transformer_blocks.0.")), qt
    assert set(qt.values()) == {"QuantizedTensor"}, qt
    # per layer: ComfyUI module (kitchen op → nibble) vs nibble.load
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    counts.update(eager=0, nibble=0)
    with torch.inference_mode():
        for n, mod in block.named_modules():
            full = f"transformer_blocks.0.{n}"
            if full not in int4:
                continue
            m = 2 if full.endswith("_mod.1") else 77
            x = torch.randn(m, mod.in_features, generator=g).to(dtype)
            if full.endswith("mlp.net.2"):
                x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(dtype)
            y_ops = mod(x)
            y_ref = nibble._like(int4[full](x), x)
            e = rel_l2(y_ops, y_ref)
            worst = max(worst, e)
            if not e < 1e-2:
                failures.append(f"{name} {full}: rel L2 {e:.3g}")
        n_layer_calls = counts["nibble"]
        inputs = block_inputs(dm, dtype)
        counts.update(eager=0, nibble=0)
        out_ops = block(**inputs)
        calls = dict(counts)
        t_ops = best(lambda: block(**inputs))
        with NibbleLoadLinears(block, "transformer_blocks.0."):
            out_ref = block(**inputs)
            t_ref = best(lambda: block(**inputs))
        e_txt, e_img = rel_l2(out_ops[0], out_ref[0]), rel_l2(out_ops[1], out_ref[1])
        t_eager = float("nan")
        if dtype == torch.bfloat16:  # the eager backend runs bf16 only (fp16/fp32 models crash there)
            with ck.use_backend("eager"):
                t_eager = best(lambda: block(**inputs), n=1)
    ok = calls["eager"] == 0 and calls["nibble"] > 0 and e_img < 1e-2 and e_txt < 1e-2
    if not ok:
        failures.append(f"{name}: block calls {calls}, rel L2 img {e_img:.3g} txt {e_txt:.3g}")
    print(f"[comfyui] {name}: layers worst rel L2 vs nibble.load {worst:.2e} ({n_layer_calls} op calls); "
          f"block: eager calls {calls['eager']}, nibble calls {calls['nibble']}, rel L2 img {e_img:.2e} "
          f"txt {e_txt:.2e}; block time (S_img={S_IMG}, S_txt={S_TXT}) ops {t_ops * 1e3:.0f} ms, "
          f"nibble.load {t_ref * 1e3:.0f} ms (ops/load {t_ops / t_ref:.2f}), eager "
          f"{t_eager * 1e3:.0f} ms; threads {nibble.num_threads()}, isa {nibble.isa()}")
    print(f"[comfyui] cache: {nk.cache_info()}")
    del model, dm, block
    comfy.model_management.soft_empty_cache()

if failures:
    print("[comfyui] FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("[comfyui] OK")
