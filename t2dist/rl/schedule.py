"""Learning-rate schedules over RL steps (``rl.lr_schedule``), shared by ``train-local`` and the learner.

``constant`` keeps ``rl.lr``; ``linear`` and ``cosine`` decay it to 0 over ``rl.steps`` with the
factors of Hugging Face's ``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup``
without warm-up, the schedules TRL's ``GRPOTrainer`` takes by ``lr_scheduler_type``: a t2dist run
and a TRL run with the same settings decay alike (``tests/test_rl_math.py`` checks the factors
against transformers').  Why decay at all: at a constant lr of 2e-3 the SmolLM2 arith runs swing
by 8-14 validation points between checks late in the run (bench/results/2026-11-30-real-models-fast.md).

The factor is a function of the 0-based RL step alone, so a resumed run (the learner's
``global_steps`` come back with its checkpoint) continues the same schedule with no state of its own.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

# The one list of schedule names: ``RLConfig.lr_schedule`` is typed with it, ``lr_factor`` reports it.
LrSchedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(LrSchedule)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The multiplier of ``rl.lr`` for 0-based RL step ``step`` of ``steps``."""
    if schedule == "constant":
        return 1.0
    progress = min(max(step, 0), steps) / max(1, steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"rl.lr_schedule: unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")


def set_step_lr(optimizer, rl, step: int) -> float:
    """Set every parameter group of ``optimizer`` to step ``step``'s lr (``rl``: the ``rl`` config); returns it."""
    lr = rl.lr * lr_factor(rl.lr_schedule, step, rl.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
