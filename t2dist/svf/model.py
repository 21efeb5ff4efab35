"""The SVF-adapted model: a Hugging Face causal LM plus the factors of its targets.

For every target ``W = U diag(S) Vᵀ`` (possibly truncated) an expert gives a vector
``z`` and the adapted weight is, in delta form,

    W' = W + U diag(S' − S) Vᵀ,   S' = S ⊙ f(z)   (optionally rescaled)

so neutral ``z`` gives ``W' = W`` exactly and truncated factors leave the residual of
``W`` untouched.  :class:`SVFModel` is the ``svf`` kind of the policy contract
(:class:`t2dist.policy.base.Policy`); its two execution paths share :meth:`SVFModel.delta`:

* :meth:`merge_` writes ``W'`` into the model's weights in place (for generation);
* :meth:`forward` runs the model through ``torch.func.functional_call`` with ``W'(z)``
  substituted for the target weights, differentiable in ``z`` only — base weights and
  factors never require grad, so no gradient buffers exist for them.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from t2dist.config_section import Section
from t2dist.hardware import bf16_matmul
from t2dist.policy.base import Z, card_fields_of, check_z_shapes, merged_in_place
from t2dist.svf.factors import Factors, fingerprint as model_fingerprint, get_factors
from t2dist.svf.parametrization import Parametrization
from t2dist.svf.targets import select_targets


class SVFConfig(Section):
    """The ``svf:`` section: which matrices get a z, how z scales them, where factors are cached."""

    targets: str = Field("mlp", description="preset (mlp, attention, all-linear) or a regex over module names")
    rank: int | None = Field(None, ge=1, description="keep the top-k singular triplets; null = full rank")
    parametrization: Literal["linear", "sigmoid"] = "linear"
    max_mult: float = Field(2.0, gt=1.0)
    rescale: bool = False
    init: float = Field(1.0, gt=0.0, description="initial scale f(z) of every singular value (1 = neutral)")
    cache_dir: str | None = Field(".cache/t2dist/factors", description="factor cache; null disables it")
    delta_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="dtype of U, V and the weight change U diag(S'-S) V^T (W' = W + change stays in the "
                               "model's float32): bfloat16 rebuilds SmolLM2's 90 MLP matrices 5.5x faster on a CPU "
                               "with AVX512-BF16 (bench/shared_prefix.py) and 7x slower on one without; auto: "
                               "bfloat16 where bf16 matmul is native (a GPU with bf16, a CPU with AVX512-BF16 or AMX), "
                               "else float32, decided once per process and logged (t2dist/hardware.py)")


class SVFKind:
    """The class side of the ``svf`` kind, shared by :class:`SVFModel` and the learner's sharded SVF."""

    kind = "svf"
    Config = SVFConfig  # its settings: the svf: section (registered with the kind, t2dist/policy/registry.py)
    mixable = True  # z vectors of one base mix linearly (mix_z): self-adaptation works on them
    shardable = True
    stats_title = "z statistics (scale f(z); 1 = neutral):"

    @staticmethod
    def parametrization_from_config(cfg) -> Parametrization:
        return Parametrization(cfg.svf.parametrization, cfg.svf.max_mult, cfg.svf.rescale)

    @staticmethod
    def parametrization_from_card(card: Mapping[str, Any]) -> Parametrization:
        return Parametrization(**dict(card["parametrization"]))

    @staticmethod
    def config_overrides(card: Mapping[str, Any]) -> dict[str, Any]:
        """``svf.targets``, ``svf.rank`` (None: full rank), the parametrization, of the card."""
        p = card["parametrization"]
        out = {"policy.kind": "svf", "svf.rank": card["rank"] or None, "svf.parametrization": p["kind"],
               "svf.max_mult": p["max_mult"], "svf.rescale": bool(p["rescale"])}
        if card.get("target_spec"):
            out["svf.targets"] = card["target_spec"]
        return out

    def card_fields(self) -> dict[str, Any]:
        return card_fields_of(self)

    def z_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.factors[n].S.shape) for n in self.targets}

    def check_z(self, z: Mapping[str, torch.Tensor]) -> None:
        check_z_shapes(z, self.z_shapes())


def resolve_delta_dtype(name: str, model: nn.Module) -> torch.dtype | None:
    """``svf.delta_dtype`` as a dtype for ``model`` (None: the compute dtype); auto is bfloat16 where bf16 matmul is
    native on the model's device (:func:`t2dist.hardware.bf16_matmul`), and the choice is printed once per process."""
    if name != "auto":
        return {"float32": None, "bfloat16": torch.bfloat16}[name]
    device = next(model.parameters()).device.type
    native, why = bf16_matmul(device)
    _say_once(f"[t2dist] svf.delta_dtype=auto: {'bfloat16' if native else 'float32'} on {device} ({why})")
    return torch.bfloat16 if native else None


@functools.cache
def _say_once(line: str) -> None:
    print(line, flush=True)


class SVFModel(SVFKind):
    """A base model with the SVF factors of its target matrices (the ``svf`` policy kind).

    Build one with :meth:`from_pretrained_model` or :meth:`from_config`; ``z`` dictionaries
    map target module names to raw vectors of length ``rank`` of that target.
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
        delta_dtype: torch.dtype | None = None,
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
        # the change U diag(S' - S) V^T may be built in a cheaper dtype (svf.delta_dtype); S, z and W' stay as they are
        self.delta_dtype = delta_dtype or self.compute_dtype
        if self.delta_dtype != self.compute_dtype:
            self.factors = {n: Factors(f.U.to(self.delta_dtype), f.S, f.V.to(self.delta_dtype)) for n, f in self.factors.items()}
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
        delta_dtype: torch.dtype | None = None,
    ) -> tuple["SVFModel", bool]:
        """Select targets, then load factors from the cache or decompose. Returns ``(svf, cache_hit)``."""
        names = select_targets(model, targets)
        fp = model_fingerprint(model)
        factors, hit = get_factors(model, names, rank, cache_dir, model_fingerprint=fp, model_name=model_name)
        return cls(model, factors, parametrization, fingerprint=fp, rank=rank, target_spec=targets,
                   delta_dtype=delta_dtype), hit

    @classmethod
    def from_config(cls, model: nn.Module, cfg, verbose: bool = False) -> "SVFModel":
        """``cfg.svf`` (targets, rank, parametrization, factor cache) applied to a loaded base model."""
        t0 = time.perf_counter()
        svf, hit = cls.from_pretrained_model(
            model, targets=cfg.svf.targets, rank=cfg.svf.rank, parametrization=cls.parametrization_from_config(cfg),
            cache_dir=cfg.svf.cache_dir, model_name=cfg.model.path, delta_dtype=resolve_delta_dtype(cfg.svf.delta_dtype, model),
        )
        if verbose:
            how = "loaded from cache" if hit else ("computed and cached" if cfg.svf.cache_dir else "computed")
            print(f"[t2dist] {cfg.model.path}: {len(svf.targets)} target matrices, {svf.num_z:,} z values, "
                  f"factors {how} ({time.perf_counter() - t0:.1f}s)")
        return svf

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

    # -- the adapted weights ------------------------------------------------------------
    def delta(self, name: str, z: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``U diag(S' − S) Vᵀ`` of target ``name`` in the compute dtype (differentiable in ``z[name]``)."""
        f = self.factors[name]
        d = self.parametrization.singular_values(f.S, z[name].to(f.S.device, self.compute_dtype)) - f.S
        return ((f.U * d.to(f.U.dtype)) @ f.V.T).to(self.compute_dtype)

    def base_weight(self, name: str) -> torch.Tensor:
        return self._base[name] if name in self._base else self.model.get_submodule(name).weight

    def adapted_weights(self, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"<target>.weight": W'}`` for functional_call; differentiable in ``z``."""
        out = {}
        for name in self.targets:
            w = self.base_weight(name)
            out[f"{name}.weight"] = (w.to(self.compute_dtype) + self.delta(name, z)).to(w.dtype)
        return out

    def forward(self, z: Mapping[str, torch.Tensor], **inputs) -> object:
        """Run the model with ``W'(z)`` in place of the target weights (the learning path)."""
        return functional_call(self.model, self.adapted_weights(z), args=(), kwargs=inputs, strict=False)

    __call__ = forward

    def bind(self, z: Mapping[str, torch.Tensor]):
        """``forward`` with ``z`` fixed; ``W'(z)`` is built once, however often the result is called
        (90 SmolLM2 MLP matrices are ~90 GFLOP to rebuild, more than a shared-prefix pass)."""
        weights = self.adapted_weights(z)
        return lambda **inputs: functional_call(self.model, weights, args=(), kwargs=inputs, strict=False)

    @torch.no_grad()
    def merge_(self, z: Mapping[str, torch.Tensor], version: object = True) -> None:
        """Write ``W'(z)`` into the model's target weights in place (the generation path)."""
        self.check_z(z)
        for name in self.targets:
            weight = self.model.get_submodule(name).weight
            if name not in self._base:
                self._base[name] = weight.detach().clone()
            base = self._base[name]
            weight.copy_((base.to(self.compute_dtype) + self.delta(name, z)).to(weight.dtype))
        self.merged_version = version

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Put the base weights back."""
        for name, base in self._base.items():
            self.model.get_submodule(name).weight.copy_(base)
        self.merged_version = None

    def merged_model(self, z: Mapping[str, torch.Tensor], version: object = True):
        """Context manager: ``self.model`` with ``W'(z)`` merged in, unmerged on exit (export)."""
        return merged_in_place(self, z, version)

    def memory(self) -> dict[str, int]:
        """Resident bytes: factors, target weights, everything else (the unsharded learner reports these)."""
        factors = sum(t.numel() * t.element_size() for f in self.factors.values() for t in (f.U, f.S, f.V))
        targets = {id(self.model.get_submodule(n).weight) for n in self.targets}
        tw = sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) in targets)
        other = sum(p.numel() * p.element_size() for p in list(self.model.parameters()) + list(self.model.buffers())
                    if id(p) not in targets)
        return {"factor_bytes": factors, "target_weight_bytes": tw, "other_weight_bytes": other,
                "factor_bytes_read": factors}


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
