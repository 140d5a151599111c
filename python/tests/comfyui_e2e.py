"""nibble inside a real ComfyUI (opt-in: `make test-comfyui COMFYUI_DIR=...`, scripts/test_comfyui.sh).

A nibble-converted 1-block Qwen-Image checkpoint (true widths: `nibble synth --blocks 1` →
`nibble.convert(preset="qwen-image")`) goes through ComfyUI's UNETLoader path
(`comfy.sd.load_diffusion_model`) with the node pack started as ComfyUI starts it, in bf16, fp16
and fp32 model dtypes; activations in the dtype ComfyUI computes in (fp32 on CPU: manual cast),
plus bf16 activations on the bf16 model. Checked (docs/comfyui.md, "Block outputs"):
* every int4 layer is a kitchen QuantizedTensor; the block runs with call counters proving no
  eager kitchen call;
* each int4 layer vs nibble.load (nibble's own runtime) on random inputs and on the block's own
  activations: relative L2 < 1e-2 (the spec's eager-vs-fused criterion, FORMATS.md §5); the
  reference gets the kitchen layout's input for act_unsigned layers (x + 0.171875 rounded to x's
  dtype, §3.4) and returns the op's output dtype;
* the block (image and text streams) vs the same block with its int4 linears run by nibble.load:
  relative L2 < 1e-2, or, where the layers themselves differ (half activations), at most twice the
  noise floor: the change of the nibble.load block when each int4 output gets relative noise of
  its layer's measured difference (W4A4 activation quantization is discontinuous: tiny input
  changes flip codes, so the block amplifies them);
* ops and nibble.load equally far from the float block (within 5 % of that distance);
* the "Quantize model to kitchen-native (nibble)" node on a MODEL loaded from the float
  checkpoint: its output loads through ComfyUI and matches the file conversion.
Printed: block time through the kitchen ops vs nibble.load layers vs the float block vs the
kitchen's eager backend (bf16 activations), interleaved rounds, medians of wall and CPU time.
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

import statistics  # noqa: E402

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
synth = WORK / "qwen_image_1block_bf16.safetensors"
if not ckpt.exists() or not synth.exists():
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


ROUNDS = int(os.environ.get("NIBBLE_COMFYUI_ROUNDS", "3"))
SHIFT = 0.171875          # the kitchen layout's act_unsigned shift (spec §3.4)


def rel_l2(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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


def layout_input(layer, x):
    """What the kitchen layout hands the op, undone for nibble.load (which adds the shift in fp32):
    x + 0.171875 rounded to x's dtype, minus the shift in fp32 (exact)."""
    if layer.act_unsigned and x.dtype != torch.float32:
        return (x + SHIFT).float() - SHIFT
    return x


class Swap:
    """Runs the block's int4 linears through fn(name, nibble.load layer, x) instead of the kitchen ops."""

    def __init__(self, block, prefix, fn):
        self.saved = []
        for name, mod in block.named_modules():
            layer = int4.get(f"{prefix}{name}")
            if layer is not None:
                self.saved.append((mod, mod.forward))
                mod.forward = (lambda n, l: lambda x, *a, **k: fn(n, l, x))(name, layer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for mod, fwd in self.saved:
            mod.forward = fwd


def timed(fs):
    """Interleaved rounds of the callables in fs (dict name → f); medians of wall and CPU time."""
    wall = {k: [] for k in fs}
    cpu = {k: [] for k in fs}
    for f in fs.values():
        f()
    for r in range(ROUNDS):
        for k in (list(fs) if r % 2 == 0 else list(fs)[::-1]):
            t, c = time.perf_counter(), time.process_time()
            fs[k]()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - t)
    return ({k: statistics.median(v) for k, v in wall.items()},
            {k: statistics.median(v) for k, v in cpu.items()})


def uptime():
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


failures = []
P = "transformer_blocks.0."
for mdtype in (torch.bfloat16, torch.float16, torch.float32):
    mname = str(mdtype).replace("torch.", "")
    model = comfy.sd.load_diffusion_model(str(ckpt), model_options={"dtype": mdtype})
    fmodel = comfy.sd.load_diffusion_model(str(synth), model_options={"dtype": mdtype})
    dm = model.model.diffusion_model
    block, fblock = dm.transformer_blocks[0], fmodel.model.diffusion_model.transformer_blocks[0]
    mods = dict(block.named_modules())
    names = [n for n in mods if f"{P}{n}" in int4]
    qt = {n: type(mods[n].weight).__name__ for n in names}
    assert len(qt) == sum(1 for n in int4 if n.startswith(P)), qt
    assert set(qt.values()) == {"QuantizedTensor"}, qt
    cdt = model.model.manual_cast_dtype or model.model.get_dtype()   # what ComfyUI computes in
    acts = [cdt] + ([torch.bfloat16] if mdtype == torch.bfloat16 and cdt != torch.bfloat16 else [])
    for adt in acts:
        name = f"{mname} model, {str(adt).replace('torch.', '')} activations"
        # ---- per layer on random inputs: ComfyUI module (kitchen op → nibble) vs nibble.load
        g = torch.Generator().manual_seed(1)
        worst = 0.0
        with torch.inference_mode():
            for n in names:
                mod, layer = mods[n], int4[f"{P}{n}"]
                m = 2 if n.endswith("_mod.1") else 77
                x = torch.randn(m, mod.in_features, generator=g).to(adt)
                if n.endswith("mlp.net.2"):
                    x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(adt)
                y_ops = mod(x)
                e = rel_l2(y_ops, nibble._like(layer(layout_input(layer, x)), x))
                worst = max(worst, e)
                if not e < 1e-2:
                    failures.append(f"{name} {n} (random input): rel L2 {e:.3g}")
            # ---- the block through the kitchen ops, recording each int4 layer's input and output
            inputs = block_inputs(dm, adt)
            rec = {}
            hooks = [mods[n].register_forward_hook(
                (lambda n: lambda mod, a, out: rec.__setitem__(n, (a[0].detach().clone(), out.detach().clone())))(n))
                for n in names]
            counts.update(eager=0, nibble=0)
            out_ops = block(**inputs)
            calls = dict(counts)
            for h in hooks:
                h.remove()
            # ---- per layer on the block's own activations
            diff = {}
            for n in names:
                x, y = rec[n]
                layer = int4[f"{P}{n}"]
                diff[n] = rel_l2(y, nibble._like(layer(layout_input(layer, x)), x).to(y.dtype))
                if not diff[n] < 1e-2:
                    failures.append(f"{name} {n} (block activations): rel L2 {diff[n]:.3g}")
            out_dtype = {n: rec[n][1].dtype for n in names}

            def ref(n, layer, x):   # nibble.load, in the op's output dtype
                return nibble._like(layer(layout_input(layer, x)), x).to(out_dtype[n])

            gn = torch.Generator().manual_seed(2)

            def noisy(n, layer, x):  # nibble.load + relative noise of the layer's measured size
                y = ref(n, layer, x)
                return (y.float() * (1 + diff[n] * torch.randn(y.shape, generator=gn))).to(y.dtype)

            def native(n, layer, x):  # nibble.load's own output dtype (x's), no layout emulation
                return nibble._like(layer(x), x)

            with Swap(block, P, ref):
                out_ref = block(**inputs)
            with Swap(block, P, noisy):
                out_noisy = block(**inputs)
            with Swap(block, P, native):
                out_native = block(**inputs)
            out_f = fblock(**inputs)
            # sensitivity: relative input noise 1e-4 through the quantized and the float block
            pin = dict(inputs)
            for k in ("hidden_states", "encoder_hidden_states"):
                t = inputs[k].float()
                pin[k] = (t + 1e-4 * t.std() * torch.randn(t.shape, generator=gn)).to(adt)
            with Swap(block, P, ref):
                out_pq = block(**pin)
            out_pf = fblock(**pin)
        ok_calls = calls["eager"] == 0 and calls["nibble"] > 0
        if not ok_calls:
            failures.append(f"{name}: block calls {calls}")
        line = []
        for i, stream in ((1, "img"), (0, "txt")):
            e, floor = rel_l2(out_ops[i], out_ref[i]), rel_l2(out_noisy[i], out_ref[i])
            e_of, e_rf = rel_l2(out_ops[i], out_f[i]), rel_l2(out_ref[i], out_f[i])
            if not (e < 1e-2 or e <= 2 * floor):
                failures.append(f"{name} {stream}: block rel L2 {e:.3g} > max(1e-2, 2 × floor {floor:.3g})")
            if not abs(e_of - e_rf) <= 0.05 * e_rf:
                failures.append(f"{name} {stream}: ops {e_of:.3g} and nibble.load {e_rf:.3g} not equally far from float")
            line.append(f"{stream}: ops~load {e:.2e} (floor {floor:.2e}; native dtypes {rel_l2(out_ops[i], out_native[i]):.2e}), "
                        f"~float ops {e_of:.3f} load {e_rf:.3f}; 1e-4 input noise moves quantized "
                        f"{rel_l2(out_pq[i], out_ref[i]):.1e}, float {rel_l2(out_pf[i], out_f[i]):.1e}")
        print(f"[comfyui] {name}: layers vs nibble.load, random input worst {worst:.2e}, block activations worst "
              f"{max(diff.values()):.2e} ({max(diff, key=diff.get)}); block calls eager {calls['eager']} nibble {calls['nibble']}")
        print("[comfyui]   " + "\n[comfyui]   ".join(line))
        # ---- time: interleaved rounds, medians
        with torch.inference_mode():
            def run_ref():
                with Swap(block, P, ref):
                    block(**inputs)
            fs = {"ops": lambda: block(**inputs), "load": run_ref, "float": lambda: fblock(**inputs)}
            load0 = uptime()
            wall, cpu = timed(fs)
            # where the block's time goes: the 14 int4 layers (ops path) vs the same Linear modules of
            # the float block, timed by forward hooks over one more run of each (medians of ROUNDS)
            def in_layers(blk):
                ms, t0, acc, hs = dict(blk.named_modules()), {}, [0.0], []
                for n in names:
                    hs.append(ms[n].register_forward_pre_hook(
                        lambda mod, a, n=n: t0.__setitem__(n, time.perf_counter())))
                    hs.append(ms[n].register_forward_hook(
                        lambda mod, a, out, n=n: acc.__setitem__(0, acc[0] + time.perf_counter() - t0[n])))
                t = time.perf_counter()
                blk(**inputs)
                total = time.perf_counter() - t
                for h in hs:
                    h.remove()
                return acc[0], total
            if os.environ.get("NIBBLE_E2E_PROFILE") and adt == torch.bfloat16 and mdtype == torch.bfloat16:
                from torch.profiler import profile
                for k, b in (("ops", block), ("float", fblock)):
                    b(**inputs)
                    with profile() as prof:
                        b(**inputs)
                    print(f"[profile {k}]\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
            shares = {k: sorted(in_layers(b) for _ in range(ROUNDS))[ROUNDS // 2] for k, b in (("ops", block), ("float", fblock))}
            t_eager = float("nan")
            if adt == torch.bfloat16:  # the eager backend runs bf16 only (fp32/fp16 activations crash there)
                with ck.use_backend("eager"):
                    t = time.perf_counter()
                    block(**inputs)
                    t_eager = time.perf_counter() - t
        print(f"[comfyui]   block time (S_img={S_IMG}, S_txt={S_TXT}, {ROUNDS} rounds, load avg {load0}→{uptime()}): "
              f"ops {wall['ops'] * 1e3:.0f} ms, nibble.load {wall['load'] * 1e3:.0f} ms, float {wall['float'] * 1e3:.0f} ms, "
              f"eager {t_eager * 1e3:.0f} ms; ops/load wall {wall['ops'] / wall['load']:.3f} cpu "
              f"{cpu['ops'] / cpu['load']:.3f}; threads {nibble.num_threads()}, isa {nibble.isa()}")
        print(f"[comfyui]   inside the 14 quantized linears: ops {shares['ops'][0] * 1e3:.0f} of {shares['ops'][1] * 1e3:.0f} ms; "
              f"the same linears of the float block {shares['float'][0] * 1e3:.0f} of {shares['float'][1] * 1e3:.0f} ms "
              f"(linears {shares['float'][0] / shares['ops'][0]:.2f}x, rest of the block "
              f"{(shares['float'][1] - shares['float'][0]) / max(shares['ops'][1] - shares['ops'][0], 1e-9):.2f}x)")
    print(f"[comfyui]   cache: {nk.cache_info()}")
    if mdtype == torch.bfloat16:
        # ---- the Quantize node on a real MODEL (the float checkpoint loaded by ComfyUI)
        import folder_paths
        qdir = WORK / "diffusion_models"
        qdir.mkdir(exist_ok=True)
        folder_paths.add_model_folder_path("diffusion_models", str(qdir), is_default=True)
        out_path = qdir / "e2e_node_from_model.safetensors"
        if out_path.exists():
            out_path.unlink()
        node = pack.NODE_CLASS_MAPPINGS["NibbleQuantizeKitchenNative"]()
        t = time.time()
        res = node.quantize("qwen-image preset", 32, "e2e_node_from_model", model=fmodel)
        got = pathlib.Path(res["result"][0])
        qmodel = comfy.sd.load_diffusion_model(str(got), model_options={"dtype": mdtype})
        qb = qmodel.model.diffusion_model.transformer_blocks[0]
        kinds = {type(m.weight).__name__ for n, m in qb.named_modules() if f"{P}{n}" in int4}
        node_ref = nibble.load(got)
        g = torch.Generator().manual_seed(3)
        worst_node = 0.0
        with torch.inference_mode():
            for n in names:
                x = torch.randn(4, mods[n].in_features, generator=g)
                worst_node = max(worst_node, rel_l2(nibble._like(node_ref.layers[f"{P}{n}"](x), x),
                                                    nibble._like(int4[f"{P}{n}"](x), x)))
        same = sorted(n for n, l in node_ref.layers.items() if l.format in ("awq_w4a16", "svdquant_w4a4")) == sorted(int4)
        print(f"[comfyui] Quantize node on a MODEL: {got.name} in {time.time() - t:.0f} s; layers "
              f"{sorted(kinds)}; same int4 layers as the file conversion: {same}; worst layer vs it {worst_node:.2e}")
        if kinds != {"QuantizedTensor"} or not same or not worst_node < 1e-2:
            failures.append(f"Quantize node on a MODEL: kinds {kinds}, same layers {same}, rel L2 {worst_node:.3g}")
        del qmodel, qb, node_ref
    del model, fmodel, dm, block, fblock, mods
    comfy.model_management.soft_empty_cache()

if failures:
    print("[comfyui] FAILED:\n  " + "\n  ".join(failures))
print("[comfyui] OK" if not failures else "[comfyui] exit 1", flush=True)
# os._exit: no interpreter teardown (nanobind would list the nibble.load layers still referenced
# by this script's globals and torch's caches as "leaked" at shutdown)
os._exit(1 if failures else 0)
