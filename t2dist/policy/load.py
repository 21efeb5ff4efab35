"""From a config to a ready policy: load the base model, then wrap it as ``policy.kind`` says.

The kind's own module does the wrapping (``from_config``: SVF factors, LoRA adapters…);
this module only loads the base and looks the kind up in :mod:`t2dist.policy.registry`.
"""
from __future__ import annotations

from t2dist.config import Config
from t2dist.models.loading import load_from_config
from t2dist.policy.registry import parametrization_from_config, policy_class


def policy_parametrization(cfg: Config):
    """What the trainable tensors of ``policy.kind`` mean (SVF's parametrization, LoRA's r/alpha/dropout…)."""
    return parametrization_from_config(cfg)


def load_policy(cfg: Config, verbose: bool = False):
    """``(policy, tokenizer)``: the base model of ``cfg.model`` wrapped as ``policy.kind``."""
    kind = policy_class(cfg.policy.kind)  # an unknown kind fails before the model loads
    model, tokenizer = load_from_config(cfg.model)
    return kind.from_config(model, cfg, verbose=verbose), tokenizer

