"""nibble vs comfy-kitchen eager on CPU through the kitchen registry, one process, best of N.

Run in the test-kitchen venv:  .venv-kitchen/bin/python python/bench_kitchen.py
Shapes: the Qwen-Image modulation AWQ layer (spec §7) and a 3072x3072 SVDQuant layer at M=256.
"""
import time, torch, numpy as np, comfy_kitchen as ck, nibble, nibble.kitchen
torch.manual_seed(0)
def best(f, n=5):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)
dt=torch.bfloat16
# AWQ modulation layer (spec §7): N=18432, K=3072, M=1
n,k=18432,3072
x=torch.randn(1,k).to(dt); q=torch.randint(-128,128,(n,k//2),dtype=torch.int8)
s=(torch.rand(k//64,n)*0.01).to(dt); z=(torch.randn(k//64,n)*0.01).to(dt); b=torch.randn(n).to(dt)
kw=dict(x=x,qweight=q,wscales=s,wzeros=z,bias=b,group_size=64)
tn=best(lambda: torch.ops.comfy_kitchen.gemv_awq_w4a16(**kw))
def e():
    with ck.use_backend("eager"): torch.ops.comfy_kitchen.gemv_awq_w4a16(**kw)
te=best(e,3)
print(f"awq M=1 N={n} K={k} bf16: nibble(via kitchen) {tn*1e3:.2f} ms, eager {te*1e3:.1f} ms, ratio {te/tn:.1f}x")
# svdquant layer N=K=3072, M=256, R=64
m,n,k,r=256,3072,3072,64
x=torch.randn(m,k).to(dt); sm=(torch.rand(k)+0.5).to(dt); dn=(torch.randn(k,r)*0.05).to(dt)
w=torch.randint(-128,128,(n,k//2),dtype=torch.int8); ws=(torch.rand(k//64,n)*0.01).to(dt); up=(torch.randn(n,r)*0.05).to(dt)
def layer():
    qx,a,la=torch.ops.comfy_kitchen.quantize_svdquant_w4a4(x,sm,dn,256,False,None)
    return torch.ops.comfy_kitchen.scaled_mm_svdquant_w4a4(qx,w,a,ws,la,up,b[:n],False)
tn=best(layer)
def le():
    with ck.use_backend("eager"): layer()
te=best(le,3)
print(f"svdquant quantize+scaled_mm M={m} N={n} K={k} R={r} bf16: nibble {tn*1e3:.1f} ms, eager {te*1e3:.1f} ms, ratio {te/tn:.1f}x")
print("threads", nibble.num_threads(), "torch threads", torch.get_num_threads(), "isa", nibble.isa())
