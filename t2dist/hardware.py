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
import os
import platform
import shlex
import sys

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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device_type: str = "cpu") -> str:
    """One line for a card or a result: the device, what torch runs it at, and the cores this process may use."""
    if device_type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    native, why = bf16_matmul("cpu")
    return (f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if native else 'emulated'}), "
            f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores")


def command_line(argv: list[str] | None = None) -> str:
    """How this process was started, as a user would type it: ``t2dist train ...`` for the console script or
    ``python -m t2dist``, ``python -m pytest ...`` for another package's ``__main__``, else the script's path."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    first = argv[0].replace(os.sep, "/")
    if os.path.basename(first) == "t2dist" or first.endswith("t2dist/__main__.py"):
        head = ["t2dist"]
    elif os.path.basename(first) == "__main__.py":
        head = ["python", "-m", os.path.basename(os.path.dirname(first))]
    else:
        head = [argv[0]]
    return shlex.join([*head, *argv[1:]])
