"""The torch.distributed side of sharded SVF factors (``learner.shard_factors``).

The maths — the low-rank autograd function, :class:`~t2dist.svf.sharded.ShardedSVFLinear`,
the sharded policy :class:`~t2dist.svf.sharded.ShardedSVF`, the shape/divisibility checks
and the cost model ("When to shard") — lives in the core, :mod:`t2dist.svf.sharded`. Here
is only what talks to the process group: :class:`RowComm` (the collectives of a sharded
layer) and :func:`build_sharded_svf` (each rank loads the base, rank 0 builds the factor
cache behind a barrier, every rank reads its slice and cuts its rows).
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.distributed as dist

from t2dist.config import Config, ConfigError
from t2dist.models.loading import load_from_config
from t2dist.svf.factors import META_FILE, cache_key
from t2dist.svf.factors import fingerprint as model_fingerprint
from t2dist.svf.factors import get_factors, load_factor_slices
from t2dist.svf.model import SVFModel
from t2dist.svf.sharded import block, check_shardable, components, factor_dtype, shard_model
from t2dist.svf.targets import select_targets


# -- communication ------------------------------------------------------------------------
class RowComm:
    """The collectives of a sharded layer over the default process group.

    Tensors are laid out as ``(R, Tmax, D)``: rank ``q``'s tokens in block ``q``, zero-padded
    to the largest token count. NCCL uses all-gather-into-tensor / reduce-scatter; gloo
    (no reduce-scatter) uses all_gather / all_reduce + taking its own block.
    """

    def __init__(self, rank: int, world: int, backend: str):
        self.rank, self.world, self.backend = rank, world, backend

    def counts(self, n: int, device) -> list[int]:
        """Every rank's token count (one small all-gather per model forward)."""
        if self.world == 1:
            return [n]
        t = torch.tensor([n], dtype=torch.long, device=device if self.backend == "nccl" else "cpu")
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [int(x) for x in out]

    def gather(self, x: torch.Tensor, tmax: int) -> torch.Tensor:
        """``(T, D)`` local rows → ``(R, Tmax, D)`` of all ranks."""
        if self.world == 1:
            return x.unsqueeze(0)
        pad = torch.zeros((tmax, x.shape[1]), dtype=x.dtype, device=x.device)
        pad[: x.shape[0]] = x
        if self.backend == "nccl":
            out = torch.empty((self.world * tmax, x.shape[1]), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, pad)
            return out.view(self.world, tmax, x.shape[1])
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        return torch.stack(parts)

    def reduce(self, buf: torch.Tensor) -> torch.Tensor:
        """``(R, Tmax, D)`` partials of every rank → the summed ``(Tmax, D)`` block of this rank."""
        if self.world == 1:
            return buf[0]
        buf = buf.contiguous()
        if self.backend == "nccl":
            out = torch.empty(buf.shape[1:], dtype=buf.dtype, device=buf.device)
            dist.reduce_scatter_tensor(out, buf.view(-1, buf.shape[-1]))
            return out
        dist.all_reduce(buf)
        return buf[self.rank]


def build_sharded_svf(cfg: Config, *, rank: int, world: int, backend: str, device: str, on_gpu: bool):
    """``(ShardedSVF, tokenizer)``: load the base, cut the target weights, read this rank's factor slices.

    A collective (a barrier when the factor cache has to be built): call on every rank.
    """
    if cfg.svf.cache_dir is None:
        raise ConfigError("learner.shard_factors needs the factor cache: set svf.cache_dir (or learner.shard_factors=false)")
    mcfg = cfg.model.model_copy(update={"device": device})
    model, tokenizer = load_from_config(mcfg)
    names = select_targets(model, cfg.svf.targets)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    check_shardable(cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"ranks": world,
                                                                                      "shard_factors": True})}),
                    shapes)
    fp = model_fingerprint(model)
    path = Path(cfg.svf.cache_dir) / cache_key(fp, names, cfg.svf.rank)
    if world > 1:
        if rank == 0 and not (path / META_FILE).is_file():
            get_factors(model, names, cfg.svf.rank, cfg.svf.cache_dir, model_fingerprint=fp, model_name=cfg.model.path)
            gc.collect()
        dist.barrier()
        if not (path / META_FILE).is_file():  # svf.cache_dir is not shared with rank 0's node
            print(f"[t2dist] learner rank {rank}: no factor cache at {path} after rank 0 built one (svf.cache_dir is "
                  "not on shared storage?); building a local copy", flush=True)
            get_factors(model, names, cfg.svf.rank, cfg.svf.cache_dir, model_fingerprint=fp, model_name=cfg.model.path)
            gc.collect()
    elif not (path / META_FILE).is_file():
        get_factors(model, names, cfg.svf.rank, cfg.svf.cache_dir, model_fingerprint=fp, model_name=cfg.model.path)
        gc.collect()
    comps = {n: block(components(cfg.svf.rank, shapes[n]), world, rank) for n in names}
    fdtype = factor_dtype(cfg, on_gpu)
    slices, nread = load_factor_slices(path, comps, model_fingerprint=fp, targets=names, rank=cfg.svf.rank,
                                       device=device, dtype=fdtype)
    svf = shard_model(model, slices, RowComm(rank, world, backend), SVFModel.parametrization_from_config(cfg),
                      fingerprint=fp, svf_rank=cfg.svf.rank, target_spec=cfg.svf.targets, bytes_read=nread)
    if on_gpu:
        torch.cuda.empty_cache()
    return svf, tokenizer


