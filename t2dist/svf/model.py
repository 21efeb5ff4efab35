"""The SVF-adapted model: a Hugging Face causal LM plus the factors of its targets.

For every target ``W = U diag(S) Vᵀ`` (possibly truncated) an expert gives a vector
``z`` and the adapted weight is, in delta form,

    W' = W + U diag(S' − S) Vᵀ,   S' = S ⊙ f(z)   (optionally rescaled)

so neutral ``z`` gives ``W' = W`` exactly and truncated factors leave the residual of
``W`` untouched.  Two execution paths share :meth:`SVFModel.delta`:

* :meth:`merge_` writes ``W'`` into the model's weights in place (for generation);
* :meth:`forward` runs the model through ``torch.func.functional_call`` with ``W'(z)``
  substituted for the target weights, differentiable in ``z`` only — base weights and
  factors never require grad, so no gradient buffers exist for them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from t2dist.svf.factors import Factors, fingerprint as model_fingerprint, get_factors
from t2dist.svf.parametrization import Parametrization
from t2dist.svf.targets import select_targets

Z = dict[str, torch.Tensor]


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


class SVFModel:
    """A base model with the SVF factors of its target matrices.

    Build one with :meth:`from_pretrained_model`; ``z`` dictionaries map target module
    names to raw vectors of length ``rank`` of that target.
    """

    def __init__(
        self,
        model: nn.Module,
        factors: dict[str, Factors],
        parametrization: Parametrization = Parametrization(),
        *,
        fingerprint: str,
        rank: int | None = None,
        target_spec: str = "",
    ):
        self.model = model
        self.parametrization = parametrization
        self.fingerprint = fingerprint
        self.rank = rank
        self.target_spec = target_spec
        self.targets = list(factors)
        first = next(model.parameters())
        # factors and deltas are computed in float32 (float64 for a float64 model, e.g. gradcheck)
        self.compute_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.factors = {n: f.to(device=first.device, dtype=self.compute_dtype) for n, f in factors.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._base: dict[str, torch.Tensor] = {}  # copies of the original W, made on first merge_
        self.merged_version: object = None  # what is merged in now (None: base weights)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained_model(
        cls,
        model: nn.Module,
        *,
        targets: str = "mlp",
        rank: int | None = None,
        parametrization: Parametrization = Parametrization(),
        cache_dir: str | None = None,
        model_name: str = "",
    ) -> tuple["SVFModel", bool]:
        """Select targets, then load factors from the cache or decompose. Returns ``(svf, cache_hit)``."""
        names = select_targets(model, targets)
        fp = model_fingerprint(model)
        factors, hit = get_factors(model, names, rank, cache_dir, model_fingerprint=fp, model_name=model_name)
        return cls(model, factors, parametrization, fingerprint=fp, rank=rank, target_spec=targets), hit

    # -- z vectors ----------------------------------------------------------------------
    @property
    def num_z(self) -> int:
        return sum(f.rank for f in self.factors.values())

    def init_z(self, scale: float = 1.0) -> Z:
        """Raw z vectors whose scale is ``scale`` everywhere (1.0: neutral)."""
        raw = self.parametrization.raw_for_scale(scale)
        return {n: torch.full((f.rank,), raw, device=f.S.device, dtype=self.compute_dtype) for n, f in self.factors.items()}

    def neutral_z(self) -> Z:
        return self.init_z(1.0)

    def check_z(self, z: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.targets if n not in z]
        extra = [n for n in z if n not in self.factors]
        if missing or extra:
            raise KeyError(f"z does not match the targets: missing {missing[:3]}, unexpected {extra[:3]}")
        for n in self.targets:
            if z[n].shape != self.factors[n].S.shape:
                raise ValueError(f"z[{n!r}] has shape {tuple(z[n].shape)}, expected {tuple(self.factors[n].S.shape)}")

    # -- the adapted weights ------------------------------------------------------------
    def delta(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """``U diag(S' − S) Vᵀ`` in the compute dtype (differentiable in ``z``)."""
        f = self.factors[name]
        d = self.parametrization.singular_values(f.S, z.to(f.S.device, self.compute_dtype)) - f.S
        return (f.U * d) @ f.V.T

    def base_weight(self, name: str) -> torch.Tensor:
        return self._base[name] if name in self._base else self.model.get_submodule(name).weight

    def adapted_weights(self, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"<target>.weight": W'}`` for functional_call; differentiable in ``z``."""
        out = {}
        for name in self.targets:
            w = self.base_weight(name)
            out[f"{name}.weight"] = (w.to(self.compute_dtype) + self.delta(name, z[name])).to(w.dtype)
        return out

    def forward(self, z: Mapping[str, torch.Tensor], **inputs) -> object:
        """Run the model with ``W'(z)`` in place of the target weights (the learning path)."""
        return functional_call(self.model, self.adapted_weights(z), args=(), kwargs=inputs, strict=False)

    __call__ = forward

    @torch.no_grad()
    def merge_(self, z: Mapping[str, torch.Tensor], version: object = True) -> None:
        """Write ``W'(z)`` into the model's target weights in place (the generation path)."""
        self.check_z(z)
        for name in self.targets:
            weight = self.model.get_submodule(name).weight
            if name not in self._base:
                self._base[name] = weight.detach().clone()
            base = self._base[name]
            weight.copy_((base.to(self.compute_dtype) + self.delta(name, z[name])).to(weight.dtype))
        self.merged_version = version

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Put the base weights back."""
        for name, base in self._base.items():
            self.model.get_submodule(name).weight.copy_(base)
        self.merged_version = None


def mix_z(zs: Sequence[Mapping[str, torch.Tensor]], alpha: torch.Tensor | Sequence[float]) -> Z:
    """Mix experts: ``z' = Σ_k α_k z_k`` per target.

    ``alpha`` has shape ``(K,)`` (one weight per expert) or ``(K, T)`` (per expert and
    per target, targets in the order of ``zs[0]``).
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    if not zs:
        raise ValueError("mix_z needs at least one expert")
    names = list(zs[0])
    for i, z in enumerate(zs[1:], 1):
        if list(z) != names:
            raise ValueError(f"expert {i} has different targets from expert 0; experts of one base and spec only")
    if alpha.shape[0] != len(zs) or alpha.dim() not in (1, 2) or (alpha.dim() == 2 and alpha.shape[1] != len(names)):
        raise ValueError(f"alpha must have shape ({len(zs)},) or ({len(zs)}, {len(names)}), got {tuple(alpha.shape)}")
    out = {}
    for t, name in enumerate(names):
        weights = alpha if alpha.dim() == 1 else alpha[:, t]
        out[name] = sum(w.to(z[name].device) * z[name].float() for w, z in zip(weights, zs))
    return out
