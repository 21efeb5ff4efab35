"""The expert registry: immutable, versioned experts on any fsspec filesystem.

Layout under the root URL (a local directory, ``file://``, ``s3://``, ``gs://``…)::

    experts/<name>/<version>/.claim          written first, with exclusive create
    experts/<name>/<version>/z.safetensors
    experts/<name>/<version>/card.json       written last: a version exists iff its card does
    experts/<name>/aliases/<alias>.json      {"version": 3, "set": ..., "reason": ...}

Why it is safe without a lock server:

* **Version numbers** are claimed by creating ``.claim`` exclusively (``O_EXCL`` on a
  local disk, a conditional ``If-None-Match: *`` PUT on S3).  Two publishers racing for
  version 7 cannot both win; the loser tries 8.  Nothing is ever overwritten.
* **Atomic publish**: the card, which records the sha256 and size of ``z.safetensors``,
  is written last, as one object PUT (object stores) or a temp file + rename (local).
  Readers list only versions with a card, so a half-written version is never visible,
  and a z file that was damaged later is refused on load (the hash no longer matches).
* **Aliases** are single small objects, replaced in one write.  Moving one on a decision
  (the champion rule, :mod:`t2dist.registry.champion`) is a compare-and-set
  (:meth:`Registry.set_alias_if`): an exclusive ``flock`` on a local disk, a conditional
  ``If-Match: <ETag>`` PUT on S3, so two runs finishing together cannot both replace the
  champion they compared against.

A publisher that dies after claiming leaves a version without a card: invisible, and its
number is not reused.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import fsspec
import torch
from fsspec.asyn import sync
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from t2dist.atomic import atomic_write_bytes
from t2dist.errors import UserError
from t2dist.experts.expert import CARD_FILE, REQUIRED_CARD_FIELDS, Z_FILE, Expert, ExpertError, read_expert, save_expert

CLAIM_FILE = ".claim"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REF_RE = re.compile(r"^(?P<name>[^@:]+)(?:@(?P<version>[^@:]+)|:(?P<alias>[^@:]+))?$")
DEFAULT_ALIAS = "champion"


class RegistryError(UserError, ValueError):
    """A registry that cannot be used, or a reference to an expert it does not hold."""


@dataclass(frozen=True)
class ExpertRef:
    """A parsed reference: ``name``, ``name@version`` or ``name:alias``."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> "ExpertRef":
        m = REF_RE.match(ref.strip())
        if not m or not NAME_RE.match(m["name"]):
            raise RegistryError(f"bad expert reference {ref!r}: expected NAME, NAME@VERSION or NAME:ALIAS "
                                "(names use letters, digits, '.', '_', '-')")
        version = None
        if m["version"] is not None:
            if not m["version"].isdigit() or int(m["version"]) < 1:
                raise RegistryError(f"bad expert reference {ref!r}: the version must be a positive integer")
            version = int(m["version"])
        if m["alias"] is not None and not NAME_RE.match(m["alias"]):
            raise RegistryError(f"bad expert reference {ref!r}: bad alias name {m['alias']!r}")
        return cls(m["name"], version, m["alias"])

    def __str__(self) -> str:
        return self.name + (f"@{self.version}" if self.version else "") + (f":{self.alias}" if self.alias else "")


def check_name(name: str, what: str = "expert name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"bad {what} {name!r}: use letters, digits, '.', '_', '-' (at most 128 characters)")
    return name


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Registry:
    """Published experts under ``url``.  ``storage_options`` go to fsspec (e.g. an S3 endpoint);
    S3 credentials and ``AWS_ENDPOINT_URL`` may also come from the environment as usual."""

    def __init__(self, url: str | os.PathLike = "registry", storage_options: Mapping[str, Any] | None = None,
                 create: bool = False):
        self.url = str(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise RegistryError(f"registry {self.url!r}: cannot open this URL ({exc})") from None
        self.local = "file" in _protocols(self.fs)
        self.root = root.rstrip("/") if root not in ("/", "") else root
        if create:
            self._ensure_writable()
        elif not self._root_exists():
            raise RegistryError(f"registry {self.url!r} does not exist (publish to it once, or check the URL)")

    # -- paths -------------------------------------------------------------------------------
    def _p(self, *parts: object) -> str:
        return "/".join([self.root, "experts", *map(str, parts)])

    def _root_exists(self) -> bool:
        try:
            return self.fs.isdir(self.root) or self.fs.exists(self._p())
        except (OSError, PermissionError):
            return False

    def _ensure_writable(self) -> None:
        """Create the root if needed and prove it is writable (a probe object, then removed)."""
        probe = f"{self.root}/.write-probe-{uuid.uuid4().hex}"
        try:
            if self.local:
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except (OSError, PermissionError) as exc:
            raise RegistryError(f"registry {self.url!r} cannot be written: {exc}") from None

    # -- low-level writes ----------------------------------------------------------------------
    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if it does not exist; False when someone else already has."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a part."""
        if self.local:
            atomic_write_bytes(path, data)
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores

    def _invalidate(self) -> None:
        try:
            self.fs.invalidate_cache()
        except Exception:  # noqa: BLE001 - only listing caches, best effort
            pass

    # -- versions -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._invalidate()
        try:
            entries = self.fs.ls(self._p(), detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(e.rstrip("/")) for e in entries if NAME_RE.match(os.path.basename(e.rstrip("/"))))

    def _numbers(self, name: str, marker: str) -> list[int]:
        self._invalidate()
        try:
            entries = self.fs.ls(self._p(name), detail=False)
        except FileNotFoundError:
            return []
        nums = sorted(int(b) for b in (os.path.basename(e.rstrip("/")) for e in entries) if b.isdigit())
        if marker == CLAIM_FILE:
            return nums
        return [v for v in nums if self.fs.exists(self._p(name, v, marker))]

    def versions(self, name: str) -> list[int]:
        """Published (complete) versions of ``name``, oldest first."""
        return self._numbers(check_name(name), CARD_FILE)

    def resolve(self, ref: str | ExpertRef) -> tuple[str, int]:
        """``(name, version)`` for ``name`` (latest), ``name@v`` or ``name:alias``."""
        r = ref if isinstance(ref, ExpertRef) else ExpertRef.parse(ref)
        known = self.versions(r.name)
        if not known:
            have = ", ".join(self.names()) or "none"
            raise RegistryError(f"unknown expert {r.name!r} in registry {self.url} (experts: {have})")
        if r.alias:
            aliases = self.aliases(r.name)
            if r.alias not in aliases:
                raise RegistryError(f"expert {r.name!r} has no alias {r.alias!r} in registry {self.url} "
                                    f"(aliases: {', '.join(f'{a}->@{v}' for a, v in aliases.items()) or 'none'})")
            return r.name, aliases[r.alias]
        if r.version is not None:
            if r.version not in known:
                raise RegistryError(f"expert {r.name!r} has no version {r.version} in registry {self.url} "
                                    f"(versions: {', '.join(map(str, known))})")
            return r.name, r.version
        return r.name, known[-1]

    # -- publish ---------------------------------------------------------------------------------
    def publish(self, z: Mapping[str, torch.Tensor], card: Mapping[str, Any], name: str | None = None,
                max_attempts: int = 1000) -> str:
        """Store a new immutable version; returns ``"name@version"``."""
        name = check_name(name or card.get("name", ""), "expert name (card 'name' or --name)")
        missing = [k for k in REQUIRED_CARD_FIELDS if k not in card]
        if missing:
            raise RegistryError(f"expert card is missing fields: {', '.join(missing)}; nothing was published")
        z_bytes = st_save({k: v.detach().float().cpu().contiguous() for k, v in z.items()})
        self._ensure_writable()
        claimed = self._numbers(name, CLAIM_FILE)
        version = (claimed[-1] if claimed else 0) + 1
        token = json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "claimed": _now()}).encode()
        for _ in range(max_attempts):
            if self._create_exclusive(self._p(name, version, CLAIM_FILE), token):
                break
            version += 1
        else:
            raise RegistryError(f"could not claim a version of {name!r} after {max_attempts} attempts")
        full = dict(card)
        full.update(name=name, version=version, z_sha256=sha256_hex(z_bytes), z_bytes=len(z_bytes),
                    published=_now(), registry=self.url)
        self._write_atomic(self._p(name, version, Z_FILE), z_bytes)
        self._write_atomic(self._p(name, version, CARD_FILE), json.dumps(full, indent=2).encode())  # the commit
        return f"{name}@{version}"

    def publish_dir(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Publish an expert directory (``z.safetensors`` + ``card.json``) trained elsewhere."""
        try:
            expert = read_expert(path)
        except ExpertError as exc:
            raise RegistryError(f"cannot publish {path}: {exc}") from None
        return self.publish(expert.z, expert.card, name=name)

    # -- read -----------------------------------------------------------------------------------
    def card(self, ref: str | ExpertRef) -> dict[str, Any]:
        name, version = self.resolve(ref)
        return self._card(name, version)

    def _card(self, name: str, version: int) -> dict[str, Any]:
        path = self._p(name, version, CARD_FILE)
        try:
            return json.loads(self.fs.cat_file(path))
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.url}: {name}@{version} has a damaged card ({exc})") from None

    def load(self, ref: str | ExpertRef) -> Expert:
        """The expert's z and card, after checking the z file against the hash in the card."""
        name, version = self.resolve(ref)
        card = self._card(name, version)
        data = self._read_z(name, version, card)
        return Expert(z=st_load(data), card=card)

    def _read_z(self, name: str, version: int, card: Mapping[str, Any]) -> bytes:
        where = f"{self.url}: {name}@{version}"
        try:
            data = self.fs.cat_file(self._p(name, version, Z_FILE))
        except FileNotFoundError:
            raise RegistryError(f"{where} has no {Z_FILE}") from None
        if "z_sha256" not in card:
            raise RegistryError(f"{where}: the card records no z_sha256, so the z file cannot be verified")
        if len(data) != card.get("z_bytes", len(data)):
            raise RegistryError(f"{where}: {Z_FILE} is {len(data)} bytes but the card says {card['z_bytes']} "
                                "(truncated or replaced); refusing to load it")
        if sha256_hex(data) != card["z_sha256"]:
            raise RegistryError(f"{where}: {Z_FILE} does not match the sha256 in its card (tampered or damaged); "
                                "refusing to load it")
        return data

    def verify(self, ref: str | ExpertRef | None = None) -> list[dict[str, Any]]:
        """Check every version (or one): the z hash and that the file parses; never raises for a bad one."""
        if ref is None:
            targets = [(n, v) for n in self.names() for v in self.versions(n)]
        else:
            targets = [self.resolve(ref)]
        out = []
        for name, version in targets:
            try:
                card = self._card(name, version)
                st_load(self._read_z(name, version, card))
                out.append({"ref": f"{name}@{version}", "ok": True, "detail": "sha256 ok"})
            except (RegistryError, Exception) as exc:  # noqa: BLE001 - reported per version
                out.append({"ref": f"{name}@{version}", "ok": False, "detail": str(exc)})
        return out

    def fetch(self, ref: str | ExpertRef, dest: str | os.PathLike) -> Path:
        """Copy a verified expert into a local expert directory (``z.safetensors`` + ``card.json``)."""
        expert = self.load(ref)
        return save_expert(dest, expert.z, expert.card)

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        """One row per published version: name, version, task, metrics, aliases, created."""
        rows = []
        for n in ([check_name(name)] if name else self.names()):
            aliases = self.aliases(n)
            by_version: dict[int, list[str]] = {}
            for a, v in aliases.items():
                by_version.setdefault(v, []).append(a)
            for v in self.versions(n):
                card = self._card(n, v)
                rows.append({"name": n, "version": v, "task": card.get("task"), "kind": card.get("kind", "svf"),
                             "metrics": card.get("metrics", {}), "aliases": sorted(by_version.get(v, [])),
                             "created": card.get("published") or card.get("created"),
                             "base_fingerprint": card.get("base_fingerprint")})
        return rows

    # -- aliases -------------------------------------------------------------------------------
    def aliases(self, name: str) -> dict[str, int]:
        self._invalidate()
        out = {}
        try:
            entries = self.fs.ls(self._p(check_name(name), "aliases"), detail=False)
        except FileNotFoundError:
            return {}
        for e in entries:
            base = os.path.basename(e.rstrip("/"))
            if base.endswith(".json"):
                try:
                    out[base[:-5]] = int(json.loads(self.fs.cat_file(e))["version"])
                except (FileNotFoundError, ValueError, KeyError):
                    continue
        return out

    def set_alias(self, name: str, alias: str, version: int, reason: str = "") -> None:
        """Point ``alias`` at ``version`` unconditionally (an operator's ``promote``; see :meth:`set_alias_if`)."""
        self._check_target(name, alias, version)
        self._write_atomic(self._alias_path(name, alias), _alias_bytes(version, reason))

    def _check_target(self, name: str, alias: str, version: int) -> None:
        check_name(alias, "alias")
        if version not in self.versions(name):
            raise RegistryError(f"cannot point {name}:{alias} at version {version}: "
                                f"{name!r} has versions {self.versions(name) or 'none'} in {self.url}")

    def _alias_path(self, name: str, alias: str) -> str:
        return self._p(check_name(name), "aliases", f"{check_name(alias, 'alias')}.json")

    def read_alias(self, name: str, alias: str) -> tuple[int | None, str | None]:
        """``(version, token)`` of ``alias`` now, ``(None, None)`` if unset; the token is for :meth:`set_alias_if`.

        Local: the sha256 of the alias file's bytes.  S3: the object's ETag, from the same GET as
        its content (so the token always belongs to the version returned).
        """
        path = self._alias_path(name, alias)
        try:
            data, token = (self._s3_get(path) if self._s3 else (self._read_local(path), None))
        except FileNotFoundError:
            return None, None
        try:
            version = int(json.loads(data)["version"])
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"{self.url}: alias {name}:{alias} is damaged") from None
        return version, token or hashlib.sha256(data).hexdigest()

    def set_alias_if(self, name: str, alias: str, version: int, token: str | None, reason: str = "") -> bool:
        """Compare-and-set: point ``alias`` at ``version`` only if it is still what :meth:`read_alias`
        returned with ``token`` (``None``: only if the alias does not exist).  False if it moved.

        Local: under an exclusive ``flock`` on ``aliases/.<alias>.lock`` (released by the kernel if the
        holder dies), re-read, compare, replace atomically.  S3: one conditional PUT, ``If-Match:
        <ETag>`` (or ``If-None-Match: *`` to create), as the version claim does.  Other fsspec
        stores have no conditional write here: refused with a RegistryError.
        """
        self._check_target(name, alias, version)
        path, data = self._alias_path(name, alias), _alias_bytes(version, reason)
        if self.local:
            return self._cas_local(path, data, token)
        if not self._s3:
            raise RegistryError(f"registry {self.url}: moving an alias safely needs a local directory or S3 "
                                "(conditional writes); use Registry.set_alias to move it unconditionally")
        try:
            if token is None:
                self.fs.pipe_file(path, data, mode="create")
            else:
                self.fs.pipe_file(path, data, IfMatch=token)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as exc:  # PreconditionFailed (412), ConditionalRequestConflict (409)
            if any(k in str(exc) for k in ("Precondition", "412", "Conflict", "409")) or exc.errno == errno.EINVAL:
                return False
            raise
        finally:
            self._invalidate()
        return True

    @property
    def _s3(self) -> bool:
        return bool({"s3", "s3a"} & set(_protocols(self.fs)))

    def _read_local(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _s3_get(self, path: str) -> tuple[bytes, str]:
        """Content and ETag of one object, from a single GetObject."""
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                raise
            body = await resp["Body"].read()
            return body, resp["ETag"]

        return sync(self.fs.loop, get)

    def _cas_local(self, path: str, data: bytes, token: str | None) -> bool:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = os.path.join(os.path.dirname(path), "." + os.path.basename(path)[:-5] + ".lock")
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = hashlib.sha256(self._read_local(path)).hexdigest()
            except FileNotFoundError:
                current = None
            if current != token:
                return False
            self._write_atomic(path, data)
            return True
        finally:
            os.close(fd)  # releases the lock

    def remove_alias(self, name: str, alias: str) -> None:
        path = self._p(check_name(name), "aliases", f"{check_name(alias, 'alias')}.json")
        if not self.fs.exists(path):
            raise RegistryError(f"expert {name!r} has no alias {alias!r}")
        self.fs.rm_file(path)

    # -- delete -----------------------------------------------------------------------------------
    def delete(self, ref: str | ExpertRef, force: bool = False) -> str:
        """Remove one version.  Refused while an alias points at it, unless ``force`` (then the alias goes too)."""
        name, version = self.resolve(ref)
        pointing = [a for a, v in self.aliases(name).items() if v == version]
        if pointing and not force:
            raise RegistryError(f"{name}@{version} is aliased as {', '.join(pointing)}; move the alias first "
                                "or delete with --force")
        for a in pointing:
            self.remove_alias(name, a)
        self.fs.rm_file(self._p(name, version, CARD_FILE))  # invisible from here on
        for f in (Z_FILE,):
            try:
                self.fs.rm_file(self._p(name, version, f))
            except FileNotFoundError:
                pass
        # the claim stays: the number is never reused
        return f"{name}@{version}"


def _alias_bytes(version: int, reason: str) -> bytes:
    # a fresh nonce makes every write's bytes (hence sha256/ETag) unique, so a token never matches a later write
    return json.dumps({"version": version, "set": _now(), "reason": reason, "nonce": uuid.uuid4().hex}).encode()


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def z_file_bytes(z: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes ``publish`` stores for ``z`` (for tests and tools)."""
    return st_save({k: v.detach().float().cpu().contiguous() for k, v in z.items()})

