"""The one interface every rollout engine implements (the seam between RL code and inference).

Rollout actors, the evaluator and adaptation call only this: build from a config (base model
plus the policy's factors/adapters), ``set_z(z, version)``, ``generate(...)``, ``unset_z()``,
``close()``.  Nothing outside an engine module asks which engine it holds.  ``set_z`` takes
the trainable tensors only (for SVF: one ``z`` per target, kilobytes), never weights: an
engine recomposes ``W'`` itself, in this process (HF) or in its own worker process (vLLM).

``generate`` returns one :class:`t2dist.engines.generation.Completion` per sample, grouped per prompt
in prompt order: ``completion_ids`` (up to and including the token that stopped it),
``text`` (stop string excluded), ``stop_reason`` (``stop`` | ``length``) and ``logprobs``: the
sampled tokens' log-probabilities under the engine's raw (temperature 1) distribution, which
is what the learner computes, so the two can be compared and importance-weighted.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from t2dist.engines.generation import Completion
from t2dist.engines.requests import generate_requests_batched
from t2dist.errors import UserError

if TYPE_CHECKING:
    from t2dist.engines.requests import GenRequest

Prompt = str | Sequence[int]


class EngineDied(UserError, RuntimeError):
    """The engine's own process (e.g. vLLM's engine core) is gone; the engine cannot be used any more."""


class UnnamedZ:
    """The version of a ``z`` set without one: equal only to itself."""

    def __repr__(self) -> str:
        return "<unnamed z>"


def z_nbytes(z: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a set of z tensors (what a weight sync sends)."""
    return sum(t.numel() * t.element_size() for t in z.values())


class RolloutEngine(ABC):
    """Samples completions from a base model adapted by the current z (see the module docstring).

    Subclasses set ``self.policy`` (the SVF or LoRA policy object: fingerprint, targets,
    ``check_z``; for the HF engine it also holds the model that generates) and ``self.tokenizer``.
    :attr:`version` says which weights the engine generates with; the engine is its only source
    of truth, and only its own ``set_z`` / ``unset_z`` change it (a subclass keeps it in
    ``self._version``, or overrides the property).
    """

    name: str = ""
    policy: object
    tokenizer: object
    _version: object = None

    @property
    def version(self) -> object:
        """The ``version`` of the last :meth:`set_z` (None: the base weights); read-only."""
        return self._version

    @abstractmethod
    def set_z(self, z: Mapping[str, torch.Tensor], version: object) -> int:
        """Make ``W'(z)`` the weights that generate (a no-op when ``version`` is already set); returns bytes sent.

        ``version`` None always sets ``z``, which the engine then holds as an :class:`UnnamedZ` version (never
        None, which means the base weights, and equal to no other)."""

    @abstractmethod
    def unset_z(self) -> None:
        """Back to the base model's weights."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 32, stop: Sequence[str] = ("\n",), seed: int | None = None) -> list[Completion]:
        """``n`` completions of every prompt (text or token ids), grouped per prompt, in order."""

    # -- serving (t2dist serve): per-request parameters, streaming, early stops -------------------
    def generate_requests(self, requests: Sequence["GenRequest"]) -> list[list[Completion]]:
        """One list of ``n`` completions per :class:`~t2dist.engines.requests.GenRequest`, each request with its
        own sampling parameters (batched where they allow it).  This fallback calls :meth:`generate` once per
        distinct parameter set and streams each text whole; the HF and vLLM engines stream token by token."""
        return generate_requests_batched(self, requests)

    def close(self) -> None:
        """Free what the engine holds (processes, memory); the engine is unusable afterwards."""

    def info(self) -> dict:
        """What the engine is (for ``ready()`` and logs)."""
        return {"engine": self.name, "version": self.version}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
