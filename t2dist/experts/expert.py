"""Experts on disk: ``z.safetensors`` + ``card.json``.

The card says what the ``z`` vectors mean (parametrization, targets, rank) and which
base model they belong to (its fingerprint); loading refuses any mismatch.  ``kind`` is
a policy kind of :mod:`t2dist.policy.registry` (``svf``: singular-value scales, and cards
written before LoRA existed have no ``kind`` and are SVF; ``lora``: ``z.safetensors`` holds
the adapters' A and B). What a card records about the policy comes from the policy itself
(``card_fields``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

import t2dist
from t2dist.errors import UserError
from t2dist.policy.base import Policy
from t2dist.policy.registry import POLICIES, PolicyKindError
from t2dist.policy.registry import card_kind as _card_kind
from t2dist.policy.registry import parametrization_of as _parametrization_of

Z_FILE = "z.safetensors"
CARD_FILE = "card.json"
REQUIRED_CARD_FIELDS = (
    "name", "task", "parametrization", "targets", "rank", "base_fingerprint",
    "metrics", "config", "code_version", "created",
)


class ExpertError(UserError, ValueError):
    """An expert that is malformed or belongs to another base model / target list."""


@dataclass
class Expert:
    z: dict[str, torch.Tensor]
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.card.get("name", "")

    @property
    def kind(self) -> str:
        return card_kind(self.card)

    @property
    def parametrization(self):
        return parametrization_of(self.card)


def card_kind(card: Mapping[str, Any]) -> str:
    """The card's policy kind (cards without ``kind`` predate LoRA: svf); an unknown kind is an ExpertError."""
    try:
        return _card_kind(card)
    except PolicyKindError:
        raise ExpertError(f"expert card kind {card.get('kind')!r} is unknown; known kinds: "
                          f"{', '.join(sorted(POLICIES))}") from None


def parametrization_of(card: Mapping[str, Any]):
    """What the card's tensors mean (an ExpertError for an unknown kind)."""
    card_kind(card)
    return _parametrization_of(card)


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    version = t2dist.__version__
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if sha:
            version += f"+g{sha}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def make_card(policy: Policy, *, name: str, task: str, metrics: Mapping | None = None,
              config: Mapping | None = None, base_model: str = "", **extra: Any) -> dict[str, Any]:
    """The card of an expert of ``policy`` (its ``card_fields`` plus what the run knows)."""
    return {
        "name": name,
        "task": task,
        **policy.card_fields(),
        "base_model": base_model,
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def save_expert(path: str | os.PathLike, z: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> Path:
    """Write an expert directory atomically: a temporary sibling, then a rename.

    An existing expert at ``path`` is replaced only once the new one is complete.
    """
    missing = [k for k in REQUIRED_CARD_FIELDS if k not in card]
    if missing:
        raise ExpertError(f"expert card is missing fields: {', '.join(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in z.items()}, str(tmp / Z_FILE))
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_expert(path: str | os.PathLike) -> Expert:
    """Read an expert directory without checking it against a model."""
    path = Path(path)
    if not path.is_dir():
        raise ExpertError(f"expert {path} does not exist (expected a directory with {Z_FILE} and {CARD_FILE})")
    for f in (Z_FILE, CARD_FILE):
        if not (path / f).is_file():
            raise ExpertError(f"expert {path} has no {f}")
    try:
        card = json.loads((path / CARD_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ExpertError(f"{path / CARD_FILE} is not valid JSON: {exc}") from None
    missing = [k for k in REQUIRED_CARD_FIELDS if k not in card]
    if missing:
        raise ExpertError(f"{path / CARD_FILE} is missing fields: {', '.join(missing)}")
    try:
        z = load_file(str(path / Z_FILE))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ExpertError(f"{path / Z_FILE} cannot be read: {exc}") from None
    return Expert(z=z, card=card)


def check_compatible(expert: Expert, policy: Policy, source: str = "expert") -> None:
    """Refuse an expert made for another base model, policy kind, target list, rank or parametrization."""
    card = expert.card
    kind, model_kind = card_kind(card), policy.kind
    if kind != model_kind:
        raise ExpertError(f"{source} is a {kind} expert, but the model is set up for {model_kind} "
                          f"(policy.kind={model_kind}); set policy.kind={kind}")
    if card["base_fingerprint"] != policy.fingerprint:
        raise ExpertError(
            f"{source} was trained on base model {card.get('base_model') or '?'} "
            f"(fingerprint {card['base_fingerprint']}), but this model's fingerprint is {policy.fingerprint}"
        )
    if list(card["targets"]) != list(policy.targets):
        raise ExpertError(
            f"{source} targets {len(card['targets'])} matrices (spec {card.get('target_spec', '?')!r}, "
            f"first {card['targets'][:1]}), but this model has {len(policy.targets)} targets "
            f"(spec {policy.target_spec!r}, first {policy.targets[:1]})"
        )
    if card["rank"] != policy.rank:
        raise ExpertError(f"{source} has rank {card['rank']}, but the model's {kind} policy has rank {policy.rank}")
    if not parametrization_of(card).same_function(policy.parametrization):
        raise ExpertError(
            f"{source} uses parametrization {card['parametrization']}, the model {policy.parametrization.to_dict()}"
        )
    try:
        policy.check_z(expert.z)
    except (KeyError, ValueError) as exc:
        raise ExpertError(f"{source}: {exc}") from None


def load_expert(path: str | os.PathLike, policy: Policy) -> Expert:
    """Read an expert and check that it belongs to ``policy``; its ``z`` is moved to the model's device."""
    expert = read_expert(path)
    check_compatible(expert, policy, source=f"expert {path}")
    device = next(policy.model.parameters()).device
    expert.z = {k: v.to(device) for k, v in expert.z.items()}
    return expert


def z_statistics(z: Mapping[str, torch.Tensor], parametrization) -> dict[str, float]:
    """Summary of what an expert changes (SVF: its scales f(z), 1.0 = neutral; LoRA: alpha/r·BA, 0 = neutral)."""
    return parametrization.statistics(z)
