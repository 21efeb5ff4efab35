"""Single-process reference RL (``t2dist train-local``): the oracle the distributed pipeline matches.

One step: set ``z`` in the rollout engine (``engine.set_z``: the HF engine merges ``W'(z)`` into
the policy's model), sample ``samples_per_prompt`` completions of ``prompts_per_step`` training
prompts through it (:func:`t2dist.rl.rollout.engine_rollout`, the rollout actors' path), score them
with the task's verifier, compute advantages, and take one Adam step on ``z`` of the
KL-regularised policy-gradient loss, computed on ``engine.policy``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from t2dist.config import Config
from t2dist.engines.base import RolloutEngine
from t2dist.errors import Interrupted
from t2dist.policy.base import Policy
from t2dist.policy.zparams import ZParams
from t2dist.rl.data import training_stream
from t2dist.rl.rollout import engine_rollout
from t2dist.rl.schedule import set_step_lr
from t2dist.rl.step import behaviour_logprobs, kl_wanted, rl_loss
from t2dist.tasks.base import Task


@dataclass
class LocalRun:
    z: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of one step (the same in local and distributed runs)."""
    return seed * 1_000_003 + step


def train_local(cfg: Config, engine: RolloutEngine, task: Task, *, progress: bool = True, callback=None) -> LocalRun:
    """``rl.steps`` steps sampled through ``engine`` (a :class:`t2dist.engines.base.RolloutEngine`; the
    in-process HF engine samples what a rollout actor samples for the same seed and ``rollout.batch_size``)
    on ``engine.policy``; the engine is back on the base weights at the end.  Ctrl-C ends it with
    :class:`t2dist.errors.Interrupted` (nothing is kept: the caller writes the expert at the end)."""
    rl = cfg.rl
    policy: Policy = engine.policy  # any kind: SVF, LoRA
    torch.manual_seed(rl.seed)
    stream = training_stream(task, cfg.task.option_order, rl.seed)
    zp = ZParams(policy.init_z(cfg.svf.init))
    opt = torch.optim.Adam(zp.parameters(), lr=rl.lr)
    history = []
    t_start = time.perf_counter()
    bar = tqdm(range(rl.steps), desc=f"train-local {task.name}", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            rec = local_step(cfg, engine, zp, opt, task, stream.next_batch(rl.prompts_per_step), step)
            history.append(rec)
            bar.set_postfix(reward=f"{rec['reward']:+.2f}", acc=f"{rec['accuracy']:.2f}",
                            kl=f"{rec['kl']:.4f}" if "kl" in rec else "-")
            if callback is not None:
                callback(step + 1, zp.detached(), rec)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"[t2dist] interrupted: train-local stopped after {len(history)} of {rl.steps} steps; "
                          "nothing kept (the expert is written at the end)") from None
    engine.unset_z()
    return LocalRun(z=zp.detached(), history=history, seconds=time.perf_counter() - t_start)


def local_step(cfg: Config, engine: RolloutEngine, zp: ZParams, opt, task: Task, examples, step: int) -> dict:
    """One step (0-based ``step``): sample ``examples`` with z through the engine, update z; returns its record."""
    rl, policy, pad_id = cfg.rl, engine.policy, engine.tokenizer.pad_token_id
    t0 = time.perf_counter()
    engine.set_z(zp.detached(), version=step)
    batch = engine_rollout(engine, task, examples, samples_per_prompt=rl.samples_per_prompt,
                           temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=cfg.task.max_new_tokens,
                           seed=step_seed(rl.seed, step))
    t1 = time.perf_counter()
    lr = set_step_lr(opt, rl, step)
    old_logp = behaviour_logprobs(policy, zp.as_dict(), batch, pad_id=pad_id, share_prefix=rl.shared_prefix) \
        if rl.update_epochs > 1 else None
    for _ in range(rl.update_epochs):
        opt.zero_grad(set_to_none=True)
        loss, stats = rl_loss(policy, zp.as_dict(), batch, rl, pad_id=pad_id, old_logp=old_logp,
                              with_kl=kl_wanted(rl, step + 1))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(zp.parameters(), rl.clip_grad or float("inf"))
        opt.step()
    t2 = time.perf_counter()
    return {
        "step": step + 1,
        "reward": float(batch.rewards.mean()),
        "accuracy": float(batch.correct.float().mean()),
        "loss": loss.item(),
        "grad_norm": float(grad_norm),
        "lr": lr,
        "response_length": float(batch.lengths.float().mean()),
        "rollout_s": t1 - t0,
        "learn_s": t2 - t1,
        **batch.integrity(),
        **stats,
    }
