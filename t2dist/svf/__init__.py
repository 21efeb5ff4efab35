"""Singular Value Fine-tuning: targets, factors and their cache, parametrizations, the adapted model."""
from t2dist.svf.factors import FactorCacheError, Factors, fingerprint, get_factors, load_factors
from t2dist.svf.model import SVFModel, mix_z
from t2dist.svf.parametrization import Parametrization
from t2dist.svf.targets import PRESETS, TargetSpecError, select_targets

__all__ = [
    "FactorCacheError", "Factors", "fingerprint", "get_factors", "load_factors",
    "SVFModel", "mix_z", "Parametrization", "PRESETS", "TargetSpecError", "select_targets",
]
