"""The registry of policy kinds, and what works from an expert card alone.

``POLICIES`` maps a kind (``policy.kind`` in the config, ``kind`` in an expert card) to
the class implementing :class:`t2dist.policy.base.Policy` (instance side) and
:class:`t2dist.policy.base.PolicyKind` (class side). Adding a kind is one module plus
one :func:`register_policy` line below; registering a name twice is an error.  A kind with
settings declares them as its ``Config`` (a :class:`t2dist.config_section.Section`): registering
the kind adds that section to the config under the kind's name (``svf:``, ``lora:``;
:func:`t2dist.config.config_class` assembles the tree).

The learner's sharded SVF (:class:`t2dist.svf.sharded.ShardedSVF`) is not a kind of its
own: it is the ``svf`` kind cut over ranks, writes ``svf`` cards, and is chosen by
``learner.shard_factors``.
"""
from __future__ import annotations

from typing import Any, Mapping

from t2dist.errors import UserError
from t2dist.policy.lora import LoRAModel
from t2dist.svf.model import SVFModel

POLICIES: dict[str, type] = {}


class PolicyKindError(UserError, ValueError):
    """An unknown or duplicate policy kind."""


def register_policy(kind: str, cls: type) -> type:
    """Add a policy kind; ``cls.kind`` must be ``kind``. A name that exists is an error."""
    if kind in POLICIES:
        old = POLICIES[kind]
        raise PolicyKindError(f"policy kind {kind!r} is already registered ({old.__module__}.{old.__qualname__})")
    if getattr(cls, "kind", None) != kind:
        raise PolicyKindError(f"{cls.__qualname__}.kind is {getattr(cls, 'kind', None)!r}, not {kind!r}")
    POLICIES[kind] = cls
    return cls


def unregister_policy(kind: str) -> None:
    """Remove a kind (and with it its config section): tests that register a kind leave nothing behind."""
    POLICIES.pop(kind, None)


def policy_settings() -> dict[str, type]:
    """``{kind: section class}`` of the kinds that declare settings (their ``Config``)."""
    return {k: c.Config for k, c in POLICIES.items() if getattr(c, "Config", None) is not None}


def policy_class(kind: str) -> type:
    """The class of a policy kind; an unknown kind names the known ones."""
    try:
        return POLICIES[kind]
    except KeyError:
        raise PolicyKindError(f"policy kind {kind!r} is unknown; known kinds: {', '.join(sorted(POLICIES))}") from None


def card_kind(card: Mapping[str, Any]) -> str:
    """A card's policy kind (cards written before LoRA existed have no ``kind``: svf)."""
    kind = card.get("kind", "svf")
    policy_class(kind)
    return kind


def parametrization_of(card: Mapping[str, Any]):
    """What a card's tensors mean (an SVF :class:`Parametrization`, a LoRA r/alpha/dropout…)."""
    return policy_class(card_kind(card)).parametrization_from_card(card)


def parametrization_from_config(cfg):
    """The parametrization ``policy.kind`` and its section configure."""
    return policy_class(cfg.policy.kind).parametrization_from_config(cfg)


def card_overrides(card: Mapping[str, Any], given: Any = ()) -> dict[str, Any]:
    """The one card → config function: ``{dotted key: value}`` that rebuild the card's policy.

    Keys in ``given`` (what the user set explicitly) are left out; ``None`` means null.
    """
    values = policy_class(card_kind(card)).config_overrides(card)
    return {k: v for k, v in values.items() if k not in set(given)}


def config_from_card(cfg, card: Mapping[str, Any]):
    """``cfg`` (a :class:`t2dist.config.Config`) with the policy setup the card's expert was trained with."""
    data = cfg.model_dump()
    for key, value in card_overrides(card).items():
        node = data
        *sections, leaf = key.split(".")
        for part in sections:
            node = node[part]
        node[leaf] = value
    return type(cfg).model_validate(data)


register_policy("svf", SVFModel)
register_policy("lora", LoRAModel)
