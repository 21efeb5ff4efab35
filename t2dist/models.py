"""Loading base models and tokenizers from a config (local directory, hub name or the toy base)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

TOY_NAME = "toy"
ASSET_TOY = Path(__file__).resolve().parent / "assets" / "toy-base"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The configured model cannot be found or loaded."""


def toy_base_dir(build_if_missing: bool = True) -> Path:
    """The embedded toy base: the checked-in copy, or one built once into the cache."""
    if (ASSET_TOY / "config.json").is_file():
        return ASSET_TOY
    built = Path(os.environ.get("T2DIST_CACHE", ".cache/t2dist")) / "toy-base"
    if not (built / "config.json").is_file():
        if not build_if_missing:
            raise ModelLoadError(f"no toy base at {ASSET_TOY} or {built}; run `t2dist toy-base --out {built}`")
        from t2dist.toy.build import build_toy_base

        print(f"[t2dist] building the toy base model into {built} (one time, a few minutes)")
        build_toy_base(built)
    return built


def resolve_model_path(path: str) -> str:
    """A local directory for ``path``, or the hub name itself when going online is allowed."""
    if path == TOY_NAME:
        return str(toy_base_dir())
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model directory {p} has no config.json; is it a Hugging Face model directory?")
        return str(p)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model path {path} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(
            f"model {path!r} is not a local directory and HF_HUB_OFFLINE=1 forbids downloading it; "
            "set model.path to a local Hugging Face directory (or 'toy' for the embedded toy base)"
        )
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but CUDA is not available on this machine")
    return dev


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` in eval mode, with every parameter frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor on every load is noise

    where = resolve_model_path(path)
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype])
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {path!r} from {where}: {exc}") from None
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_from_config(model_cfg):
    return load_model(model_cfg.path, model_cfg.dtype, model_cfg.device)
