"""From a config to a ready policy model: load the base, then SVF factors or LoRA adapters (``policy.kind``)."""
from __future__ import annotations

import time

from t2dist.config import Config
from t2dist.models import load_from_config
from t2dist.svf.model import SVFModel
from t2dist.svf.parametrization import Parametrization


def parametrization_from(cfg: Config) -> Parametrization:
    return Parametrization(cfg.svf.parametrization, cfg.svf.max_mult, cfg.svf.rescale)


def policy_parametrization(cfg: Config):
    """What the trainable tensors mean: SVF's parametrization, or the LoRA r/alpha/dropout."""
    if cfg.policy.kind == "lora":
        from t2dist.lora import LoRAParametrization

        return LoRAParametrization(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    return parametrization_from(cfg)


def load_lora(cfg: Config, verbose: bool = False):
    """``(lora, tokenizer)``: the base model with peft LoRA adapters from ``cfg.lora``."""
    from t2dist.lora import LoRAModel

    t0 = time.perf_counter()
    model, tokenizer = load_from_config(cfg.model)
    lc = cfg.lora
    lora = LoRAModel.from_pretrained_model(model, targets=lc.targets, r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                           init_seed=lc.init_seed if lc.init_seed is not None else cfg.rl.seed)
    if verbose:
        print(f"[t2dist] {cfg.model.path}: LoRA r={lc.r} on {len(lora.targets)} matrices, "
              f"{lora.num_z:,} trainable values ({time.perf_counter() - t0:.1f}s)")
    return lora, tokenizer


def load_policy(cfg: Config, verbose: bool = False):
    """``(policy, tokenizer)`` for ``policy.kind``: an SVFModel or a LoRAModel (same duck type)."""
    return load_lora(cfg, verbose) if cfg.policy.kind == "lora" else load_svf(cfg, verbose)


def load_svf(cfg: Config, verbose: bool = False):
    """``(svf, tokenizer)`` for ``cfg.model`` and ``cfg.svf`` (a LoRAModel when ``policy.kind`` is lora)."""
    if cfg.policy.kind == "lora":
        return load_lora(cfg, verbose)
    t0 = time.perf_counter()
    model, tokenizer = load_from_config(cfg.model)
    svf, hit = SVFModel.from_pretrained_model(
        model, targets=cfg.svf.targets, rank=cfg.svf.rank, parametrization=parametrization_from(cfg),
        cache_dir=cfg.svf.cache_dir, model_name=cfg.model.path,
    )
    if verbose:
        how = "loaded from cache" if hit else ("computed and cached" if cfg.svf.cache_dir else "computed")
        print(f"[t2dist] {cfg.model.path}: {len(svf.targets)} target matrices, {svf.num_z:,} z values, "
              f"factors {how} ({time.perf_counter() - t0:.1f}s)")
    return svf, tokenizer
