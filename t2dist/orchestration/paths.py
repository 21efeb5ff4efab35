"""Where a run's outputs go: relative output paths, ``output_root`` / ``T2DIST_HOME``, and Ray jobs.

A run writes five kinds of output: its run directory (checkpoints, TensorBoard, expert,
``summary.json``), the registry, the factor cache and the model cache. A relative path among
them resolves against ``output_root`` (config) or ``$T2DIST_HOME`` when one is set, and
against the current directory otherwise.

Under ``ray job submit --working-dir DIR`` the driver runs in a copy of DIR that Ray
unpacks under its session directory (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``)
and deletes with the session: a job that wrote there ended green with nothing on disk
(issue 16). So inside such a copy a relative output path without an output root is an error,
raised before Ray is contacted, that names the keys to set. Ray tells the job's driver
that it is one through ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (its runtime env, with the
``working_dir`` URI); the current directory lying under ``working_dir_files`` says the same.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from t2dist.config import Config, ConfigError

HOME_ENV = "T2DIST_HOME"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint (ray 2.x)
RAY_WORKING_DIR_PART = "working_dir_files"  # Ray unpacks --working-dir under runtime_resources/working_dir_files/


def ray_job_working_dir() -> Path | None:
    """The temporary working-directory copy this process runs in as a Ray job, or None."""
    cwd = Path.cwd()
    if RAY_WORKING_DIR_PART in cwd.parts:
        return cwd
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_ENV, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return cwd if runtime_env.get("working_dir") else None


def output_root(cfg: Config) -> Path | None:
    root = cfg.output_root or os.environ.get(HOME_ENV)
    if not root:
        return None
    root_path = Path(root).expanduser()
    if not root_path.is_absolute():
        key = "output_root" if cfg.output_root else f"${HOME_ENV}"
        raise ConfigError(f"{key}={root!r} must be an absolute path (it is where relative output paths go)")
    return root_path


def _is_local_relative(path: str | None) -> bool:
    return bool(path) and "://" not in path and not Path(path).expanduser().is_absolute()


def relative_outputs(cfg: Config, run_dir: str) -> list[str]:
    """The output keys whose values are relative local paths."""
    keys = {"run_dir": run_dir, "registry.url": cfg.registry.url,
            "svf.cache_dir": cfg.svf.cache_dir, "model.cache_dir": cfg.model.cache_dir}
    return [k for k, v in keys.items() if _is_local_relative(v)]


def resolve_outputs(cfg: Config, run_dir: str | os.PathLike) -> tuple[Config, Path]:
    """``cfg`` with its relative output paths under the output root, and the run directory likewise.

    Raises ``ConfigError`` inside a Ray job's temporary working directory when a relative
    output path has no output root to go to.
    """
    run_dir = str(run_dir)
    relative = relative_outputs(cfg, run_dir)
    root = output_root(cfg)
    job_dir = ray_job_working_dir()
    if root is None and job_dir is not None and relative:
        raise ConfigError(
            f"this run is a Ray job working in a temporary copy of --working-dir ({job_dir}), which Ray deletes "
            f"with its session; relative output paths would be lost: {', '.join(relative)}. Set output_root=/abs/dir "
            f"(or ${HOME_ENV} in the job's runtime env) to keep them under a directory of your choice, or give "
            "those keys absolute paths on storage every node shares (registry.url may be s3://...)")
    if root is None:
        return cfg, Path(run_dir)

    def under(path: str | None) -> str | None:
        return str(root / Path(path).expanduser()) if _is_local_relative(path) else path

    cfg = cfg.model_copy(deep=True)
    cfg.registry.url = under(cfg.registry.url)
    cfg.svf.cache_dir = under(cfg.svf.cache_dir)
    cfg.model.cache_dir = under(cfg.model.cache_dir)
    cfg.run_dir = under(cfg.run_dir)
    return cfg, Path(under(run_dir))
