#!/usr/bin/env python3
"""Converter quality on real weights with activations from real inputs (`make quality-convert`).

Model: the BERT encoder that the PyPI package `rxnfp` (0.1.0) ships inside its wheel
(rxnfp/models/transformers/bert_pretrained: 12 layers, hidden 256, 4 heads, intermediate 512 — a
masked language model over chemical reaction SMILES, not a sentence-embedding model). Inputs: reaction
SMILES built from named reaction types over real reagents, tokenized with the package's vocabulary.
Calibration and evaluation use disjoint reactions. Per linear layer (72 of them) the output SNR is
measured by `nibble verify --against FLOAT --inputs EVAL` (the nibble kernels, W4A4 with quantized
activations for svdquant), for the earlier searches (`--search legacy`), the current ones, and with `--gptq`.

Usage: quality_convert.py NIBBLE_CLI WORKDIR   (torch + numpy + safetensors in this interpreter)
"""
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("nibble_calib", os.path.join(ROOT, "python/nibble/calib.py"))
calib = importlib.util.module_from_spec(spec)
spec.loader.exec_module(calib)

NIBBLE, WORK = sys.argv[1], sys.argv[2]
os.makedirs(WORK, exist_ok=True)


def sh(*args, capture=True):
    r = subprocess.run(list(args), capture_output=capture, text=True)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


# ------------------------------------------------------------------ the model from the wheel
wheel = [f for f in os.listdir(WORK) if f.startswith("rxnfp-0.1.0") and f.endswith(".whl")]
if not wheel:
    sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "rxnfp==0.1.0", "-d", WORK)
    wheel = [f for f in os.listdir(WORK) if f.startswith("rxnfp-0.1.0") and f.endswith(".whl")]
mdir = "rxnfp/models/transformers/bert_pretrained/"
with zipfile.ZipFile(os.path.join(WORK, wheel[0])) as z:
    for n in ("config.json", "vocab.txt", "pytorch_model.bin"):
        if not os.path.exists(os.path.join(WORK, n)):
            with open(os.path.join(WORK, n), "wb") as f:
                f.write(z.read(mdir + n))
cfg = json.load(open(os.path.join(WORK, "config.json")))
sd = torch.load(os.path.join(WORK, "pytorch_model.bin"), map_location="cpu", weights_only=True)
H, L, NH = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
vocab = {t.strip(): i for i, t in enumerate(open(os.path.join(WORK, "vocab.txt")))}


class Node(torch.nn.Module):
    pass


def lin(prefix):
    m = torch.nn.Linear(sd[prefix + ".weight"].shape[1], sd[prefix + ".weight"].shape[0])
    m.weight.data.copy_(sd[prefix + ".weight"].float())
    m.bias.data.copy_(sd[prefix + ".bias"].float())
    return m


def ln(prefix, x):
    return torch.nn.functional.layer_norm(x, (H,), sd[prefix + ".weight"].float(), sd[prefix + ".bias"].float(),
                                          cfg["layer_norm_eps"])


encoder = Node()
layers = torch.nn.ModuleList()
for i in range(L):
    p = f"bert.encoder.layer.{i}."
    layer, att, selfm, out, inter, lout = Node(), Node(), Node(), Node(), Node(), Node()
    for n in ("query", "key", "value"):
        selfm.add_module(n, lin(p + "attention.self." + n))
    out.add_module("dense", lin(p + "attention.output.dense"))
    att.add_module("self", selfm)
    att.add_module("output", out)
    inter.add_module("dense", lin(p + "intermediate.dense"))
    lout.add_module("dense", lin(p + "output.dense"))
    layer.add_module("attention", att)
    layer.add_module("intermediate", inter)
    layer.add_module("output", lout)
    layers.append(layer)
encoder.add_module("layer", layers)


def forward(ids):
    x = (sd["bert.embeddings.word_embeddings.weight"][ids] + sd["bert.embeddings.position_embeddings.weight"][:len(ids)]
         + sd["bert.embeddings.token_type_embeddings.weight"][0]).float()[None]
    x = ln("bert.embeddings.LayerNorm", x)
    for i, layer in enumerate(encoder.layer):
        p = f"bert.encoder.layer.{i}."
        s = getattr(layer.attention, "self")
        q, k, v = (t.view(1, -1, NH, H // NH).transpose(1, 2) for t in (s.query(x), s.key(x), s.value(x)))
        a = torch.softmax(q @ k.transpose(-1, -2) / (H // NH) ** 0.5, -1) @ v
        a = a.transpose(1, 2).reshape(1, -1, H)
        x = ln(p + "attention.output.LayerNorm", layer.attention.output.dense(a) + x)
        h = torch.nn.functional.gelu(layer.intermediate.dense(x))
        x = ln(p + "output.LayerNorm", layer.output.dense(h) + x)
    return x


# ------------------------------------------------------------------ inputs: reaction SMILES
aryl = ["c1ccccc1", "c1ccc(C)cc1", "c1ccc(OC)cc1", "c1ccc(F)cc1", "c1ccc(Cl)cc1", "c1ccc([N+](=O)[O-])cc1",
        "c1ccncc1", "c1ccc2ccccc2c1", "c1ccc(C(F)(F)F)cc1", "c1cc(Br)ccc1", "c1ccoc1", "c1ccsc1", "c1cnc2ccccc2c1"]
alkyl = ["C", "CC", "CCC", "CC(C)C", "C1CCCCC1", "CC(C)(C)", "CCOC", "C1CC1", "CCCCCC", "OCC"]
amines = ["NCc1ccccc1", "N1CCOCC1", "N1CCCCC1", "NC1CCCCC1", "Nc1ccccc1", "NCC", "N(C)C", "NCCO", "N1CCNCC1",
          "NC(C)c1ccccc1", "Nc1ccc(F)cc1"]
alcohols = ["OC", "OCC", "OC(C)C", "OCc1ccccc1", "OCCCC", "OC1CCCC1"]
reagents = ["CN(C)C=O", "ClCCl", "C1CCOC1", "O", "CCN(CC)CC", "O=C([O-])[O-].[K+].[K+]", "CO", "CC#N",
            "[Na+].[OH-]", "Cl", "CC(=O)O"]


def reactions():
    out, k = [], 0
    for r in aryl + alkyl:
        for am in amines:  # amide coupling
            out.append(f"{r}C(=O)O.{am}.{reagents[k % len(reagents)]}>>{r}C(=O){am}")
            k += 1
        for al in alcohols:  # esterification with the acid chloride
            out.append(f"{r}C(=O)Cl.{al}.{reagents[(k + 3) % len(reagents)]}>>{r}C(=O){al}")
            k += 1
    for a in aryl:
        for b in aryl[:8]:  # Suzuki coupling
            out.append(f"Br{a}.OB(O){b}.{reagents[k % len(reagents)]}>>{a}-{b}")
            k += 1
        for am in amines[:6]:  # reductive amination
            if am.startswith("N1"):
                continue
            out.append(f"O=C{a}.{am}.[BH3-]C#N.[Na+]>>{a}C{am}")
            k += 1
    return out


TOKEN_RE = re.compile(r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>>?|\*|\$|\%[0-9]{2}|[0-9])")


def tokenize(s):
    toks = ["[CLS]"] + TOKEN_RE.findall(s) + ["[SEP]"]
    return torch.tensor([vocab.get(t, vocab["[UNK]"]) for t in toks])


rx = reactions()
rng = np.random.default_rng(0)
order = rng.permutation(len(rx))
# Disjoint halves (at most QUALITY_REACTIONS reactions each, default 160: the run stays short).
n = min(len(rx) // 2, int(os.environ.get("QUALITY_REACTIONS", "160")))
cal, ev = [rx[i] for i in order[:n]], [rx[i] for i in order[len(rx) // 2: len(rx) // 2 + n]]
unk = sum(int((tokenize(s) == vocab["[UNK]"]).sum()) for s in rx)
print(f"{len(rx)} reactions ({len(cal)} calibration, {len(ev)} evaluation), {unk} unknown tokens")

# float checkpoint for nibble: the encoder, embeddings and MLM head as stored
from safetensors.numpy import save_file  # noqa: E402

float_path = os.path.join(WORK, "rxnfp_bert.safetensors")
save_file({k: v.float().numpy() for k, v in sd.items() if k.startswith(("bert.", "cls."))}, float_path)

calib_path, acts_path = os.path.join(WORK, "calib.safetensors"), os.path.join(WORK, "eval_acts.safetensors")
torch.set_num_threads(1)
reuse = os.environ.get("QUALITY_REUSE") == "1" and os.path.exists(calib_path) and os.path.exists(acts_path)
with torch.no_grad():
  if not reuse:
    with calib.Recorder(encoder, calib_path, sample_rows=256, prefix="bert.encoder.") as rec:
        for s in cal:
            forward(tokenize(s))
    with calib.Recorder(encoder, None, sample_rows=1024, prefix="bert.encoder.", seed=99) as ev_rec:
        for s in ev:
            forward(tokenize(s))
    calib.write_stats(acts_path, {n: {"sample": st["sample"]} for n, st in ev_rec.stats().items()})
    rows = {n: st.count for n, st in rec.layers.items()}
    print(f"calibration rows per layer: {min(rows.values())}; evaluation rows kept per layer: 1024 of "
          f"{min(s.count for s in ev_rec.layers.values())}")


# ------------------------------------------------------------------ convert + verify
def run(fmt, variant, rule):
    out = os.path.join(WORK, f"q_{fmt}_{variant}.safetensors")
    rep = os.path.join(WORK, f"q_{fmt}_{variant}.json")
    flags = ["--search", "legacy"] if variant == "legacy" else ["--gptq"] if variant == "gptq" else []
    t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    # one thread: CPU time (user + sys) is the figure that survives a loaded host
    sh(NIBBLE, "-q", "-t", "1", "convert", float_path, "-o", out, "--tensor-type", rule, "--calib", calib_path,
       "--json", rep, *flags)
    wall, r1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    v = json.loads(sh(NIBBLE, "verify", out, "--against", float_path, "--inputs", acts_path, "--json"))
    recs = [r for r in v if not r.get("summary")]
    assert all(r["inputs"] == "real" for r in recs), "verify fell back to random inputs"
    snr = [r["snr_db"] for r in recs]
    j = json.load(open(rep))
    edge = sum(1 for l in j["layers"] if l.get("alpha_on_grid_edge"))
    return {"layers": len(snr), "mean_snr_db": float(np.mean(snr)), "min_snr_db": float(np.min(snr)),
            "convert_seconds": j["seconds"], "wall_seconds": wall, "cpu_seconds": cpu, "alpha_on_edge": edge,
            "per_layer": {r["layer"]: r["snr_db"] for r in recs}}


results = {}
only = os.environ.get("QUALITY_ONLY", "")
for fmt, rule in (("svdquant_w4a4", r"encoder=svdquant_w4a4:rank=32"), ("awq_w4a16", r"encoder=awq_w4a16")):
    if only and only != fmt:
        continue
    for search in ("legacy", "full", "gptq"):
        results[f"{fmt}/{search}"] = run(fmt, search, rule)
        r = results[f"{fmt}/{search}"]
        print(f"{fmt:14} {search:7} layers {r['layers']}  mean SNR {r['mean_snr_db']:6.2f} dB  min {r['min_snr_db']:6.2f} dB"
              f"  convert {r['convert_seconds']:.1f} s wall, {r['cpu_seconds']:.2f} s CPU  α on grid edge {r['alpha_on_edge']}")
for fmt in ("svdquant_w4a4", "awq_w4a16"):
    if only and only != fmt:
        continue
    a = results[f"{fmt}/legacy"]
    for v in ("full", "gptq"):
        b = results[f"{fmt}/{v}"]
        print(f"{fmt} {v}: {b['mean_snr_db'] - a['mean_snr_db']:+.2f} dB mean per-layer output SNR over legacy, "
              f"conversion CPU time ×{b['cpu_seconds'] / max(a['cpu_seconds'], 1e-9):.2f} (wall ×"
              f"{b['convert_seconds'] / max(a['convert_seconds'], 1e-9):.2f})")
json.dump(results, open(os.path.join(WORK, "quality_convert.json"), "w"), indent=1)
print("details:", os.path.join(WORK, "quality_convert.json"))
