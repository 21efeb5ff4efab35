"""From a config to a ready SVF model: load the base, pick targets, load or compute factors."""
from __future__ import annotations

import time

from t2dist.config import Config
from t2dist.models import load_from_config
from t2dist.svf.model import SVFModel
from t2dist.svf.parametrization import Parametrization


def parametrization_from(cfg: Config) -> Parametrization:
    return Parametrization(cfg.svf.parametrization, cfg.svf.max_mult, cfg.svf.rescale)


def load_svf(cfg: Config, verbose: bool = False):
    """``(svf, tokenizer)`` for ``cfg.model`` and ``cfg.svf``."""
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
