"""Helpers the driver uses around the learner ranks (no Ray here: the driver wraps the workers).

* :func:`split_batch` cuts a rollout batch into one shard per rank along prompt groups, with
  the advantages computed on the *whole* batch;
* :func:`global_normalizer` is the count every shard's loss is divided by, so that the sum of
  the ranks' gradients equals the single-process gradient of the whole batch;
* :func:`free_port` picks a TCP port for the ``torch.distributed`` rendezvous, :func:`node_ip` an address.
"""
from __future__ import annotations

import socket

import torch

from t2dist.rl.losses import compute_advantages
from t2dist.rl.rollout import RolloutBatch


def check_divisible(prompts: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"learner.ranks must be >= 1, got {world_size}")
    if prompts % world_size:
        raise ValueError(
            f"rl.prompts_per_step={prompts} is not divisible by learner.ranks={world_size}: "
            "each learner rank takes an equal number of whole prompt groups"
        )


def split_batch(
    batch: RolloutBatch, world_size: int, advantages: torch.Tensor | None = None, estimator: str = "group_mean"
) -> list[tuple[RolloutBatch, torch.Tensor]]:
    """``[(shard, advantages_shard)]`` for ranks ``0..world_size-1``: contiguous prompt groups.

    ``advantages`` (``(P, N)``) defaults to ``compute_advantages(batch.rewards, estimator)``
    on the full batch (group estimators only look inside a group, so this equals per-shard
    computation, but a future batch-level estimator would not).
    """
    P = batch.num_prompts
    check_divisible(P, world_size)
    if advantages is None:
        advantages = compute_advantages(batch.rewards, estimator)
    if tuple(advantages.shape) != tuple(batch.rewards.shape):
        raise ValueError(f"advantages have shape {tuple(advantages.shape)}, rewards {tuple(batch.rewards.shape)}")
    per = P // world_size
    out = []
    for r in range(world_size):
        rows = list(range(r * per, (r + 1) * per))
        out.append((batch.select(rows), advantages[r * per:(r + 1) * per].clone()))
    return out


def global_normalizer(batch: RolloutBatch, agg: str) -> float:
    """Total completion tokens (``token_mean``, at least 1) or total sequences (``seq_mean``)."""
    if agg == "token_mean":
        return float(max(batch.num_tokens, 1))
    if agg == "seq_mean":
        return float(len(batch.completion_ids))
    raise ValueError(f"unknown rl.loss_agg {agg!r}; expected token_mean or seq_mean")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on ``host`` (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This node's outgoing address (the driver passes Ray's view of it instead when it has one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
