"""Reading the final answer out of a free-form (chat) completion: GSM8K numbers, ``\\boxed{}``, code blocks.

Each function returns None when there is nothing to read, so the verifier can give -1.
"""
from __future__ import annotations

import re
from fractions import Fraction

_NUM = r"-?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\s*\.\d+"
_NUMBER = re.compile(_NUM)


def parse_number(text: str) -> Fraction | None:
    """``"1,234"``, ``"-7"``, ``"$18.00"``, ``"3."`` as an exact Fraction, or None."""
    t = (text or "").strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text or "")
    return found[-1] if found else None


def extract_gsm8k_answer(completion: str) -> Fraction | None:
    """The final number of a GSM8K-style answer.

    In order: the first number after the last ``####``; after the last "answer is"; inside the
    last ``\\boxed{}``; else the last number anywhere in the completion.
    """
    text = completion or ""
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return parse_number(m.group(0))
    low = text.lower()
    if "answer is" in low:
        tail = text[low.rindex("answer is") + len("answer is"):]
        m = _NUMBER.search(tail)
        if m:
            return parse_number(m.group(0))
    boxed = extract_boxed(text)
    if boxed is not None:
        n = _last_number(boxed)
        if n is not None:
            return parse_number(n)
    n = _last_number(text)
    return parse_number(n) if n is not None else None


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``), braces balanced; else None."""
    text = text or ""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : i].strip()
            continue  # unbalanced (truncated completion): try an earlier one
        m = re.match(r"([^\s$]+)", text[start:])  # "\boxed 5"
        if m:
            return m.group(1)
    return None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The Python code in a completion: the first fenced python (or untagged) block that defines a
    function, else the first such block, else the whole text.

    A block left open by a truncated completion runs to the end of the text.  Later blocks are
    usually usage examples, whose own asserts or prints would only add noise.
    """
    text = completion or ""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    py = [body for lang, body in blocks if lang in ("", "python", "py", "python3")]
    if not py:
        return text
    with_def = [b for b in py if re.search(r"^\s*def ", b, re.MULTILINE)]
    return (with_def or py)[0].rstrip() + "\n"
