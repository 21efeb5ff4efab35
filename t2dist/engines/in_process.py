"""Sampling from a policy whose model lives in this process: the HF engine without its config loading.

``set_z`` merges ``W'(z)`` into the model in place (``policy.merge_``: SVF recomposes its
targets, LoRA writes its adapters), ``generate`` runs :func:`t2dist.engines.generation.generate_shared`:
each prompt is prefilled once and its ``n`` samples decode from copies of its KV cache.  With
``batch_size`` a multiple of ``n`` it samples exactly the tokens ``t2dist.engines.generation.generate``
samples for the same seed (tests/test_engines.py), at a fraction of the prefill cost: on
SmolLM2 with ARC-Easy chat prompts (~130 tokens) × 8 samples the prefill is most of the work
(figures in bench/results/).

The engine's :attr:`version` is the policy's ``merged_version``: the weights it generates with
are the policy model's, so two engines over one policy (train-local's rollout and evaluation
engines) never disagree about what is merged.

:class:`t2dist.engines.hf.HFEngine` (``rollout.engine=hf``) is this engine built from a config.
This module loads nothing itself, so that low layers can evaluate a plain model without the
policy loader (:func:`base_model_engine`: the toy build, which the model loader calls, measures
its accuracy through it).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from t2dist.engines.base import Prompt, RolloutEngine, UnnamedZ, z_nbytes
from t2dist.engines.generation import Completion, generate_shared
from t2dist.engines.requests import generate_requests_shared


class InProcessEngine(RolloutEngine):
    """The HF engine over a policy (SVF, LoRA or :class:`PlainModel`) already loaded in this process."""

    name = "hf"

    def __init__(self, policy, tokenizer, batch_size: int):
        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size

    @property
    def model(self):
        return self.policy.model

    @property
    def version(self) -> object:
        """What the policy's model holds merged (None: the base weights): see the module docstring."""
        return self.policy.merged_version

    def set_z(self, z: Mapping[str, torch.Tensor], version: object) -> int:
        if version is None or version != self.version:
            self.policy.merge_(z, UnnamedZ() if version is None else version)
        return z_nbytes(z)

    def unset_z(self) -> None:
        self.policy.unmerge_()

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
        return generate_requests_shared(self.policy.model, self.tokenizer, requests, batch_size=self.batch_size)

    def info(self) -> dict:
        return {**super().info(), "device": str(next(self.policy.model.parameters()).device)}


class PlainModel:
    """A Hugging Face model with nothing to train, as an engine's policy: only the base weights."""

    merged_version = None

    def __init__(self, model):
        self.model = model

    def merge_(self, z, version: object = True) -> None:
        raise TypeError("a plain model has no z to set: wrap it in a policy (t2dist.policy.load.load_policy)")

    def unmerge_(self) -> None:
        """Nothing was merged."""


def base_model_engine(model, tokenizer, batch_size: int = 64) -> InProcessEngine:
    """The in-process engine over a plain model (no policy, no config): greedy evaluation of a base model."""
    return InProcessEngine(PlainModel(model), tokenizer, batch_size)
