"""The policy contract: what every policy kind (SVF, LoRA, the learner's sharded SVF) provides.

A *policy* is a frozen base causal LM plus a small set of trainable tensors, ``z``
(SVF: one vector of singular-value scales per target matrix, 1,536 values on the toy's
MLP; LoRA r=16 on q/v: the adapters' A and B). RL trains only ``z``; the rest of the
pipeline (rollouts, the learner, experts on disk, export, self-adaptation) talks to a
policy through :class:`Policy` alone and never asks which kind it holds. Adding a kind is
one module implementing this protocol plus one line in :mod:`t2dist.policy.registry`.

The two execution paths every kind has:

* learning: ``policy(z, **inputs)`` / :meth:`Policy.forward` runs the model with ``z``
  substituted, differentiable in ``z`` only (base weights never require grad);
* generation: :meth:`Policy.merge_` writes ``z`` into the model in place (``policy.model``
  is then an ordinary HF model for ``generate``), :meth:`Policy.unmerge_` restores the base
  weights exactly (bit for bit: merge keeps a copy or re-loads the neutral tensors).

``neutral_z()`` reproduces the base model (logits equal to float tolerance): it is the KL
reference, so no second model copy exists. A sharded learner policy never generates:
its ``merge_``/``merged_model`` raise ``NotImplementedError``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

Z = dict[str, torch.Tensor]


@runtime_checkable
class Policy(Protocol):
    """What the pipeline may use of a policy (instance side); the class side is :class:`PolicyKind`."""

    kind: ClassVar[str]
    model: nn.Module
    targets: list[str]  # the adapted modules of ``model``, in a fixed order
    fingerprint: str  # of the *base* weights (t2dist.svf.factors.fingerprint)
    target_spec: str  # what the config said (preset, suffix list or regex)
    rank: int | None
    parametrization: Any  # what the tensors mean; ``to_dict()``, ``scale()``, ``statistics()``, ``same_function()``
    merged_version: object  # what is merged in now (None: the base weights)

    @property
    def num_z(self) -> int: ...

    def z_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{tensor name: shape}`` of a valid ``z``, in the order the optimizer sees them."""

    def init_z(self, scale: float = 1.0) -> Z:
        """The starting ``z`` (SVF: every scale ``f(z) = scale``; LoRA: seeded A, B = 0)."""

    def neutral_z(self) -> Z:
        """The ``z`` that reproduces the base model."""

    def check_z(self, z: Mapping[str, torch.Tensor]) -> None:
        """KeyError (missing/unexpected names) or ValueError (a wrong shape), before any work."""

    def forward(self, z: Mapping[str, torch.Tensor], **inputs) -> Any:
        """The learning path: the HF model's output with ``z`` substituted, differentiable in ``z``."""

    def __call__(self, z: Mapping[str, torch.Tensor], **inputs) -> Any: ...

    def bind(self, z: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
        """``forward`` with ``z`` fixed, for several model calls inside one backward pass (the learner's
        shared-prefix forward calls the model for the prompts, then for the completions on their KV
        cache): what depends on ``z`` alone (SVF's adapted weights) is computed once for all calls."""

    def delta(self, target: str, z: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weight change ``W' − W`` that ``z`` makes to ``target`` (compute dtype)."""

    def merge_(self, z: Mapping[str, torch.Tensor], version: object = True) -> None:
        """The generation path: write ``z`` into ``model`` in place."""

    def unmerge_(self) -> None:
        """Back to the base weights exactly."""

    def merged_model(self, z: Mapping[str, torch.Tensor], version: object = True
                     ) -> contextlib.AbstractContextManager[nn.Module]:
        """A plain HF model (no t2dist or peft layers) with ``z`` baked in, for export."""

    def card_fields(self) -> dict[str, Any]:
        """What an expert card records about the policy (kind, parametrization, targets, rank, fingerprint…)."""

    def memory(self) -> dict[str, int]:
        """Resident bytes worth reporting (factors, target weights…); ``{}`` when there is nothing special."""


class PolicyKind(Protocol):
    """The class side of a policy kind: what works from a config or a card, before a model exists."""

    kind: ClassVar[str]
    #: the kind can be mixed linearly (``mix_z``) and dispatched by self-adaptation
    mixable: ClassVar[bool]
    #: the learner can shard it over ranks (``learner.shard_factors``)
    shardable: ClassVar[bool]
    #: heading of ``t2dist expert show``'s statistics
    stats_title: ClassVar[str]
    #: its settings, a :class:`t2dist.config_section.Section` (the config section named after the kind); optional
    Config: ClassVar[type]

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, verbose: bool = False) -> Policy:
        """Wrap an already-loaded base model as configured (``cfg.svf`` / ``cfg.lora``)."""

    @staticmethod
    def parametrization_from_config(cfg: Any) -> Any: ...

    @staticmethod
    def parametrization_from_card(card: Mapping[str, Any]) -> Any: ...

    @staticmethod
    def config_overrides(card: Mapping[str, Any]) -> dict[str, Any]:
        """``{dotted config key: value}`` that rebuild the policy a card describes (``None``: null)."""


def check_z_shapes(z: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str = "z") -> None:
    """The one ``check_z``: every name present, nothing extra, every shape right.

    Raises KeyError naming up to three missing and unexpected names, or ValueError naming
    the tensor and both shapes.
    """
    missing = [n for n in shapes if n not in z]
    extra = [n for n in z if n not in shapes]
    if missing or extra:
        raise KeyError(f"{what} does not match the policy's tensors: missing {missing[:3]}, unexpected {extra[:3]}"
                       f"{f' ({len(missing)} missing in all)' if len(missing) > 3 else ''}")
    for n, shape in shapes.items():
        if tuple(z[n].shape) != tuple(shape):
            raise ValueError(f"{what}[{n!r}] has shape {tuple(z[n].shape)}, expected {tuple(shape)}")


def card_fields_of(policy: Policy, **extra: Any) -> dict[str, Any]:
    """The card fields every kind shares, plus kind-specific ``extra`` sections."""
    return {
        "kind": policy.kind,
        "parametrization": policy.parametrization.to_dict(),
        "targets": list(policy.targets),
        "target_spec": policy.target_spec,
        "rank": policy.rank,
        "base_fingerprint": policy.fingerprint,
        "num_z": policy.num_z,
        **extra,
    }


@contextlib.contextmanager
def merged_in_place(policy: Policy, z: Mapping[str, torch.Tensor], version: object = True) -> Iterator[nn.Module]:
    """``merged_model`` for kinds whose ``merge_`` leaves a plain model: merge, yield, unmerge."""
    policy.merge_(z, version)
    try:
        yield policy.model
    finally:
        policy.unmerge_()
