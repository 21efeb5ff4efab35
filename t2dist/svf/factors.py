"""Singular value decomposition of the target matrices, and its on-disk cache.

``W = U diag(S) Vᵀ`` is computed once per target in float32 (full rank, or the top-k
triplets).  The cache lives in ``<cache_dir>/<key>/`` with ``factors.safetensors``
(tensors ``<target>.U``, ``<target>.S``, ``<target>.V``) and ``meta.json``; the key
combines the base-model fingerprint, the target list and the rank, so a second run
loads instead of recomputing and a cache for another model or spec is never used.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from t2dist.atomic import atomic_dir
from t2dist.errors import UserError
from t2dist.progress import Progress

FACTORS_FILE = "factors.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclass
class Factors:
    """``W ≈ U diag(S) Vᵀ`` for one target: U is (out, k), S is (k,), V is (in, k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return self.S.numel()

    def to(self, device=None, dtype=None) -> "Factors":
        return Factors(*(t.to(device=device, dtype=dtype) for t in (self.U, self.S, self.V)))


class FactorCacheError(UserError, RuntimeError):
    """A factor cache that belongs to another model, target list or rank, or is damaged."""


def fingerprint(model: nn.Module, sample: int = 65536) -> str:
    """A stable hash of a model's weights.

    Hashes every parameter's name, shape and dtype plus an evenly strided sample of at
    most ``sample`` of its values (all of them for small tensors), so it is cheap for a
    70B model yet changes whenever the weights do in practice.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().reshape(-1)
        if t.numel() > sample:
            t = t[:: t.numel() // sample][:sample]
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def decompose_weight(weight: torch.Tensor, rank: int | None = None) -> Factors:
    """SVD in float32; ``rank`` keeps the top-k singular triplets (None: full rank)."""
    w = weight.detach().to(torch.float32)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    if rank is not None:
        if rank < 1:
            raise ValueError(f"svf.rank must be a positive integer or null, got {rank}")
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    return Factors(U.contiguous(), S.contiguous(), Vh.T.contiguous())


def decompose(model: nn.Module, targets: list[str], rank: int | None = None,
              what: str = "the model") -> dict[str, Factors]:
    """The factors of every target; a slow SVD says how far it is (``[t2dist] SVD of ...: 30/90 (12s)``)."""
    progress = Progress(f"SVD of {what}'s {len(targets)} target matrices", len(targets))
    out = {}
    for i, name in enumerate(targets, 1):
        out[name] = decompose_weight(model.get_submodule(name).weight, rank)
        progress.update(i)
    progress.finish()
    return out


def cache_key(model_fingerprint: str, targets: list[str], rank: int | None) -> str:
    spec = hashlib.sha256("\n".join(targets).encode()).hexdigest()[:12]
    return f"{model_fingerprint[:16]}-{spec}-r{rank if rank is not None else 'full'}"


def save_factors(path: str | os.PathLike, factors: dict[str, Factors], meta: dict) -> Path:
    """Write the cache directory atomically (temporary name, then rename).

    When another process wrote the same cache first, its copy is kept: it is equally valid.
    """
    path = Path(path)
    tensors = {}
    for name, f in factors.items():
        tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.V"] = f.U, f.S, f.V
    with atomic_dir(path, exists="keep") as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / FACTORS_FILE))
        (tmp / META_FILE).write_text(json.dumps({**meta, "format": FORMAT_VERSION}, indent=2))
    return path


def read_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise FactorCacheError(f"{path} is not a factor cache: {META_FILE} is missing")
    return json.loads(meta_file.read_text())


def load_factors(
    path: str | os.PathLike,
    *,
    model_fingerprint: str,
    targets: list[str],
    rank: int | None,
    names: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Factors]:
    """Load factors, refusing a cache made for another model, target list or rank.

    ``names`` restricts loading to a subset of targets (a learner rank reads only its shard).
    """
    meta = read_meta(path)
    problems = []
    if meta.get("fingerprint") != model_fingerprint:
        problems.append(f"base fingerprint {meta.get('fingerprint')} != this model's {model_fingerprint}")
    if meta.get("targets") != targets:
        problems.append(f"targets differ ({len(meta.get('targets', []))} cached vs {len(targets)} requested)")
    if meta.get("rank") != rank:
        problems.append(f"rank {meta.get('rank')} != requested {rank}")
    if problems:
        raise FactorCacheError(
            f"factor cache {path} was made for model {meta.get('model', '?')!r} and cannot be used here: "
            + "; ".join(problems)
        )
    out = {}
    with safe_open(str(Path(path) / FACTORS_FILE), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        for name in names if names is not None else targets:
            missing = [k for k in (f"{name}.U", f"{name}.S", f"{name}.V") if k not in keys]
            if missing:
                raise FactorCacheError(f"factor cache {path} is missing tensors {missing}")
            out[name] = Factors(f.get_tensor(f"{name}.U"), f.get_tensor(f"{name}.S"), f.get_tensor(f"{name}.V"))
    return out


@dataclass
class FactorSlice:
    """One rank's share of a target's factors: components ``[start, stop)`` of U and V, and all of S.

    ``U`` is ``(out, stop-start)``, ``V`` is ``(in, stop-start)``; ``S`` is the full ``(k,)``
    vector (k floats per matrix: negligible, and the optional rescale needs ``ΣS``).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.V))


def load_factor_slices(
    path: str | os.PathLike,
    components: dict[str, tuple[int, int]],
    *,
    model_fingerprint: str,
    targets: list[str],
    rank: int | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, FactorSlice], int]:
    """Read only the columns ``[start, stop)`` of each target's U and V (plus its S) from the cache.

    ``safe_open(...).get_slice`` copies just the requested bytes out of the memory-mapped
    file, so a rank never holds another rank's components (the OS pages in at most the
    pages those bytes live on). Every requested tensor is checked to exist with the expected
    shape *before* any is read: a damaged cache is an error naming the file and the tensors.
    ``dtype`` applies to U and V; S stays float32.
    Returns ``(slices, bytes_read)`` where ``bytes_read`` counts the bytes copied out of the file.
    """
    meta = read_meta(path)
    if meta.get("fingerprint") != model_fingerprint or meta.get("targets") != targets or meta.get("rank") != rank:
        raise FactorCacheError(f"factor cache {path} was made for another model, target list or rank "
                               f"(model {meta.get('model', '?')!r}, rank {meta.get('rank')})")
    file = Path(path) / FACTORS_FILE
    if not file.is_file():
        raise FactorCacheError(f"factor cache {path} is missing its tensor file {file}")
    out: dict[str, FactorSlice] = {}
    nbytes = 0
    with safe_open(str(file), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = [f"{n}.{x}" for n in components for x in "USV" if f"{n}.{x}" not in keys]
        if missing:
            raise FactorCacheError(f"factor cache file {file} is missing tensors {missing[:6]}"
                                   + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))
        for name, (a, b) in components.items():
            k = f.get_slice(f"{name}.S").get_shape()[0]
            ushape, vshape = f.get_slice(f"{name}.U").get_shape(), f.get_slice(f"{name}.V").get_shape()
            if ushape[1] != k or vshape[1] != k or not 0 <= a < b <= k:
                raise FactorCacheError(f"factor cache file {file}: {name}.U {ushape} / .V {vshape} / .S ({k},) "
                                       f"do not hold components [{a}, {b})")
            U = f.get_slice(f"{name}.U")[:, a:b]
            V = f.get_slice(f"{name}.V")[:, a:b]
            S = f.get_tensor(f"{name}.S")
            nbytes += sum(t.numel() * t.element_size() for t in (U, S, V))
            U, V = (t.contiguous().to(device=device, dtype=dtype) for t in (U, V))
            out[name] = FactorSlice(U, S.to(device=device, dtype=torch.float32), V, a, b)  # S stays float32
    return out, nbytes


def get_factors(
    model: nn.Module,
    targets: list[str],
    rank: int | None,
    cache_dir: str | os.PathLike | None,
    *,
    model_fingerprint: str | None = None,
    model_name: str = "",
) -> tuple[dict[str, Factors], bool]:
    """Factors from the cache when present, otherwise computed and cached.

    Returns ``(factors, loaded_from_cache)``.
    """
    fp = model_fingerprint or fingerprint(model)
    what = model_name or "the model"
    if cache_dir is None:
        return decompose(model, targets, rank, what), False
    path = Path(cache_dir) / cache_key(fp, targets, rank)
    if (path / META_FILE).is_file():
        return load_factors(path, model_fingerprint=fp, targets=targets, rank=rank), True
    factors = decompose(model, targets, rank, what)
    meta = {"fingerprint": fp, "targets": targets, "rank": rank, "model": model_name,
            "shapes": {n: list(model.get_submodule(n).weight.shape) for n in targets}}
    save_factors(path, factors, meta)
    return factors, False
