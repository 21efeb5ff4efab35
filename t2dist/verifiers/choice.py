"""Multiple-choice answer extraction: reads one option letter from a completion.

Accepts ``"B"``, ``" B)"``, ``"(b)"``, ``"Answer: B"``, ``"The answer is (C)."`` and,
as a last resort, the first standalone capital option letter.  ``parsed=None``
(reward -1) when no letter can be read.
"""
from __future__ import annotations

import re
import string

from t2dist.task_types import Verdict


def _letters(n_options: int) -> str:
    return string.ascii_uppercase[: max(1, min(26, n_options))]


def extract_choice(completion: str, n_options: int = 4) -> str | None:
    """The option letter in ``completion`` (upper case), or None."""
    if not isinstance(completion, str):
        return None
    letters = _letters(n_options)
    cls = f"[{letters}{letters.lower()}]"
    text = completion.strip()
    # 1. "Answer: B", "answer is (c)", "Answer - B)"
    m = re.search(rf"answer\s*(?:is)?\s*[:\-=]?\s*\(?\s*({cls})\s*\)?(?![A-Za-z])", text, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    # 2. The completion starts with the letter: "B", "B)", "(b)", "b.", "C: 42"
    m = re.match(rf"\(?\s*({cls})\s*(?:[).:,\]]|\s|$)", text)
    if m and (m.group(1).isupper() or text.startswith("(") or len(text) == 1 or text[1:2] in ").:]"):
        return m.group(1).upper()
    # 3. The first standalone capital option letter anywhere: "I pick C"
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    if m:
        return m.group(1)
    return None


def check_choice(completion: str, gold: str, n_options: int = 4) -> Verdict:
    """+1 when the letter read from ``completion`` equals ``gold``, else -1.  Never raises."""
    parsed = extract_choice(completion, n_options)
    if parsed is None:
        return Verdict(-1.0, False, None, "no option letter")
    ok = parsed == str(gold).strip().upper()
    return Verdict(1.0 if ok else -1.0, ok, parsed, "")
