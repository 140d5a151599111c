"""nibble vs comfy-kitchen eager on CPU through the kitchen registry, one process.

Run in the test-kitchen venv:  .venv-kitchen/bin/python python/bench_kitchen.py [TRIES]
Shapes: the Qwen-Image modulation AWQ layer (spec §7) and a 3072x3072 SVDQuant layer at M=256.
Both backends get the same number of timed tries (after one untimed warm-up each), taken
interleaved (nibble, eager, nibble, eager, ...) so that both see the same host load; the report is
the median (statistics.median: the mean of the two middle values for an even count) and the best.
"""
import statistics
import sys
import time

import comfy_kitchen as ck
import torch

import nibble
import nibble.kitchen  # noqa: F401  (registers the backend)

TRIES = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.manual_seed(0)


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def compare(nib, eager, tries=TRIES):
    """Interleaved timing, the same number of tries for both; returns (median, best) per side."""
    nib()
    eager()  # warm-up, untimed
    tn, te = [], []
    for _ in range(tries):
        tn.append(timed(nib))
        te.append(timed(eager))
    return (statistics.median(tn), min(tn)), (statistics.median(te), min(te))


def eager_of(f):
    def run():
        with ck.use_backend("eager"):
            f()
    return run


dt = torch.bfloat16
# AWQ modulation layer (spec §7): N=18432, K=3072, M=1
n, k = 18432, 3072
x = torch.randn(1, k).to(dt)
q = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8)
s = (torch.rand(k // 64, n) * 0.01).to(dt)
z = (torch.randn(k // 64, n) * 0.01).to(dt)
b = torch.randn(n).to(dt)
kw = dict(x=x, qweight=q, wscales=s, wzeros=z, bias=b, group_size=64)


def awq():
    torch.ops.comfy_kitchen.gemv_awq_w4a16(**kw)


(tn, bn), (te, be) = compare(awq, eager_of(awq))
print(f"awq M=1 N={n} K={k} bf16, {TRIES} tries each: nibble(via kitchen) median {tn*1e3:.2f} ms "
      f"(best {bn*1e3:.2f}), eager median {te*1e3:.1f} ms (best {be*1e3:.1f}), ratio of medians {te/tn:.1f}x")

# svdquant layer N=K=3072, M=256, R=64
m, n, k, r = 256, 3072, 3072, 64
x = torch.randn(m, k).to(dt)
sm = (torch.rand(k) + 0.5).to(dt)
dn = (torch.randn(k, r) * 0.05).to(dt)
w = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8)
ws = (torch.rand(k // 64, n) * 0.01).to(dt)
up = (torch.randn(n, r) * 0.05).to(dt)


def layer():
    qx, a, la = torch.ops.comfy_kitchen.quantize_svdquant_w4a4(x, sm, dn, 256, False, None)
    return torch.ops.comfy_kitchen.scaled_mm_svdquant_w4a4(qx, w, a, ws, la, up, b[:n], False)


(tn, bn), (te, be) = compare(layer, eager_of(layer))
print(f"svdquant quantize+scaled_mm M={m} N={n} K={k} R={r} bf16, {TRIES} tries each: nibble median "
      f"{tn*1e3:.1f} ms (best {bn*1e3:.1f}), eager median {te*1e3:.1f} ms (best {be*1e3:.1f}), "
      f"ratio of medians {te/tn:.1f}x")
print("threads", nibble.num_threads(), "torch threads", torch.get_num_threads(), "isa", nibble.isa())
