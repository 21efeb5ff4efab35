"""Choosing the target matrices: the linear layers that get a ``z`` vector.

A target spec is a preset name (``mlp``, ``attention``, ``all-linear``) or a regular
expression matched (``re.search``) against module names such as
``model.layers.3.mlp.up_proj``.  The output head is never a target.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from t2dist.errors import UserError

# Module-name suffixes across Llama / Mistral / Qwen2 / Gemma (…_proj), GPT-2 / GPT-J /
# GPT-NeoX / Falcon / Phi (fc_in, c_fc, dense_h_to_4h, …) and Mixtral experts (w1/w2/w3).
PRESETS: dict[str, str] = {
    "mlp": r"(?:^|\.)(?:gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|fc_in|fc_out|c_fc|w1|w2|w3"
    r"|dense_h_to_4h|dense_4h_to_h)$|\.mlp\.c_proj$",
    "attention": r"(?:^|\.)(?:q_proj|k_proj|v_proj|o_proj|qkv_proj|query_key_value|c_attn|out_proj)$"
    r"|\.(?:attn|self_attn|attention)\.(?:dense|c_proj)$",
    "all-linear": r".",
}

EXCLUDED = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output|score|classifier)$")


class TargetSpecError(UserError, ValueError):
    """The target spec is not a preset, not a valid regex, or matches no linear layer."""


def compile_spec(spec: str) -> re.Pattern[str]:
    pattern = PRESETS.get(spec, spec)
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TargetSpecError(
            f"svf.targets={spec!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regular expression: {exc}"
        ) from None


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` (and HF ``Conv1D``) in ``model`` except the output head."""
    found = {}
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and not EXCLUDED.search(name):
            found[name] = module
    return found


def select_targets(model: nn.Module, spec: str) -> list[str]:
    """Names of the linear modules matching ``spec``, in model order.

    Raises :class:`TargetSpecError` naming the spec, the presets and some layer names
    of the model when nothing matches — a typo like ``mpl`` fails here, before any SVD.
    """
    pattern = compile_spec(spec)
    layers = linear_layers(model)
    chosen = [name for name in layers if pattern.search(name)]
    if not chosen:
        examples = ", ".join(list(layers)[:6]) or "(the model has no linear layers)"
        model_name = type(model).__name__
        raise TargetSpecError(
            f"svf.targets={spec!r} matched no linear layer of {model_name}. "
            f"Presets: {', '.join(PRESETS)}; some layer names of this model: {examples}"
        )
    for name in chosen:
        if type(layers[name]).__name__ == "Conv1D":
            raise TargetSpecError(f"target {name!r} is a GPT-2 style Conv1D; only nn.Linear targets are supported")
    return chosen


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight
