"""The base of every config section, and the registry check its validators share.

Components own their settings (torchtitan style): a policy kind or an engine declares its own
section class next to its code, subclassing :class:`Section`, and :mod:`t2dist.config`
assembles the tree from the registries.  This module imports nothing of the project, so a
component's module can declare a section without importing :mod:`t2dist.config` (which imports
the registries, which import the components: that would be a cycle).

Every section forbids unknown keys (a typo is an error that names the key, e.g.
``rl.lr_rate: extra inputs are not permitted``) and validates assignments too.
"""
from __future__ import annotations

from typing import Iterable

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys and bad assignments are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def one_of(value: str, known: Iterable[str], what: str, label: str = "known") -> str:
    """``value`` if it names a registry entry, else an error listing the known names."""
    known = list(known)
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; {label}: {', '.join(known)}")
    return value
