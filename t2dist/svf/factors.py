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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

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


class FactorCacheError(RuntimeError):
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


def decompose(model: nn.Module, targets: list[str], rank: int | None = None) -> dict[str, Factors]:
    return {name: decompose_weight(model.get_submodule(name).weight, rank) for name in targets}


def cache_key(model_fingerprint: str, targets: list[str], rank: int | None) -> str:
    spec = hashlib.sha256("\n".join(targets).encode()).hexdigest()[:12]
    return f"{model_fingerprint[:16]}-{spec}-r{rank if rank is not None else 'full'}"


def save_factors(path: str | os.PathLike, factors: dict[str, Factors], meta: dict) -> Path:
    """Write the cache directory atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {}
        for name, f in factors.items():
            tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.V"] = f.U, f.S, f.V
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / FACTORS_FILE))
        (tmp / META_FILE).write_text(json.dumps({**meta, "format": FORMAT_VERSION}, indent=2))
        try:
            tmp.rename(path)
        except OSError:  # another process won the race: its copy is equally valid
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    if cache_dir is None:
        return decompose(model, targets, rank), False
    path = Path(cache_dir) / cache_key(fp, targets, rank)
    if (path / META_FILE).is_file():
        return load_factors(path, model_fingerprint=fp, targets=targets, rank=rank), True
    factors = decompose(model, targets, rank)
    meta = {"fingerprint": fp, "targets": targets, "rank": rank, "model": model_name,
            "shapes": {n: list(model.get_submodule(n).weight.shape) for n in targets}}
    save_factors(path, factors, meta)
    return factors, False
