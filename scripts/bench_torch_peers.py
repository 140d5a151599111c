"""nibble (through the kitchen ops ComfyUI calls) against plain PyTorch bf16 on CPU, one process.

Run by `make bench-torch` (scripts/test_kitchen.sh --bench-peers sets up the torch + comfy-kitchen
venv), or by hand in such a venv:  python scripts/bench_torch_peers.py [TRIES]

The peer is what a ComfyUI user on CPU gets without nibble for the same layer: the bf16 weight and
`torch.nn.functional.linear` in bf16 (oneDNN under torch, weight not pre-reordered). `nibble bench`
has the stronger peer (oneDNN's matmul with the weight reordered once for the exact M); this script
gives the figure in the terms of issue 16's table. Shapes: the issue's (Qwen-Image attention /
MLP linears for W4A4, the modulation linear for AWQ).

Both sides run with the same thread count (nibble's pool size), after one untimed warm-up each,
interleaved (nibble, torch, nibble, ...) so that both see the same host load; reported: medians
and the ratio of medians (torch / nibble: > 1 means nibble is faster). Weights are random (the
arithmetic cost does not depend on the values).
"""
import json
import statistics
import sys
import time

import torch

import nibble
import nibble.kitchen  # noqa: F401  (registers the backend ahead of eager)

TRIES = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.manual_seed(0)
torch.set_num_threads(nibble.num_threads())
DT = torch.bfloat16
ops = torch.ops.comfy_kitchen


def median_pair(a, b, tries):
    a()
    b()  # warm-up, untimed (also builds nibble's prepared-weight cache, as a ComfyUI run would)
    ta, tb = [], []
    for _ in range(tries):
        for f, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def awq_case(m, n=18432, k=3072, g=64):
    x = torch.randn(m, k).to(DT)
    q = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8)
    s = (torch.rand(k // g, n) * 0.01).to(DT)
    z = (torch.randn(k // g, n) * 0.01).to(DT)
    w = torch.randn(n, k).to(DT)

    def nib():
        ops.gemv_awq_w4a16(x, q, s, z, None, g)

    def peer():
        torch.nn.functional.linear(x, w)

    return dict(op="awq_w4a16", M=m, N=n, K=k), nib, peer


def w4a4_case(m, n, k, r=32):
    x = torch.randn(m, k).to(DT)
    sm = (torch.rand(k) + 0.5).to(DT)
    dn = (torch.randn(k, r) * 0.05).to(DT)
    q = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8)
    ws = (torch.rand(k // 64, n) * 0.01).to(DT)
    up = (torch.randn(n, r) * 0.05).to(DT)
    w = torch.randn(n, k).to(DT)

    def nib():
        qx, a, la = ops.quantize_svdquant_w4a4(x, sm, dn, 256, False, None)
        ops.scaled_mm_svdquant_w4a4(qx, q, a, ws, la, up, None, False)

    def peer():
        torch.nn.functional.linear(x, w)

    return dict(op="svdquant_w4a4 (quantize + scaled_mm)", M=m, N=n, K=k, R=r), nib, peer


def main():
    cases = [awq_case(1), awq_case(16), awq_case(64), w4a4_case(4096, 3072, 3072), w4a4_case(4096, 12288, 3072)]
    print(f"# nibble {nibble.__version__} isa {nibble.isa()} threads {nibble.num_threads()} | "
          f"torch {torch.__version__} threads {torch.get_num_threads()} | {TRIES} interleaved tries per case")
    for info, nib, peer in cases:
        tn, tp = median_pair(nib, peer, TRIES)
        info.update(nibble_ms=round(tn * 1e3, 3), torch_bf16_ms=round(tp * 1e3, 3),
                    speedup_vs_torch_bf16=round(tp / tn, 3))
        print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
