"""The trainable tensors of any policy kind as an ``nn.Module``: what optimizers and DeepSpeed see.

A policy's ``z`` is a dict ``{name: tensor}`` (SVF: one vector per target matrix; LoRA: every
adapter's A and B).  :class:`ZParams` holds them as float32 parameters in a fixed order, so
train-local's Adam and the DeepSpeed learner step the same tensors the same way.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from t2dist.policy.base import Z


class ZParams(nn.Module):
    """The trainable ``z`` vectors as an ``nn.Module`` (what optimizers and DeepSpeed see)."""

    def __init__(self, z: Mapping[str, torch.Tensor]):
        super().__init__()
        self.names = list(z)
        self.params = nn.ParameterList([nn.Parameter(t.detach().clone().float()) for t in z.values()])

    def as_dict(self) -> Z:
        return dict(zip(self.names, self.params))

    def detached(self) -> Z:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params)}

    def load(self, z: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(z[n])
