"""Math answer checking: ``math-verify`` first, a plain-number fallback second.

``check_math(completion, gold)`` never raises: an unparsable completion gets
reward -1 with ``parsed=None``.  A completion that is just an integer (the toy
suite's format, e.g. ``" 68"``, ``"-7"``, ``"1,234"``) is compared exactly without
calling math-verify, which keeps RL rollouts fast.
"""
from __future__ import annotations

import re
import threading
from fractions import Fraction

from t2dist.task_types import Verdict

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_PLAIN = re.compile(r"^\s*(-?\d{1,3}(?:,\d{3})+|-?\d+)\s*\.?\s*$")


def _to_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def extract_final_number(text: str) -> str | None:
    """The last number in ``text`` ("1,234" -> "1234", "-7" -> "-7"), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    return found[-1].replace(",", "")


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else str(x)


def _math_verify(completion: str, gold: str) -> tuple[bool | None, str | None]:
    """(correct, parsed) via math-verify; (None, None) when it cannot parse or is unavailable."""
    try:
        from math_verify import parse, verify  # lazy: sympy underneath (2 s); only math answers need it
    except Exception:  # pragma: no cover - the dependency is declared
        return None, None
    # math-verify's timeouts use signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        pred = parse(completion, parsing_timeout=timeout)
        if not pred:
            return None, None
        ref = parse(gold, parsing_timeout=timeout)
        if not ref:
            return None, None
        ok = bool(verify(ref, pred, timeout_seconds=timeout))
        return ok, str(pred[-1])
    except Exception:
        return None, None


def check_math(completion: str, gold: str) -> Verdict:
    """Score a completion against a gold answer (+1 / -1).  Never raises."""
    completion = completion if isinstance(completion, str) else ""
    gold_num = _to_number(str(gold).strip())
    plain = _PLAIN.match(completion)
    if plain and gold_num is not None:
        value = _to_number(plain.group(1))
        ok = value == gold_num
        return Verdict(1.0 if ok else -1.0, ok, _fmt(value), "exact")
    ok, parsed = _math_verify(completion, str(gold))
    if ok:
        return Verdict(1.0, True, parsed, "math-verify")
    fallback = extract_final_number(completion)
    if fallback is not None and gold_num is not None:
        value = _to_number(fallback)
        if value is not None:
            good = value == gold_num
            return Verdict(1.0 if good else -1.0, good, _fmt(value), "final-number")
    if ok is False:
        return Verdict(-1.0, False, parsed, "math-verify")
    return Verdict(-1.0, False, None, "unparsable")
