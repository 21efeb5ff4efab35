"""TensorBoard logging of a run (``tensorboard --logdir runs/`` shows it)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch.utils.tensorboard import SummaryWriter


class Tracker:
    """Scalars and z histograms written as TensorBoard event files in ``<run_dir>/tb``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.writer = None
        if enabled:
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}{k}", float(v), step)

    def z(self, step: int, z: Mapping[str, torch.Tensor], parametrization) -> dict[str, float]:
        """Histogram of all scales f(z) plus summary statistics (also returned)."""
        scales = torch.cat([parametrization.scale(v.float()).flatten() for v in z.values()])
        stats = {"z/scale_mean": float(scales.mean()), "z/scale_std": float(scales.std()),
                 "z/scale_min": float(scales.min()), "z/scale_max": float(scales.max()),
                 "z/mean_abs_change": float((scales - 1).abs().mean())}
        if self.writer is not None:
            self.writer.add_histogram("z/scales", scales, step)
            self.scalars(step, stats)
        return stats

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
