"""Atomic writes: readers see the old file (or directory) or the whole new one, never a part.

Every file or directory that t2dist leaves on disk for another process — a summary, an
expert, a checkpoint, a factor cache, a converted model, a registry card — is written
through one of these two helpers:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` write a
  temporary sibling (same directory, so the rename never crosses file systems), flush and
  ``fsync`` it, then ``os.replace`` it over the target.  A crash leaves at worst a
  ``.<name>.tmp-*`` file, never a truncated target.
* :func:`atomic_dir` yields a fresh temporary sibling directory to fill; when the block ends
  without an exception it is renamed to the target.  ``exists`` says what happens when the
  target is already there: ``"replace"`` it (the old one is moved aside first, then removed),
  ``"keep"`` it (another process finished the same work first, e.g. a cache: ours is
  discarded), or ``"error"``.  On an exception the temporary directory is removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

Exists = Literal["replace", "keep", "error"]


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the files we write are not secrets
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, exists: Exists = "replace", mode: int | None = None) -> Iterator[Path]:
    """Fill the yielded temporary directory; on success it becomes ``path`` (see the module docstring).

    ``mode`` sets the directory's permissions (``mkdtemp`` makes it private, 0o700).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exists == "error" and path.exists():
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    if mode is not None:
        os.chmod(tmp, mode)
    try:
        yield tmp
        _commit_dir(tmp, path, exists)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _commit_dir(tmp: Path, path: Path, exists: Exists) -> None:
    for f in tmp.rglob("*"):  # the contents are durable before the rename makes them visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if not path.exists():
        try:
            os.rename(tmp, path)
            _fsync_dir(path.parent)
            return
        except OSError:
            if not path.exists():
                raise
            # another process renamed its copy in between: fall through to the policy
    if exists == "keep":
        return
    if exists == "error":
        raise FileExistsError(f"{path} already exists")
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
