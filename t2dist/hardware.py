"""What this machine computes natively, decided once per process and said once.

``svf.delta_dtype: auto`` builds SVF's weight change ``U diag(S'-S) Vᵀ`` in bfloat16 only where
bf16 matrix multiplication is native: a CUDA device with bf16, or a CPU with AVX512-BF16 or AMX.
Elsewhere bf16 is emulated and slower than float32: on an AMD EPYC with AVX2 only, one bf16
1536×576×576 recompose took 111.8 ms against 15.7 ms in float32 (7×), and SmolLM2 arith steps took
75–88 s against ~20 s (issue 25); on an EPYC with AVX512-BF16 bf16 rebuilds SmolLM2's 90 MLP
matrices 5.5× faster than float32 (bench/shared_prefix.py).
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def bf16_matmul(device_type: str) -> tuple[bool, str]:
    """``(native, why)``: whether bf16 matmul is native on this process's ``device_type`` (cpu or cuda)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return True, f"{name} has bf16"
        return False, f"{name} has no native bf16"
    capability = torch.backends.cpu.get_cpu_capability()  # ATEN_CPU_CAPABILITY=avx2 makes an AVX512 CPU act as AVX2
    if not capability.startswith("AVX512"):
        return False, f"torch runs the CPU at {capability} (bf16 would be emulated, ~7x slower than float32)"
    avx512_bf16, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
    if avx512_bf16 or amx:
        return True, f"the CPU has {' and '.join(n for n, ok in (('AVX512-BF16', avx512_bf16), ('AMX', amx)) if ok)}"
    return False, "the CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, ~7x slower than float32)"
