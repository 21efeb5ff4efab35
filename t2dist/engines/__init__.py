"""Rollout engines: where completions are sampled (``rollout.engine`` / ``eval.engine``).

A small registry from name to ``"module:Class"``; classes are imported on first use, so
naming ``vllm`` in a config costs nothing until an engine is built (and a machine without
vLLM can still run everything else).  Adding an engine is one module with a
:class:`~t2dist.engines.base.RolloutEngine` subclass and one :func:`register_engine` line;
an engine with settings passes its section class (a :class:`t2dist.config_section.Section`,
importable without the engine module), which becomes ``rollout.<name>`` in the config
(:func:`t2dist.config.config_class`).

* ``hf``   — Hugging Face model in this process, shared-prefix sampling (``t2dist/engines/hf.py``); no settings;
* ``vllm`` — vLLM with z-only weight updates inside its worker (``t2dist/engines/vllm.py``); ``rollout.vllm``
  (``t2dist/engines/vllm_config.py``).
"""
from __future__ import annotations

import importlib

from t2dist.engines.vllm_config import VLLMConfig

ENGINES: dict[str, str] = {}
#: name -> the section class of an engine that has settings (``rollout.<name>``)
ENGINE_SETTINGS: dict[str, type] = {}


def register_engine(name: str, target: str, settings: type | None = None) -> None:
    """Register ``target`` (``"package.module:Class"``) under ``name``, with its settings section if it has one;
    a duplicate name is an error."""
    if name in ENGINES:
        raise ValueError(f"rollout engine {name!r} is already registered ({ENGINES[name]})")
    if ":" not in target:
        raise ValueError(f"engine target {target!r} must look like 'package.module:Class'")
    ENGINES[name] = target
    if settings is not None:
        ENGINE_SETTINGS[name] = settings


def unregister_engine(name: str) -> None:
    """Remove an engine and its settings (tests that register one of their own leave nothing behind)."""
    ENGINES.pop(name, None)
    ENGINE_SETTINGS.pop(name, None)


def engine_class(name: str):
    """The engine class registered as ``name`` (imports its module)."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known: {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(cfg, name: str | None = None, **kwargs):
    """Build the engine ``name`` (default ``cfg.rollout.engine``) from a :class:`t2dist.config.Config`."""
    return engine_class(name or cfg.rollout.engine)(cfg, **kwargs)


register_engine("hf", "t2dist.engines.hf:HFEngine")
register_engine("vllm", "t2dist.engines.vllm:VLLMEngine", settings=VLLMConfig)
