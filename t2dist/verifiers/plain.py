"""A strict data-only codec for values that cross between a candidate program and its judge.

The code verifier never lets an object made by the candidate reach the side that decides
the verdict: the candidate's process sends values as JSON with explicit type tags, and the
trusted side rebuilds them as genuine builtins.  Only ``None``, ``bool``, ``int``, ``float``,
``complex``, ``str``, ``bytes`` and ``list``/``tuple``/``set``/``frozenset``/``dict`` of them
(nested at most :data:`MAX_DEPTH` = 64 deep) exist in the format; the encoder checks
``type(v) is int`` etc., so a subclass of ``int``/``str``, an object with its own ``__eq__``,
a generator or a class is refused (an error, hence a failed check); the one exception is the
``collections`` dict subclasses (``Counter``, ``OrderedDict``, ``defaultdict``: MBPP's reference
``freq_count`` returns a ``Counter``), which are sent as plain dicts of their items, so their class
never travels.  Whatever bytes
arrive, the decoder can only produce those builtins or raise :class:`PlainDataError`.

The codec is one piece of source (:data:`CODEC_SOURCE`) so that the sandboxed harnesses
(stdlib only, no access to this package) run exactly the code the trusted side runs here.
The encoder writes JSON text itself, with every string as UTF-8 hex (nothing to escape), so the
sandbox never imports ``json`` (34 ms of a ~90 ms check); the trusted side parses with ``json``.
Integers travel as hex (linear time both ways, not subject to the 4300-digit decimal limit);
floats as ``float.__repr__`` (exact round trip, ``nan``/``inf`` included).
"""
from __future__ import annotations

import json
from typing import Any

__all__ = ["CODEC_SOURCE", "MAX_DEPTH", "PlainDataError", "decode", "dumps", "loads", "unhex"]

MAX_DEPTH = 64

CODEC_SOURCE = r'''
class PlainDataError(ValueError):
    """A value that is not plain data, or bytes that are not a well-formed encoding."""


def _t2_hex(s):
    """A str as a JSON string of its UTF-8 hex: no escaping needed, nothing to import."""
    return '"' + str.encode(s, "utf-8", "surrogatepass").hex() + '"'


def _t2_dumps(v, depth=0):
    """JSON text of the tagged encoding of ``v`` (the sandbox has no time to import json)."""
    if depth > 64:
        raise PlainDataError("value nested deeper than 64 levels")
    t = type(v)
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    if t is str:
        return '["u",' + _t2_hex(v) + "]"
    if t is int:
        return '["i","' + int.__format__(v, "x") + '"]'
    if t is float:
        return '["f","' + float.__repr__(v) + '"]'
    if t is complex:
        return '["c","' + float.__repr__(v.real) + '","' + float.__repr__(v.imag) + '"]'
    if t is bytes:
        return '["b","' + bytes.hex(v) + '"]'
    if t is list or t is tuple or t is set or t is frozenset:
        tag = "l" if t is list else "t" if t is tuple else "s" if t is set else "z"
        return '["' + tag + '",[' + ",".join([_t2_dumps(x, depth + 1) for x in v]) + "]]"
    if t is dict or (issubclass(t, dict) and t.__module__ == "collections"):  # Counter, OrderedDict...
        return '["d",[' + ",".join(["[" + _t2_dumps(k, depth + 1) + "," + _t2_dumps(x, depth + 1) + "]"
                                    for k, x in dict.items(v)]) + "]]"
    raise PlainDataError("a %s is not plain data (int, float, complex, str, bytes, bool, None and "
                         "lists/tuples/sets/dicts of them)" % (t.__name__,))


def _t2_float(s):
    if type(s) is not str or len(s) > 40:
        raise PlainDataError("bad float")
    return float(s)


def _t2_unhex(s):
    if type(s) is not str:
        raise PlainDataError("malformed string")
    return bytes.fromhex(s).decode("utf-8", "surrogatepass")


def _t2_decode(o, depth=0):
    """Genuine builtins from a parsed tagged encoding (lists, str, None, bool only)."""
    if depth > 64:
        raise PlainDataError("value nested deeper than 64 levels")
    t = type(o)
    if o is None or t is bool:
        return o
    if t is not list or len(o) < 2 or type(o[0]) is not str or type(o[1]) not in (str, list):
        raise PlainDataError("malformed value")
    tag, body = o[0], o[1]
    if type(body) is str:
        if tag == "c" and len(o) == 3:
            return complex(_t2_float(body), _t2_float(o[2]))
        if len(o) != 2:
            raise PlainDataError("malformed value")
        if tag == "u":
            return _t2_unhex(body)
        if tag == "i" and body.lstrip("-").isalnum():
            return int(body, 16)
        if tag == "f":
            return _t2_float(body)
        if tag == "b":
            return bytes.fromhex(body)
        raise PlainDataError("unknown tag %r" % (tag,))
    if len(o) != 2:
        raise PlainDataError("malformed value")
    if tag == "d":
        out = {}
        for kv in body:
            if type(kv) is not list or len(kv) != 2:
                raise PlainDataError("malformed dict item")
            out[_t2_decode(kv[0], depth + 1)] = _t2_decode(kv[1], depth + 1)
        return out
    items = [_t2_decode(x, depth + 1) for x in body]
    if tag == "l":
        return items
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(items)
    if tag == "z":
        return frozenset(items)
    raise PlainDataError("unknown tag %r" % (tag,))
'''

_ns: dict[str, Any] = {}
exec(compile(CODEC_SOURCE, "<t2dist-plain-codec>", "exec"), _ns)  # noqa: S102 - our own constant source
PlainDataError: type[ValueError] = _ns["PlainDataError"]


def dumps(value: Any) -> str:
    """JSON text of ``value``'s tagged encoding; :class:`PlainDataError` if it is not plain data."""
    return _ns["_t2_dumps"](value)


def decode(obj: Any) -> Any:
    """Genuine builtins from a parsed tagged structure; :class:`PlainDataError` for anything malformed."""
    try:
        return _ns["_t2_decode"](obj)
    except PlainDataError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # unhashable key, bad hex...
        raise PlainDataError(f"malformed value ({type(exc).__name__}: {exc})") from None


def unhex(text: Any) -> str:
    """A string field of a frame (UTF-8 hex), or :class:`PlainDataError`."""
    try:
        return _ns["_t2_unhex"](text)
    except PlainDataError:
        raise
    except (ValueError, TypeError) as exc:
        raise PlainDataError(f"malformed string ({exc})") from None


def loads(text: str | bytes) -> Any:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PlainDataError(f"not JSON ({exc})") from None
    return decode(obj)
