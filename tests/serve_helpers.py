"""Shared by the serving tests: toy experts trained with ``t2dist train-local`` and published to a registry.

``train_toy_experts`` runs the project's own training command (in this process, through the CLI's
``main``) for three tiny experts of the toy base: ``math`` and ``code`` (few RL steps: they answer
differently from the base, which is what the serving tests need) and the classifier ``dispatch``
(the ``dispatch`` task, for ``serve.strategy=cls``), and publishes them to a fresh registry.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from t2dist.serve.process import ServerProcess, env  # noqa: F401  (the serving tests' server runner)

EXPERTS = {"math": "math", "code": "code", "dispatch": "dispatch"}  # name -> task
STEPS = 6


def train_toy_experts(root: Path) -> dict[str, str]:
    """``{"registry": dir, "factors": dir}`` with math@1, code@1, dispatch@1 published."""
    from t2dist.cli.main import main
    from t2dist.registry import Registry

    factors, reg_dir = root / "factors", root / "registry"
    reg = Registry(reg_dir, create=True)
    for name, task in EXPERTS.items():
        out = root / "trained" / name
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["train-local", "--model", "toy", "--task", task, "--steps", str(STEPS), "--out", str(out),
                       "--no-eval", "rl.prompts_per_step=8", "rl.lr=0.02", f"svf.cache_dir={factors}"])
        assert rc == 0, f"train-local {task} failed"
        reg.publish_dir(out, name=name)
    return {"registry": str(reg_dir), "factors": str(factors)}
