"""The ``lora`` policy kind: a peft LoRA adapter trained by the same RL pipeline as SVF.

:class:`LoRAModel` implements the policy contract (:class:`t2dist.policy.base.Policy`),
so that SVF and LoRA experts differ only in the parametrization:

* the trainable tensors are a dict ``{parameter name: tensor}`` holding every adapter's
  ``lora_A`` (r × in) and ``lora_B`` (out × r) — what SVF calls ``z`` (``init_z``,
  ``neutral_z``, ``check_z``, ``num_z``);
* :meth:`forward` runs the model through ``torch.func.functional_call`` with those
  tensors substituted, differentiable in them only (the learning path);
* :meth:`merge_` / :meth:`unmerge_` write the tensors into the model's adapter
  parameters for generation (the rollout actors' path; the adapter stays un-folded, as
  in TRL + peft without vLLM).

The adapter layers come from ``peft.inject_adapter_in_model`` (peft's own LoRA forward:
``base(x) + B·A·dropout(x) · alpha/r``).  Neutral is ``B = 0``, which reproduces the base
model exactly (a zero is added to every target output).  A is drawn like peft's default
(kaiming-uniform, bound ``1/sqrt(in)``) but from a seeded generator, so every process of
a distributed run — rollout actors, learner ranks, the local oracle — starts from the
same A.  Dropout is applied only in the learning forward (with autograd on); generation,
the KL reference and PPO's behaviour log-probs run without it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from t2dist.config_section import Section
from t2dist.policy.base import card_fields_of, check_z_shapes
from t2dist.svf.factors import fingerprint as model_fingerprint
from t2dist.svf.targets import PRESETS, TargetSpecError, select_targets

Params = dict[str, torch.Tensor]
ADAPTER = "default"
_SUFFIX_LIST = re.compile(r"^[A-Za-z0-9_]+(?:\s*,\s*[A-Za-z0-9_]+)*$")


class LoRAConfig(Section):
    """The ``lora:`` section (peft); the paper's comparison used r=16, alpha=32, dropout 0.05 on q/v."""

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0.0, description="scaling alpha/r of the update B·A")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input, learning forward only")
    targets: str = Field("q_proj,v_proj", description="comma-separated module-name suffixes, a preset or a regex")
    init_seed: int | None = Field(None, description="seed of the A initialisation (null: rl.seed)")


@dataclass(frozen=True)
class LoRAParametrization:
    """What a LoRA expert's tensors mean (stored as the card's ``parametrization``)."""

    kind: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def scale(self, v: torch.Tensor) -> torch.Tensor:
        """Identity: TensorBoard's ``z/*`` histograms then show the adapter values themselves."""
        return v

    def to_dict(self) -> dict:
        return asdict(self)

    def same_function(self, other: object) -> bool:
        """Equal as functions (dropout only matters while training)."""
        return isinstance(other, LoRAParametrization) and self.r == other.r and float(self.alpha) == float(other.alpha)

    def statistics(self, z: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Summary of a LoRA expert: sizes and the norm of its weight changes (0 = neutral)."""
        return lora_statistics(z, self)


def target_pattern(spec: str) -> str:
    """``q_proj,v_proj`` → a regex for those module-name suffixes; presets and regexes pass through."""
    if spec not in PRESETS and _SUFFIX_LIST.match(spec):
        names = [s.strip() for s in spec.split(",")]
        return r"(?:^|\.)(?:" + "|".join(map(re.escape, names)) + r")$"
    return spec


def select_lora_targets(model: nn.Module, spec: str) -> list[str]:
    try:
        return select_targets(model, target_pattern(spec))
    except TargetSpecError as exc:
        raise TargetSpecError(str(exc).replace(f"svf.targets={target_pattern(spec)!r}", f"lora.targets={spec!r}")) from None


class LoRAModel:
    """A base model with peft LoRA adapters on its target matrices (see the module docstring)."""

    kind = "lora"
    Config = LoRAConfig  # its settings: the lora: section (registered with the kind, t2dist/policy/registry.py)
    mixable = False  # A and B of two experts do not mix linearly into a meaningful adapter
    shardable = False
    stats_title = "LoRA statistics (alpha/r·BA; 0 = neutral):"

    def __init__(self, model: nn.Module, targets: list[str], parametrization: LoRAParametrization, *,
                 fingerprint: str, target_spec: str = "", init_seed: int = 0):
        from peft import LoraConfig, inject_adapter_in_model  # lazy: seconds to import, only LoRA needs it

        self.parametrization = parametrization
        self.fingerprint = fingerprint
        self.target_spec = target_spec
        self.targets = list(targets)
        self.rank = parametrization.r
        self.init_seed = int(init_seed)
        first = next(model.parameters())
        self.compute_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        config = LoraConfig(r=parametrization.r, lora_alpha=parametrization.alpha, lora_dropout=parametrization.dropout,
                            target_modules=self.targets, bias="none", init_lora_weights=True)
        self.model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        self.model.eval()
        self._dropouts = [m for n, m in self.model.named_modules()
                          if isinstance(m, nn.Dropout) and ".lora_dropout." in f"{n}."]
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        for t in self.targets:
            layer = self.model.get_submodule(t)
            for part in ("lora_A", "lora_B"):
                name = f"{t}.{part}.{ADAPTER}.weight"
                self.names.append(name)
                self.shapes[name] = tuple(getattr(layer, part)[ADAPTER].weight.shape)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.merged_version: object = None
        self.load_(self.neutral_z())

    @classmethod
    def from_pretrained_model(cls, model: nn.Module, *, targets: str = "q_proj,v_proj", r: int = 16,
                              alpha: float = 32.0, dropout: float = 0.05, init_seed: int = 0) -> "LoRAModel":
        """Select targets (``lora.targets``), fingerprint the *base* weights, then inject the adapters."""
        names = select_lora_targets(model, targets)
        fp = model_fingerprint(model)
        return cls(model, names, LoRAParametrization(r=r, alpha=float(alpha), dropout=float(dropout)),
                   fingerprint=fp, target_spec=targets, init_seed=init_seed)

    @classmethod
    def from_config(cls, model: nn.Module, cfg, verbose: bool = False) -> "LoRAModel":
        """``cfg.lora`` applied to a loaded base model (A seeded by ``lora.init_seed``, else ``rl.seed``)."""
        t0 = time.perf_counter()
        lc = cfg.lora
        lora = cls.from_pretrained_model(model, targets=lc.targets, r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                         init_seed=lc.init_seed if lc.init_seed is not None else cfg.rl.seed)
        if verbose:
            print(f"[t2dist] {cfg.model.path}: LoRA r={lc.r} on {len(lora.targets)} matrices, "
                  f"{lora.num_z:,} trainable values ({time.perf_counter() - t0:.1f}s)")
        return lora

    @staticmethod
    def parametrization_from_config(cfg) -> LoRAParametrization:
        return LoRAParametrization(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)

    @staticmethod
    def parametrization_from_card(card: Mapping[str, Any]) -> LoRAParametrization:
        return LoRAParametrization(**dict(card["parametrization"]))

    @staticmethod
    def config_overrides(card: Mapping[str, Any]) -> dict[str, Any]:
        """``policy.kind=lora`` and the ``lora.*`` r/alpha/dropout/targets of the card."""
        p = card["parametrization"]
        out = {"policy.kind": "lora", "lora.r": p["r"], "lora.alpha": p["alpha"], "lora.dropout": p["dropout"]}
        spec = card.get("lora", {}).get("target_spec") or card.get("target_spec")
        if spec:
            out["lora.targets"] = spec
        return out

    def card_fields(self) -> dict[str, Any]:
        p = self.parametrization
        return card_fields_of(self, lora={"r": p.r, "alpha": p.alpha, "dropout": p.dropout,
                                          "targets": list(self.targets), "target_spec": self.target_spec})

    def memory(self) -> dict[str, int]:
        return {}

    # -- trainable tensors --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_z(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def init_z(self, scale: float | None = None) -> Params:
        """A as peft draws it (seeded by ``init_seed``), B = 0. ``scale`` (SVF's ``svf.init``) is ignored."""
        g = torch.Generator().manual_seed(self.init_seed)
        out = {}
        for name in self.names:
            shape = self.shapes[name]
            if ".lora_A." in name:
                t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(shape[1])
            else:
                t = torch.zeros(shape, dtype=torch.float64)
            out[name] = t.to(device=self.device, dtype=self.compute_dtype)
        return out

    def neutral_z(self) -> Params:
        """``B = 0``: the base model exactly (the KL reference; made once, treat as read-only)."""
        if getattr(self, "_neutral", None) is None:
            self._neutral = self.init_z()
        return self._neutral

    def z_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def check_z(self, z: Mapping[str, torch.Tensor]) -> None:
        check_z_shapes(z, self.shapes)

    def delta(self, target: str, z: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``alpha/r · B A``: the weight change of one target (for tests and traffic comparisons)."""
        A = z[f"{target}.lora_A.{ADAPTER}.weight"].to(self.compute_dtype)
        B = z[f"{target}.lora_B.{ADAPTER}.weight"].to(self.compute_dtype)
        return self.parametrization.scaling * (B @ A)

    # -- the two execution paths --------------------------------------------------------
    @contextlib.contextmanager
    def _dropout_on(self):
        active = self.parametrization.dropout > 0 and torch.is_grad_enabled()
        for m in self._dropouts if active else ():
            m.train()
        try:
            yield
        finally:
            for m in self._dropouts if active else ():
                m.eval()

    def forward(self, z: Mapping[str, torch.Tensor], **inputs) -> object:
        """Run the model with the given adapter tensors (the learning path; differentiable in them)."""
        params = {n: z[n] for n in self.names}
        with self._dropout_on():
            return functional_call(self.model, params, args=(), kwargs=inputs, strict=False)

    __call__ = forward

    def bind(self, z: Mapping[str, torch.Tensor]):
        """``forward`` with ``z`` fixed (nothing to precompute: the adapters are applied per call)."""
        return lambda **inputs: self.forward(z, **inputs)

    @torch.no_grad()
    def load_(self, z: Mapping[str, torch.Tensor]) -> None:
        for n in self.names:
            self.model.get_parameter(n).copy_(z[n])

    @torch.no_grad()
    def merge_(self, z: Mapping[str, torch.Tensor], version: object = True) -> None:
        """Make ``self.model`` the adapted policy (for generation): write the tensors into the adapters."""
        self.check_z(z)
        self.load_(z)
        self.merged_version = version

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Back to the base model (B = 0)."""
        self.load_(self.neutral_z())
        self.merged_version = None

    @contextlib.contextmanager
    def merged_model(self, z: Mapping[str, torch.Tensor], version: object = True) -> Iterator[nn.Module]:
        """A copy of the base model with ``W + alpha/r · B A`` in each target and the peft layers removed."""
        self.check_z(z)
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for target in self.targets:
                layer = model.get_submodule(target)
                base = layer.get_base_layer()
                base.weight += self.delta(target, z).to(base.weight.device, base.weight.dtype)
                parent, _, child = target.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, base)
        yield model


def lora_statistics(z: Mapping[str, torch.Tensor], parametrization: LoRAParametrization) -> dict[str, float]:
    """Summary of a LoRA expert: sizes and the norm of its weight changes (0 = neutral)."""
    targets = sorted({n.split(".lora_")[0] for n in z})
    norms = []
    for t in targets:
        A = z[f"{t}.lora_A.{ADAPTER}.weight"].double()
        B = z[f"{t}.lora_B.{ADAPTER}.weight"].double()
        norms.append(float(torch.linalg.matrix_norm(parametrization.scaling * (B @ A))))
    return {
        "matrices": len(targets),
        "values": sum(v.numel() for v in z.values()),
        "delta_fro_mean": sum(norms) / max(len(norms), 1),
        "delta_fro_max": max(norms, default=0.0),
        "B_abs_mean": float(torch.cat([v.flatten().float().abs() for n, v in z.items() if ".lora_B." in n]).mean()),
    }
