"""The Hugging Face rollout engine (``rollout.engine=hf``): the policy's model in this process.

:class:`HFEngine` is :class:`t2dist.engines.in_process.InProcessEngine` (shared-prefix sampling,
``set_z`` merges ``W'(z)`` into the model in place; see that module) built from a config: it loads
``policy.kind``'s policy unless it is given one already loaded (train-local shares its policy
between its sampling and its evaluation engines).
"""
from __future__ import annotations

from t2dist.engines.in_process import InProcessEngine
from t2dist.policy.load import load_policy


class HFEngine(InProcessEngine):
    name = "hf"

    def __init__(self, cfg=None, *, policy=None, tokenizer=None, batch_size: int | None = None):
        """Loads ``policy.kind``'s policy from ``cfg`` unless ``policy``/``tokenizer`` are given (shared);
        ``batch_size`` defaults to ``cfg.rollout.batch_size``."""
        if policy is None:
            policy, tokenizer = load_policy(cfg)
        super().__init__(policy, tokenizer, batch_size or cfg.rollout.batch_size)
