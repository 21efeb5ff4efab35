"""The champion rule: move an alias to a new version only when it beats the current holder, race-free.

A run that finishes publishes its expert and asks to become ``champion``.  It must beat the
current champion *on this run's validation set* (the champion is re-scored by ``score_of``
rather than trusting a number measured by another run), and the move must be a
compare-and-set on the alias (:meth:`~t2dist.registry.store.Registry.set_alias_if`): read the
champion and its token, score it, and move the alias only if it still holds that champion.
If another run moved it meanwhile, the CAS fails, and the loop re-reads the *new* champion,
scores it (once per version), and decides again.  So with any number of runs promoting at
once, every move goes to a version strictly better than the one it replaced, and the last
champion standing is the best of them (tests/test_registry.py races 8 processes, on a local
directory and on an S3 server).

Core code: no Ray, no model; the scoring is a function passed in (the evaluator actor passes
greedy validation accuracy of the champion's z, see ``actors/evaluator.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from t2dist.registry.store import Registry, RegistryError

__all__ = ["Decision", "NotComparable", "promote_if_better"]


class NotComparable(Exception):
    """Raised by ``score_of`` when the current champion cannot be scored on this run (another base model...)."""


@dataclass
class Decision:
    """What :func:`promote_if_better` did.  ``champion``: the version compared against, its score and
    whatever ``score_of`` reported about it (``details``)."""

    promoted: bool
    reason: str
    champion: int | None = None
    champion_score: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0


def promote_if_better(reg: Registry, name: str, version: int, score: float,
                      score_of: Callable[[int], float | tuple[float, dict]], *, alias: str = "champion",
                      max_attempts: int = 100) -> Decision:
    """Move ``name:alias`` to ``version`` (scored ``score``) iff it is strictly better than the holder.

    ``score_of(v)`` scores version ``v`` on the same validation set as ``score``: a float, or
    ``(score, details)``; it may raise :class:`NotComparable` (then the alias stays where it is).
    """
    scored: dict[int, tuple[float, dict]] = {}
    for attempt in range(1, max_attempts + 1):
        current, token = reg.read_alias(name, alias)
        if current == version:
            return Decision(True, f"{name}@{version} is already {alias}", version, score, attempts=attempt)
        if current is None:
            if reg.set_alias_if(name, alias, version, None, reason=f"first {alias} (val {score:.4f})"):
                return Decision(True, f"no {alias} yet", attempts=attempt)
            continue  # another run created it first: compare against that one
        if current not in scored:
            try:
                got = score_of(current)
            except NotComparable as exc:
                return Decision(False, f"{alias} {name}@{current} not comparable ({exc}); alias left in place",
                                current, attempts=attempt)
            scored[current] = (float(got[0]), dict(got[1])) if isinstance(got, tuple) else (float(got), {})
        champ, details = scored[current]
        base = Decision(False, "", current, champ, details, attempt)
        if not score > champ:
            base.reason = f"does not beat {name}@{current} on validation ({score:.4f} <= {champ:.4f})"
            return base
        if reg.set_alias_if(name, alias, version, token,
                            reason=f"val {score:.4f} > {champ:.4f} of {name}@{current}"):
            base.promoted = True
            base.reason = f"beats {name}@{current} on validation ({score:.4f} > {champ:.4f})"
            return base
        # the alias moved since we read it: re-read the new champion and decide again
    raise RegistryError(f"{reg.url}: {name}:{alias} kept moving; gave up after {max_attempts} attempts")
