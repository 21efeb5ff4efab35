"""Bake one expert into a plain Hugging Face checkpoint.

The policy's ``merged_model`` gives a plain HF model with the expert baked in (SVF:
``W' = W + U diag(S ⊙ (f(z) − 1)) Vᵀ`` written into the target matrices by the same
``merge_`` the rollout actors use; LoRA: a copy with ``W + alpha/r · B A`` and no peft
layers), so any server that loads ``AutoModelForCausalLM``
(vLLM, TGI, llama.cpp after conversion…) serves the expert with no t2dist code.  The
directory also holds the tokenizer and ``t2dist_expert.json`` (the expert's card), and is
written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

EXPERT_CARD_FILE = "t2dist_expert.json"


def export_merged(policy, tokenizer, z: Mapping[str, torch.Tensor], card: Mapping[str, Any],
                  out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the base model with ``z`` merged in to ``out``; the model in ``policy`` is left unmerged."""
    out = check_export_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with policy.merged_model(z, ("export", card.get("name"), card.get("version"))) as model:
            if dtype is not None and dtype != next(model.parameters()).dtype:
                model = _copy_to_dtype(model, dtype)
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        card = {k: v for k, v in card.items() if k != "history"}
        (tmp / EXPERT_CARD_FILE).write_text(json.dumps(card, indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_export_target(out: str | os.PathLike) -> Path:
    """Refuse to write over anything: the target must be absent or an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export directory {out} exists and is not empty; choose another --out")
    return out


def _copy_to_dtype(model, dtype: torch.dtype):
    return copy.deepcopy(model).to(dtype)
