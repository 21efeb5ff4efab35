"""Run checkpoints: z, best z, step, data position, RNG states and best metric, written atomically.

Layout inside a run directory::

    checkpoints/step-000006/{z.safetensors, best_z.safetensors, state.json, learner/...}
                            # + rollout_z.safetensors with rl.off_policy_steps=1 (z of the batch in flight)
    checkpoints/latest          # text file naming the newest complete checkpoint

A checkpoint directory is assembled under a temporary name (everything, the best z
included) and renamed into place, and ``latest`` is replaced atomically afterwards
(``t2dist/atomic.py``), so a crash never leaves a half-written checkpoint that resume would
pick up, nor a complete-looking one without its best z.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from t2dist.atomic import atomic_write_json, atomic_write_text

LATEST = "latest"
BEST_Z = "best_z.safetensors"
ROLLOUT_Z = "rollout_z.safetensors"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, list):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def begin_checkpoint(run_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """A fresh temporary directory to fill, and the final name it will get."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, final


def _save_z(z: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in z.items()}, str(path))


def commit_checkpoint(tmp: Path, final: Path, z: Mapping[str, torch.Tensor], state: Mapping[str, Any],
                      best_z: Mapping[str, torch.Tensor] | None = None,
                      rollout_z: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write z, the best z (and the z of a rollout in flight) and state into ``tmp``, rename it to ``final``
    and point ``latest`` at it.

    Everything resume reads is inside ``tmp`` before the rename: a crash at any point leaves
    either the previous checkpoint or this one complete.
    """
    _save_z(z, tmp / "z.safetensors")
    for name, extra in ((BEST_Z, best_z), (ROLLOUT_Z, rollout_z)):
        if extra is not None:
            _save_z(extra, tmp / name)
    atomic_write_json(tmp / "state.json", _jsonable(dict(state)), indent=1)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(final.parent / LATEST, final.name)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    return load_file(str(path / "z.safetensors")), json.loads((path / "state.json").read_text())


def load_extra_z(path: str | os.PathLike, name: str = BEST_Z) -> dict[str, torch.Tensor] | None:
    """The best z (``BEST_Z``) or rollout z (``ROLLOUT_Z``) stored with a checkpoint; None when it has none."""
    file = Path(path) / name
    return load_file(str(file)) if file.is_file() else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    root = checkpoint_root(run_dir)
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
