"""The Hugging Face rollout engine: the policy's model in this process, shared-prefix sampling.

``set_z`` merges ``W'(z)`` into the model in place (``policy.merge_``: SVF recomposes its
targets, LoRA writes its adapters), ``generate`` runs :func:`t2dist.engines.generation.generate_shared`:
each prompt is prefilled once and its ``n`` samples decode from copies of its KV cache.  With
``batch_size`` a multiple of ``n`` it samples exactly the tokens ``t2dist.engines.generation.generate``
samples for the same seed (tests/test_engines.py), at a fraction of the prefill cost: on
SmolLM2 with ARC-Easy chat prompts (~130 tokens) × 8 samples the prefill is most of the work
(figures in bench/results/).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from t2dist.engines.base import Prompt, RolloutEngine, z_nbytes
from t2dist.engines.generation import Completion, generate_shared


class HFEngine(RolloutEngine):
    name = "hf"

    def __init__(self, cfg, *, policy=None, tokenizer=None, batch_size: int | None = None):
        """Loads ``policy.kind``'s policy from ``cfg`` unless ``policy``/``tokenizer`` are given (shared)."""
        if policy is None:
            from t2dist.policy.load import load_policy

            policy, tokenizer = load_policy(cfg)
        self.policy, self.tokenizer = policy, tokenizer
        self.batch_size = batch_size or cfg.rollout.batch_size
        self.version = None

    @property
    def model(self):
        return self.policy.model

    def set_z(self, z: Mapping[str, torch.Tensor], version: object) -> int:
        if version is None or version != self.version:
            self.policy.merge_(z, version)
            self.version = version
        return z_nbytes(z)

    def unset_z(self) -> None:
        self.policy.unmerge_()
        self.version = None

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 32, stop: Sequence[str] = ("\n",), seed: int | None = None) -> list[Completion]:
        out = generate_shared(self.policy.model, self.tokenizer, prompts, num_samples=n, temperature=temperature,
                              top_p=top_p, max_new_tokens=max_new_tokens, stop=stop, batch_size=self.batch_size,
                              seed=seed)
        if torch.cuda.is_available():  # the KV caches are garbage now: give them back to a colocated learner rank
            torch.cuda.empty_cache()
        return out

    def generate_requests(self, requests):
        """Per-request parameters, token streaming and early stops on the shared-prefix sampler
        (:func:`t2dist.engines.requests.generate_requests_shared`: one decode loop per compatible sub-group)."""
        from t2dist.engines.requests import generate_requests_shared

        return generate_requests_shared(self.policy.model, self.tokenizer, requests, batch_size=self.batch_size)

    def info(self) -> dict:
        return {**super().info(), "device": str(next(self.policy.model.parameters()).device)}
