"""One data-parallel rank of the DeepSpeed learner.

A plain class: the driver turns it into a Ray actor with
``ray.remote(num_cpus=..., num_gpus=...)(LearnerWorker)`` (this module never imports Ray).

Every rank holds the frozen base model and its SVF factors (or another policy kind) — or,
with ``learner.shard_factors``, a 1/R shard of the target weights and factors
(``t2dist/svf/sharded.py``, built by ``learner/sharding.py``: each rank reads only its
slice of the factor cache); the only trainable parameters (what DeepSpeed and the
optimizer see) are the ``z`` vectors, wrapped in a :class:`~t2dist.policy.zparams.ZParams`
whose ``forward`` is the RL loss of a shard.

Exactness with the single-process oracle (:func:`t2dist.rl.local.train_local`): the
driver computes advantages on the whole batch and the *global* normalizer (total
completion tokens for ``token_mean``, total sequences for ``seq_mean``), so the shard
losses of all ranks *sum* to the single-process loss. DeepSpeed *averages* gradients
over the data-parallel group, so each rank back-propagates ``world_size × loss``: the
averaged gradient is then the sum, i.e. the single-process gradient. Gradient
accumulation splits a shard into ``learner.grad_accum`` micro-batches of whole prompt
groups, each back-propagated with ``scale_wrt_gas=False`` (the global normalizer already
accounts for every token), and DeepSpeed steps the optimizer on the last one.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping

import torch
import torch.distributed as dist

from learner.ds_config import make_ds_config
from learner.group import free_port, node_ip
from learner.sharding import build_sharded_svf
from t2dist.config import Config, config_from_dict
from t2dist.policy.load import load_policy
from t2dist.policy.zparams import ZParams
from t2dist.rl.rollout import RolloutBatch
from t2dist.rl.schedule import set_step_lr
from t2dist.rl.step import behaviour_logprobs, kl_wanted, rl_loss
from t2dist.svf.sharded import use_sharding

STAT_KEYS = ("loss", "pg_loss", "kl", "entropy")
# reported only when the batch carries the rollout engine's log-probs (rl.behaviour_correction, mismatch logging)
BEHAVIOUR_KEYS = ("behaviour_abs_dlogp", "behaviour_kl", "tis_weight", "tis_capped_frac")
CLIENT_KEY = "t2dist"  # our client_state sits under this key, apart from DeepSpeed's own entries


class ZLoss(ZParams):
    """The z vectors as the DeepSpeed module; ``forward`` is the RL loss of a (shard of a) batch.

    The SVF model is a plain attribute (not a submodule), so its frozen weights and factors
    are invisible to DeepSpeed: no gradients, no optimizer state, no ZeRO partitioning.
    Going through the engine's forward keeps ZeRO-3's parameter gathering hooks working.
    """

    def __init__(self, z, policy, rl_cfg, pad_id: int):
        super().__init__(z)
        self.policy = policy
        self.rl_cfg = rl_cfg
        self.pad_id = pad_id

    def forward(self, batch: RolloutBatch, advantages: torch.Tensor, normalizer: float, old_logp=None,
                with_kl: bool = True):
        return rl_loss(self.policy, self.as_dict(), batch, self.rl_cfg, pad_id=self.pad_id,
                       advantages=advantages, normalizer=normalizer, old_logp=old_logp, with_kl=with_kl)


def _micro_batches(batch: RolloutBatch, advantages: torch.Tensor, n: int) -> list[tuple[RolloutBatch, torch.Tensor]]:
    """``n`` micro-batches of whole prompt groups (as even as possible; all non-empty)."""
    P = batch.num_prompts
    if n == 1:
        return [(batch, advantages)]
    if P < n:
        raise ValueError(f"a learner shard of {P} prompt groups cannot make learner.grad_accum={n} micro-batches; "
                         "lower learner.grad_accum or raise rl.prompts_per_step")
    bounds = [round(i * P / n) for i in range(n + 1)]
    return [(batch.select(range(a, b)), advantages[a:b]) for a, b in zip(bounds, bounds[1:])]


class LearnerWorker:
    """One rank: ``deepspeed.init_distributed`` + a DeepSpeed engine over the z vectors."""

    def __init__(self, cfg: Config | Mapping[str, Any], rank: int, world_size: int, master_addr: str | None = None,
                 master_port: int | None = None, local_rank: int = 0):
        """With ``master_addr=None`` the rank waits for :meth:`connect` (the driver first asks rank 0
        for :meth:`endpoint`: on a multi-node cluster the rendezvous must be on rank 0's node)."""
        self.cfg = cfg if isinstance(cfg, Config) else config_from_dict(dict(cfg))
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_rank = int(local_rank)
        if master_addr is not None:
            self.connect(master_addr, master_port)

    def endpoint(self, ip: str | None = None) -> tuple[str, int]:
        """``(ip, free port)`` on this rank's node for ``MASTER_ADDR``/``MASTER_PORT`` (ask rank 0).

        ``ip``: the node's address as the cluster knows it (the driver passes Ray's); default: the outgoing route.
        """
        ip = ip or node_ip()
        return ip, free_port("" if ip != "127.0.0.1" else ip)

    def connect(self, master_addr: str, master_port: int) -> dict:
        """Join the process group, load the frozen model + factors and build the engine (a collective)."""
        t0 = time.perf_counter()
        local_rank = self.local_rank
        lc = self.cfg.learner
        self.on_gpu = torch.cuda.is_available() and lc.gpus_per_rank > 0 and lc.backend != "gloo"
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
        torch.set_num_threads(lc.threads_per_rank)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local_rank),
                          LOCAL_SIZE=str(self.world_size), MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port))
        import deepspeed  # lazy (heavy): only a learner rank builds an engine

        self._deepspeed = deepspeed
        backend = lc.backend if lc.backend != "auto" else ("nccl" if self.on_gpu else "gloo")
        if not self.on_gpu and os.environ.get("T2DIST_DS_SHM_COMM", "0") != "1":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use
            # (about a minute). It only serves inference all-reduce; training uses gloo.
            try:
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            except Exception:  # an older/newer DeepSpeed without this table: just compile
                pass
        if self.on_gpu:
            torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        self.backend = backend

        # the frozen base + factors on this rank's device (a 1/R shard of them under learner.shard_factors)
        device = f"cuda:{local_rank}" if self.on_gpu else "cpu"
        self.sharded = use_sharding(self.cfg)
        if self.sharded:
            self.policy, self.tokenizer = build_sharded_svf(self.cfg, rank=self.rank, world=self.world_size,
                                                         backend=backend, device=device, on_gpu=self.on_gpu)
        else:
            mcfg = self.cfg.model.model_copy(update={"device": device})
            cfg_here = self.cfg.model_copy(update={"model": mcfg})
            self.policy, self.tokenizer = load_policy(cfg_here)
        self.pad_id = self.tokenizer.pad_token_id

        self.ds_config = make_ds_config(self.cfg, on_gpu=self.on_gpu)
        self.zero_stage = lc.zero_stage
        self.grad_accum = lc.grad_accum
        self.module = ZLoss(self.policy.init_z(self.cfg.svf.init), self.policy, self.cfg.rl, self.pad_id)
        # the torch Adam itself: DeepSpeed's wrappers (ZeRO, bf16) step it with its own param_groups,
        # so the lr schedule is set there (t2dist.rl.schedule.set_step_lr)
        self.adam = optimizer = torch.optim.Adam(self.module.parameters(), lr=self.cfg.rl.lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=self.ds_config
        )
        self._z = self._gather_z()
        self.init_seconds = time.perf_counter() - t0
        return self.ready()

    # -- info ---------------------------------------------------------------------------
    def ready(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.engine.device),
            "backend": self.backend,
            "num_z": self.policy.num_z,
            "num_targets": len(self.policy.targets),
            "zero_stage": self.zero_stage,
            "deepspeed": self._deepspeed.__version__,
            "init_seconds": self.init_seconds,
            "sharded": self.sharded,
            "memory": self.memory(),
        }

    def memory(self) -> dict:
        """Resident bytes of this rank: factors, target weights, the rest of the base (see t2dist/svf/sharded.py)."""
        return self.policy.memory()

    # -- z ------------------------------------------------------------------------------
    def _params(self):
        return list(self.engine.module.params)

    def _gather_z(self) -> dict[str, torch.Tensor]:
        """The full z from the engine (a collective under ZeRO-3: every rank calls it)."""
        params = self._params()
        names = self.engine.module.names
        if self.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(params):
                return {n: p.detach().float().cpu().clone() for n, p in zip(names, params)}
        return {n: p.detach().float().cpu().clone() for n, p in zip(names, params)}

    def get_z(self) -> dict[str, torch.Tensor]:
        """The current z (float32, CPU, detached); identical on every rank.

        Served from a copy refreshed by every collective call (``train_step``, ``set_z``,
        ``load_checkpoint``), so it is safe to call on one rank only, even under ZeRO-3.
        """
        return {n: t.clone() for n, t in self._z.items()}

    def set_z(self, z: Mapping[str, torch.Tensor]) -> None:
        """Overwrite z; a collective: call on every rank with the same z. The optimizer state is kept."""
        self.policy.check_z(z)
        params = self._params()
        if self.zero_stage == 3:
            from deepspeed.utils import safe_set_full_fp32_param  # lazy, as deepspeed above

            # modifier_rank=0: rank 0's values are scattered back into every rank's partition on exit
            with self._deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self.engine.module.load(z)
            for n, p in zip(self.engine.module.names, params):
                safe_set_full_fp32_param(p, z[n].detach().float().to(self.engine.device))  # the fp32 masters
        else:
            self.engine.module.load(z)
            # optimizers that keep fp32 master copies (ZeRO 1/2, bf16/fp16) must see the new values
            refresh = getattr(self.optimizer, "refresh_fp32_params", None)
            if callable(refresh):
                refresh()
        self._z = self._gather_z()

    # -- training -----------------------------------------------------------------------
    def _grad_norm_stage0(self) -> float:
        grads = [p.grad.detach().float() for p in self._params() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def _global_sums(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            if self.backend == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def train_step(self, batch: RolloutBatch, advantages: torch.Tensor, normalizer: float) -> dict:
        """One optimizer update from this rank's shard.

        ``advantages`` ``(P_shard, N)`` were computed on the whole batch and ``normalizer`` is
        the global token/sequence count. Returns metrics equal on every rank: ``loss``,
        ``pg_loss``, ``kl``, ``entropy`` summed over ranks (= the single-process values of the
        whole batch), ``grad_norm`` (before clipping), ``seconds``, ``step``.
        """
        t0 = time.perf_counter()
        micro = _micro_batches(batch, advantages, self.grad_accum)
        module = self.engine.module
        epochs = module.rl_cfg.update_epochs
        old = [None] * len(micro)
        if epochs > 1:  # PPO: log-probs of the behaviour policy (z before this batch's updates)
            with torch.no_grad():
                old = [behaviour_logprobs(module.policy, module.as_dict(), mb, pad_id=module.pad_id,
                                          share_prefix=module.rl_cfg.shared_prefix)
                       for mb, _ in micro]
        rl_step = int(self.engine.global_steps) // epochs  # 0-based; restored with a checkpoint
        with_kl = kl_wanted(module.rl_cfg, rl_step + 1)
        lr = set_step_lr(self.adam, module.rl_cfg, rl_step)
        for _ in range(epochs):
            out = self._update(micro, old, normalizer, with_kl)
        self._z = self._gather_z()
        keys = list(out["sums"])  # the same keys on every rank: one config, batches of one engine
        result = dict(zip(keys, self._global_sums([out["sums"][k] for k in keys])))
        result.update(grad_norm=out["grad_norm"], lr=lr, seconds=time.perf_counter() - t0, step=int(self.engine.global_steps),
                      tokens=int(batch.num_tokens))
        if self.on_gpu:  # activations of this step are garbage now: give them back to a colocated rollout actor
            torch.cuda.empty_cache()
        return result

    def _update(self, micro, old, normalizer: float, with_kl: bool = True) -> dict:
        """One optimizer step over the micro-batches of this rank's shard (``kl`` only when ``with_kl``)."""
        sums = dict.fromkeys([k for k in STAT_KEYS if with_kl or k != "kl"], 0.0)
        grad_norm = None
        for i, ((mb, madv), old_logp) in enumerate(zip(micro, old)):
            loss, stats = self.engine(mb, madv, float(normalizer), old_logp, with_kl)
            # ``loss * world_size`` is a new tensor: engine.backward registers it as the loss of
            # this graph, which also switches off the 1/grad_accum scaling hook the engine's
            # forward put on ``loss`` (the global normalizer already counts every micro-batch).
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if i == len(micro) - 1 and self.zero_stage == 0:
                grad_norm = self._grad_norm_stage0()  # after the boundary all-reduce, before clipping
            self.engine.step()
            sums["loss"] += float(loss.detach())
            for k in ("pg_loss", "kl", "entropy"):
                if k in sums:
                    sums[k] += stats.get(k, 0.0)
            for k in BEHAVIOUR_KEYS:
                if k in stats:  # summed over micro-batches: each is normalised by the global count
                    sums[k] = sums.get(k, 0.0) + stats[k]
        if grad_norm is None:
            g = self.engine.get_global_grad_norm()
            grad_norm = float(g) if g is not None else math.nan
        return {"sums": sums, "grad_norm": grad_norm}

    def grads_for(self, batch: RolloutBatch, advantages: torch.Tensor, normalizer: float) -> dict[str, torch.Tensor]:
        """The all-reduced gradient of the whole (global) batch w.r.t. z, without stepping (ZeRO stage 0)."""
        if self.zero_stage != 0:
            raise NotImplementedError("grads_for reads the all-reduced gradients from the parameters: ZeRO stage 0 only")
        micro = _micro_batches(batch, advantages, self.grad_accum)
        eng = self.engine
        try:
            for i, (mb, madv) in enumerate(micro):
                eng.set_gradient_accumulation_boundary(i == len(micro) - 1)
                loss, _ = eng(mb, madv, float(normalizer))
                eng.backward(loss * self.world_size, scale_wrt_gas=False)
            out = {n: p.grad.detach().float().cpu().clone() for n, p in zip(eng.module.names, self._params())}
        finally:
            eng._is_gradient_accumulation_boundary = None  # back to the engine's own micro-step counting
            eng.zero_grad()
        return out

    # -- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None) -> str:
        """DeepSpeed checkpoint (z + optimizer state + ``client_state``); a collective: call on every rank."""
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state={CLIENT_KEY: dict(client_state or {})})
        return os.path.join(str(save_dir), str(tag if tag is not None else f"global_step{self.engine.global_steps}"))

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> dict:
        """Restore z and the optimizer state; returns the saved ``client_state``."""
        path, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {load_dir} (tag {tag!r})")
        self._z = self._gather_z()
        return dict((client_state or {}).get(CLIENT_KEY, {}))

    def shutdown(self) -> None:
        if dist.is_available() and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
