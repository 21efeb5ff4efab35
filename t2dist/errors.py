"""The errors that mean "your input is wrong" (the CLI prints them in one line, no traceback)."""
from t2dist.config import ConfigError
from t2dist.experts import ExpertError
from t2dist.models import ModelLoadError
from t2dist.registry import RegistryError
from t2dist.svf.factors import FactorCacheError
from t2dist.svf.targets import TargetSpecError
from t2dist.tasks.base import ChatTemplateError, UnknownTaskError
from t2dist.tasks.benchmark_data import BenchmarkDataError


class TrainingError(RuntimeError):
    """The run cannot go on (a learner rank died, the cluster is too small, ...)."""

USER_ERRORS = (TrainingError, ConfigError, ExpertError, ModelLoadError, FactorCacheError, TargetSpecError, UnknownTaskError,
               RegistryError, FileNotFoundError, FileExistsError, BenchmarkDataError, ChatTemplateError)
