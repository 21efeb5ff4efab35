"""The DeepSpeed config of the learner, built from ``cfg.learner`` and ``cfg.rl`` (pure, unit-testable)."""
from __future__ import annotations

import warnings

import torch

from t2dist.config import Config


def make_ds_config(cfg: Config, *, on_gpu: bool | None = None) -> dict:
    """The ``ds_config`` dict for ``deepspeed.initialize``.

    * ``zero_optimization.stage`` = ``learner.zero_stage``;
    * ``bf16``/``fp16`` sections only on a GPU (``on_gpu``; default: whether CUDA is
      available). On CPU the engine runs in fp32 and a non-fp32 ``learner.precision``
      is ignored with a warning;
    * ``gradient_clipping`` = ``rl.clip_grad`` (0 = off, as DeepSpeed spells it);
    * ``gradient_accumulation_steps`` = ``learner.grad_accum``;
    * ``train_micro_batch_size_per_gpu`` is nominal: the learner drives backward/step
      itself and never hands a data loader to DeepSpeed.
    """
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    lc = cfg.learner
    ds: dict = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": lc.grad_accum,
        "gradient_clipping": float(cfg.rl.clip_grad) if cfg.rl.clip_grad else 0.0,
        "zero_optimization": {"stage": lc.zero_stage},
        "steps_per_print": 2**31 - 1,  # the driver does the logging
        "wall_clock_breakdown": False,
        # a client torch optimizer is what we pass; allow it under ZeRO too
        "zero_allow_untested_optimizer": True,
    }
    if lc.precision != "fp32":
        if on_gpu:
            ds[lc.precision] = {"enabled": True}
            if lc.precision == "fp16":
                ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16})
        else:
            warnings.warn(
                f"learner.precision={lc.precision!r} needs a GPU; the CPU learner runs in fp32",
                stacklevel=2,
            )
    return ds
