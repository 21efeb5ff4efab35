"""Helpers shared by the ``t2dist`` command modules (``cli``, ``cli_registry``, ``cli_adapt``, ...).

The subcommand modules import these from here, never from ``t2dist.cli.main``: the main module
imports every subcommand module to build its parser, so a subcommand reaching back into it
was an import cycle (``t2dist.cli.main`` <-> ``t2dist.cli.registry``).  Imports of the project
happen inside the functions, so building the parser stays cheap.
"""
from __future__ import annotations


def config_from_args(args, extra: dict[str, object]):
    """The run config of ``args.config`` with ``args.overrides``, then ``extra`` (None values skipped)."""
    from t2dist.config import load_config

    overrides = list(args.overrides)
    overrides += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return load_config(args.config, overrides)


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (other tools read these result files) and say so."""
    from t2dist.atomic import atomic_write_json

    p = atomic_write_json(path, data)
    print(f"wrote {p}")


def policy_overrides_from_card(card: dict, user_overrides: list[str]) -> dict:
    """The policy setup an expert was trained with (kind, targets, rank, parametrization) as CLI overrides,
    except the keys the user overrides (:func:`t2dist.policy.registry.card_overrides`)."""
    from t2dist.policy.registry import card_overrides

    given = {o.split("=", 1)[0] for o in user_overrides}
    return {k: _override_text(v) for k, v in card_overrides(card, given).items()}


def _override_text(value) -> str:
    """A config value as the text of a ``key=value`` override (YAML: null, true/false)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
