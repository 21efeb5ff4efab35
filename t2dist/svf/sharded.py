"""SVF factors and target weights partitioned over the learner ranks (``learner.shard_factors``): the maths.

This module is core (no DeepSpeed, no ``torch.distributed`` import): the collectives come in as a
:class:`Communicator` (``learner/sharding.py``: :class:`~learner.sharding.RowComm` over the default
process group; :class:`SoloComm` here for one process), and ``learner/sharding.py`` builds a
:class:`ShardedSVF` on each rank (``build_sharded_svf``: model loading, factor cache, barrier).

Why: for a 7-8B model the SVD factors of the MLP matrices hold more numbers than the
weights they come from (a 4096×14336 matrix at full rank: U and V together are 1.29× W),
and at 70B nothing fits on one GPU. Only ``z`` is trained, so nothing but ``z`` (and its
optimizer state, both tiny) needs to be replicated.

The scheme (our own, not ZeRO-3): **component sharding + a low-rank forward**.

* Rank ``p`` of ``R`` holds, for every target matrix ``W = U diag(S) Vᵀ`` (``W`` is
  ``out × in``, ``k`` components):

  - the columns ``[p·k/R, (p+1)·k/R)`` of ``U`` and ``V`` (its *singular components*),
    read from the factor cache with ``safe_open(...).get_slice`` — no rank ever holds
    another rank's components (:func:`t2dist.svf.factors.load_factor_slices`);
  - the rows ``[p·out/R, (p+1)·out/R)`` of ``W`` (the base model is loaded once, then each
    target ``nn.Linear`` is replaced by a :class:`ShardedSVFLinear` holding only its rows);
  - all of ``S`` (``k`` floats per matrix: negligible, and the optional rescale needs ``ΣS``).

  Everything else of the base model (embeddings, norms, non-target layers) is replicated.

* The adapted layer is never materialised. With ``d = S ⊙ f(z) − S`` (delta form)

      y = x W'ᵀ = x Wᵀ + ((x V) ⊙ d) Uᵀ
        = Σ_p [ x W_pᵀ placed in rows p ]  +  Σ_p ((x V_p) ⊙ d_p) U_pᵀ

  i.e. a *sum over ranks* of partial outputs that each rank can compute from its own
  shard. The ranks train on different data (data parallel), so a layer first gathers the
  inputs of all ranks (``X``: every rank's tokens), each rank computes its partial for
  all tokens, and a reduce-scatter (gloo: an all-reduce) returns to each rank the full
  output rows of its own tokens. The backward is the mirror image: gather the output
  gradients, ``∂d_p = Σ_tokens (X V_p) ⊙ (G U_p)`` on the rank that owns those components,
  and a reduce-scatter of ``G W_p + ((G U_p) ⊙ d_p) V_pᵀ`` for the input gradient.
  Communication per target layer is activations (like tensor parallelism), never weights
  or factors; memory per rank is ``1/R`` of the target weights and factors.

* Exactness: rank ``p``'s ``z`` gradient holds the whole batch's gradient for *its*
  components (zero elsewhere), i.e. ``world_size ×`` the loss scaling the worker already
  applies, averaged by DeepSpeed over ``R`` ranks, gives exactly the single-process
  gradient (see ``learner/worker.py``). ``tests/test_sharding.py`` checks z after 3 steps
  at R=2 sharded against R=1 unsharded.

* Work split: ``R`` must divide every target's ``k`` and its output rows (equal shards;
  an uneven split would break the ``≤ 1.1 × total / R`` per-rank memory goal for small
  matrices anyway). :func:`check_shardable` says which keys to change, before any model
  is loaded (the driver calls it with the shapes of a ``meta``-device model: shapes without weights).

* The factor cache must exist: when it is missing, rank 0 builds it once (that process
  does materialise the full factors, once, then frees them); the others wait at a barrier
  and read slices. Rollout actors, which need the full factors to recompose ``W'``, usually
  build it first. ``svf.cache_dir`` should be on storage all nodes share; a rank that still
  finds no cache builds a local copy (same model, same SVD: the components match across
  ranks up to signs, which cancel within ``u_i s_i v_iᵀ``).

* Dtypes: ``learner.factor_dtype`` (auto: bfloat16 on GPU, float32 on CPU) for U, V; the
  base weights keep ``model.dtype``; S, ``d`` and ``z`` stay float32, as does ``∂d``.

When to shard (why ``learner.shard_factors`` is off by default): the low-rank path costs
``T·k·(in+out)`` extra multiply-adds per target per forward for ``T`` tokens, where
materialising ``ΔW`` (what :class:`~t2dist.svf.model.SVFModel` does) costs ``out·in·k`` once.
With full-rank factors the low-rank path is the cheaper one only while
``T < in·out/(in+out)`` tokens (3,186 for a 4096×14336 Llama-3-8B MLP matrix; 96 for the
toy's 128×384), and every target layer adds two activation exchanges forward and two
backward. On the toy demo batch the sharded learner step measured slower than the
unsharded one (``bench/memory.py`` prints both). Sharding is the memory tool for models
whose factors do not fit a device (Llama-3-70B: 270 GiB of fp32 factors); a per-layer
choice between this path and reduce-scattering each rank's partial ``ΔW_p`` by rows is the
natural next step for large token counts.

Caveats: the base model is loaded whole once per rank before its target weights are cut
(peak host memory = one base model); merge_/unmerge_ (generation) are not available on a
sharded model — rollout actors keep a full :class:`~t2dist.svf.model.SVFModel`.
"""
from __future__ import annotations

import gc
from typing import Mapping, Protocol

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from t2dist.config import Config, ConfigError
from t2dist.models.loading import resolve_model_path
from t2dist.policy.base import Z
from t2dist.policy.registry import policy_class
from t2dist.svf.factors import Factors
from t2dist.svf.model import SVFKind
from t2dist.svf.parametrization import Parametrization
from t2dist.svf.targets import select_targets


# -- configuration ------------------------------------------------------------------------
def use_sharding(cfg: Config) -> bool:
    """``learner.shard_factors`` (off by default: see "When to shard" above)."""
    return bool(cfg.learner.shard_factors)


def components(svf_rank: int | None, shape: tuple[int, int]) -> int:
    """Number of singular components ``k`` kept for a matrix of ``shape`` (out, in)."""
    full = min(shape)
    return full if svf_rank is None else min(svf_rank, full)


def check_shardable(cfg: Config, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise :class:`ConfigError` naming the keys when ``learner.ranks`` does not divide the work."""
    if not use_sharding(cfg):
        return
    R = cfg.learner.ranks
    kind = cfg.policy.kind
    if not policy_class(kind).shardable:
        raise ConfigError(f"learner.shard_factors=true shards SVF factors, but policy.kind={kind!r}; "
                          "set learner.shard_factors=false")
    if cfg.svf.cache_dir is None:
        raise ConfigError("learner.shard_factors needs the factor cache (each rank reads its slice of it): "
                          "set svf.cache_dir or learner.shard_factors=false")
    bad = []
    for name, (out, inp) in shapes.items():
        k = components(cfg.svf.rank, (out, inp))
        if k % R or out % R:
            bad.append(f"{name} (k={k} components, {out} output rows)")
    if bad:
        raise ConfigError(
            f"learner.ranks={R} does not divide the sharded work (learner.shard_factors): every target's singular "
            f"components (svf.rank={cfg.svf.rank}, null = full rank) and output rows must split evenly; "
            f"not: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}. Choose learner.ranks dividing them, "
            "an svf.rank that is a multiple of learner.ranks, or learner.shard_factors=false"
        )


def target_shapes_from_config(cfg: Config) -> dict[str, tuple[int, int]]:
    """``{target: (out, in)}`` from the model's config alone (a ``meta``-device model: no weights are read)."""

    where = resolve_model_path(cfg.model.path, getattr(cfg.model, "cache_dir", None))
    mconf = AutoConfig.from_pretrained(where)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mconf)
    names = select_targets(model, cfg.svf.targets)
    return {n: tuple(model.get_submodule(n).weight.shape) for n in names}


def block(n: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` equal contiguous blocks of ``range(n)``."""
    per = n // parts
    return index * per, (index + 1) * per


def factor_dtype(cfg: Config, on_gpu: bool) -> torch.dtype:
    name = cfg.learner.factor_dtype
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# -- communication ------------------------------------------------------------------------
class Communicator(Protocol):
    """The collectives a sharded layer needs (``learner.sharding.RowComm`` implements them with torch.distributed).

    Tensors are laid out as ``(R, Tmax, D)``: rank ``q``'s tokens in block ``q``, zero-padded
    to the largest token count.
    """

    rank: int
    world: int

    def counts(self, n: int, device) -> list[int]:
        """Every rank's token count."""

    def gather(self, x: torch.Tensor, tmax: int) -> torch.Tensor:
        """``(T, D)`` local rows → ``(R, Tmax, D)`` of all ranks."""

    def reduce(self, buf: torch.Tensor) -> torch.Tensor:
        """``(R, Tmax, D)`` partials of every rank → the summed ``(Tmax, D)`` block of this rank."""


class SoloComm:
    """The :class:`Communicator` of a single process (R = 1): no collectives at all."""

    rank, world = 0, 1

    def counts(self, n: int, device) -> list[int]:
        return [n]

    def gather(self, x: torch.Tensor, tmax: int) -> torch.Tensor:
        return x.unsqueeze(0)

    def reduce(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[0]


# -- the layer ------------------------------------------------------------------------------
class _ShardedLowRank(torch.autograd.Function):
    """``y_r = [Σ_p  X W_pᵀ (rows p)  +  ((X V_p) ⊙ d_p) U_pᵀ]_r`` with the gradient wrt x and d_p."""

    @staticmethod
    def forward(ctx, x, d, layer):
        comm, counts = layer.comm, layer.counts
        T = x.shape[0]
        tmax = max(counts)
        X = comm.gather(x, tmax)                                  # (R, Tmax, in)
        XV = X.to(layer.U.dtype) @ layer.V                        # (R, Tmax, k_p)
        part = ((XV.float() * d).to(layer.U.dtype) @ layer.U.T).to(x.dtype)  # (R, Tmax, out)
        r0, r1 = layer.rows
        part[..., r0:r1] += X @ layer.weight.T
        y = comm.reduce(part)[:T]
        ctx.layer, ctx.T, ctx.tmax = layer, T, tmax
        ctx.save_for_backward(XV, d)
        return y

    @staticmethod
    def backward(ctx, gy):
        layer, T, tmax = ctx.layer, ctx.T, ctx.tmax
        XV, d = ctx.saved_tensors
        comm = layer.comm
        G = comm.gather(gy.contiguous(), tmax)                   # (R, Tmax, out)
        A = G.to(layer.U.dtype) @ layer.U                        # (R, Tmax, k_p)
        gd = (XV.float() * A.float()).sum(dim=(0, 1)) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:  # the same on every rank (same graph), so the collective stays in step
            gX = ((A.float() * d).to(layer.V.dtype) @ layer.V.T).to(gy.dtype)  # (R, Tmax, in)
            r0, r1 = layer.rows
            gX += G[..., r0:r1] @ layer.weight
            gx = comm.reduce(gX)[:T]
        return gx, gd, None


class ShardedSVFLinear(nn.Module):
    """A target ``nn.Linear`` cut to this rank's rows of W and components of U, V.

    ``d`` (this rank's slice of ``S ⊙ f(z) − S``) and ``counts`` (every rank's token
    count) are set by :meth:`ShardedSVF.forward` for the duration of one model forward.
    """

    def __init__(self, name: str, linear: nn.Linear, rows: tuple[int, int], U: torch.Tensor, V: torch.Tensor,
                 comm: Communicator):
        super().__init__()
        self.name = name
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = rows
        self.comm = comm
        w = linear.weight.detach()
        self.register_buffer("weight", w[rows[0]:rows[1]].clone(), persistent=False)
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("V", V, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        self.d: torch.Tensor | None = None
        self.counts: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.d is None:
            raise RuntimeError(f"{self.name}: a sharded SVF layer runs only inside ShardedSVF.forward(z, ...)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] != self.counts[self.comm.rank]:
            raise RuntimeError(f"{self.name}: {x2.shape[0]} tokens but the forward announced "
                               f"{self.counts[self.comm.rank]}; the ranks would fall out of step")
        y = _ShardedLowRank.apply(x2, self.d, self).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> dict[str, int]:
        def b(t):
            return 0 if t is None else t.numel() * t.element_size()

        return {"weight": b(self.weight) + b(self.bias), "factors": b(self.U) + b(self.V)}


# -- the model ------------------------------------------------------------------------------
class ShardedSVF(SVFKind):
    """The ``svf`` policy kind cut over ranks, for the learner: ``forward(z, **inputs)`` with sharded layers.

    It keeps the policy contract (:class:`t2dist.policy.base.Policy`) except the generation
    path: ``merge_``, ``unmerge_`` and ``merged_model`` raise ``NotImplementedError``.

    ``z`` is the full replicated vector per target; each layer uses its rank's slice.
    ``factors[name]`` is a :class:`Factors` of this rank's ``U_p``, the full ``S`` and ``V_p``
    (``rl_loss`` reads the device from it).
    """

    def __init__(self, model: nn.Module, layers: dict[str, ShardedSVFLinear], S: dict[str, torch.Tensor],
                 comps: dict[str, tuple[int, int]], parametrization: Parametrization, *, fingerprint: str,
                 rank: int | None, target_spec: str, comm: Communicator, bytes_read: int = 0):
        self.model = model
        self.layers = layers
        self.S = S
        self.comps = comps
        self.parametrization = parametrization
        self.fingerprint = fingerprint
        self.rank = rank
        self.target_spec = target_spec
        self.comm = comm
        self.bytes_read = bytes_read
        self.targets = list(layers)
        self.compute_dtype = torch.float32
        self.factors = {n: Factors(layers[n].U, S[n], layers[n].V) for n in self.targets}
        self.device = S[self.targets[0]].device
        self.merged_version: object = None

    @property
    def num_z(self) -> int:
        return sum(s.numel() for s in self.S.values())

    def init_z(self, scale: float = 1.0) -> Z:
        raw = self.parametrization.raw_for_scale(scale)
        return {n: torch.full(s.shape, raw, device=s.device, dtype=torch.float32) for n, s in self.S.items()}

    def neutral_z(self) -> Z:
        return self.init_z(1.0)

    def delta(self, name: str, z: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This rank's share ``U_p diag(d_p) V_pᵀ`` of the weight change (the whole change at R = 1)."""
        layer, S = self.layers[name], self.S[name]
        a, b = self.comps[name]
        d = (self.parametrization.singular_values(S, z[name].to(S.device, torch.float32)) - S)[a:b]
        return (layer.U.float() * d) @ layer.V.float().T

    def forward(self, z: Mapping[str, torch.Tensor], **inputs):
        ids = inputs.get("input_ids")
        n = int(ids.numel()) if ids is not None else int(inputs["inputs_embeds"].shape[:-1].numel())
        counts = self.comm.counts(n, self.device)
        for name, layer in self.layers.items():
            S = self.S[name]
            d = self.parametrization.singular_values(S, z[name].to(S.device, torch.float32)) - S
            a, b = self.comps[name]
            layer.d, layer.counts = d[a:b], counts
        try:
            return self.model(**inputs)
        finally:
            for layer in self.layers.values():
                layer.d = None

    __call__ = forward

    def bind(self, z: Mapping[str, torch.Tensor]):
        """``forward`` with ``z`` fixed; each call announces its own token count to the other ranks."""
        return lambda **inputs: self.forward(z, **inputs)

    def merge_(self, *a, **k):
        raise NotImplementedError("a sharded learner model never generates; rollout actors hold a full SVFModel")

    unmerge_ = merge_
    merged_model = merge_

    def memory(self) -> dict[str, int]:
        """Resident bytes on this rank: factors (U_p, V_p, S), target weights (W_p), other weights (replicated)."""
        sharded = {id(t) for layer in self.layers.values() for t in (layer.weight, layer.U, layer.V, layer.bias)
                   if t is not None}
        other = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers())
                    if id(t) not in sharded)
        per = [layer.nbytes() for layer in self.layers.values()]
        s_bytes = sum(s.numel() * s.element_size() for s in self.S.values())
        return {"factor_bytes": sum(p["factors"] for p in per) + s_bytes,
                "target_weight_bytes": sum(p["weight"] for p in per),
                "other_weight_bytes": other, "factor_bytes_read": self.bytes_read}


def shard_model(model: nn.Module, slices: Mapping, comm: Communicator, parametrization: Parametrization, *,
                fingerprint: str = "", svf_rank: int | None = None, target_spec: str = "",
                bytes_read: int = 0) -> ShardedSVF:
    """Replace each target ``nn.Linear`` named in ``slices`` by its :class:`ShardedSVFLinear` (rows of W
    ``comm.rank`` of ``comm.world``; ``slices[name]`` has ``U``, ``S``, ``V``, ``start``, ``stop``)."""
    layers = {}
    for n, sl in slices.items():
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        rows = block(linear.out_features, comm.world, comm.rank)
        layers[n] = ShardedSVFLinear(n, linear, rows, sl.U, sl.V, comm)
        setattr(parent, child, layers[n])  # the full W of this target is dropped here
        del linear
    gc.collect()
    return ShardedSVF(model, layers, {n: sl.S for n, sl in slices.items()},
                      {n: (sl.start, sl.stop) for n, sl in slices.items()}, parametrization, fingerprint=fingerprint,
                      rank=svf_rank, target_spec=target_spec, comm=comm, bytes_read=bytes_read)
