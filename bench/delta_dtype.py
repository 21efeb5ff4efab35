"""svf.delta_dtype=auto on this CPU and on it acting as an AVX2-only one: what auto picks, and one recompose.

    python bench/delta_dtype.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/delta_dtype.py   # an AVX2-only CPU's kernels

One SmolLM2 MLP recompose ``(U * S) @ Vᵀ`` (1536×576 by 576×576), median of 10, 1 thread, float32 and bf16,
with what ``t2dist.hardware.bf16_matmul`` decides (the rule behind ``svf.delta_dtype: auto``).  One JSON line.
"""
import time, torch, json
from t2dist.hardware import bf16_matmul, machine_line
torch.set_num_threads(1)
U=torch.randn(1536,576); S=torch.randn(576); V=torch.randn(576,576)
def t(dtype):
    u,v,s=U.to(dtype),V.to(dtype),S.to(dtype)
    for _ in range(3): (u*s)@v.T
    ts=[]
    for _ in range(10):
        t0=time.perf_counter(); (u*s)@v.T; ts.append(time.perf_counter()-t0)
    return sorted(ts)[len(ts)//2]*1e3
print(json.dumps({"machine": machine_line(), "auto_bf16": bf16_matmul("cpu"), "fp32_ms": round(t(torch.float32),2), "bf16_ms": round(t(torch.bfloat16),2)}))
