"""How a raw trainable vector ``z`` turns into new singular values.

* ``linear``: the scale is ``z`` itself; neutral is ``z = 1``.
* ``sigmoid`` (the paper's form): the scale is ``max_mult · sigmoid(p)``; neutral is
  ``p = logit(1 / max_mult)`` (``p = 0`` for the default ``max_mult = 2``).

With ``rescale`` the scaled singular values are multiplied by ``ΣS / Σ(S·scale)`` so
that their sum is kept (the paper's optional normalisation).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Mapping

import torch

KINDS = ("linear", "sigmoid")


@dataclass(frozen=True)
class Parametrization:
    kind: Literal["linear", "sigmoid"] = "linear"
    max_mult: float = 2.0
    rescale: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"svf.parametrization={self.kind!r} is unknown; choose one of {', '.join(KINDS)}")
        if self.kind == "sigmoid" and self.max_mult <= 1.0:
            raise ValueError(f"svf.max_mult must exceed 1 for the sigmoid form (neutral must be reachable), got {self.max_mult}")

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.kind == "linear" else self.max_mult * torch.sigmoid(z)

    def raw_for_scale(self, scale: float) -> float:
        """The raw ``z`` value whose scale is ``scale`` (config gives initial values as scales)."""
        if self.kind == "linear":
            return float(scale)
        q = scale / self.max_mult
        if not 0.0 < q < 1.0:
            raise ValueError(f"initial scale {scale} is out of reach of max_mult·sigmoid with max_mult={self.max_mult}")
        return math.log(q / (1.0 - q))

    def singular_values(self, S: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """New singular values ``S ⊙ f(z)`` (rescaled to keep ΣS if enabled)."""
        s = S * self.scale(z)
        if self.rescale:
            s = s * (S.sum() / s.sum())
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    def same_function(self, other: object) -> bool:
        """Equal as maps from ``z`` to singular values (what an expert's card must match)."""
        return self == other

    def statistics(self, z: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Summary of the scales f(z) an expert applies (1.0 everywhere = neutral)."""
        scales = torch.cat([self.scale(v.float()).flatten() for v in z.values()])
        return {
            "matrices": len(z),
            "values": scales.numel(),
            "scale_mean": float(scales.mean()),
            "scale_std": float(scales.std()) if scales.numel() > 1 else 0.0,
            "scale_min": float(scales.min()),
            "scale_max": float(scales.max()),
            "mean_abs_change": float((scales - 1).abs().mean()),
        }
