import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def toy_base():
    """The embedded toy base model and tokenizer (float32, CPU)."""
    from t2dist.models import load_model

    return load_model("toy")
