"""Published experts: versions, aliases, integrity hashes, on a local disk or any fsspec URL."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from t2dist.experts.expert import check_compatible, read_expert
from t2dist.registry.store import DEFAULT_ALIAS, ExpertRef, Registry, RegistryError, check_name, sha256_hex

__all__ = ["DEFAULT_ALIAS", "ExpertRef", "Registry", "RegistryError", "check_name", "load_expert_ref",
           "read_expert_ref", "sha256_hex", "default_registry_url"]


def default_registry_url() -> str:
    """``$T2DIST_REGISTRY`` or ``./registry``."""
    return os.environ.get("T2DIST_REGISTRY", "registry")


def read_expert_ref(ref: str, registry: str | Registry | None = None,
                    storage_options: Mapping[str, Any] | None = None):
    """An :class:`~t2dist.experts.expert.Expert` from an expert directory or a registry reference.

    An existing directory wins; otherwise ``ref`` is ``NAME[@VERSION|:ALIAS]`` in ``registry``
    (default :func:`default_registry_url`).
    """
    if Path(ref).is_dir():
        return read_expert(ref)
    if registry is None and ("/" in ref or os.sep in ref):
        return read_expert(ref)  # a path that does not exist: the directory error names it
    reg = registry if isinstance(registry, Registry) else Registry(registry or default_registry_url(),
                                                                   storage_options)
    return reg.load(ref)


def load_expert_ref(ref: str, policy, registry: str | Registry | None = None,
                    storage_options: Mapping[str, Any] | None = None):
    """Like :func:`read_expert_ref`, then checked against ``policy`` (any kind) and moved to its device."""
    expert = read_expert_ref(ref, registry, storage_options)
    check_compatible(expert, policy, source=f"expert {ref}")
    device = next(policy.model.parameters()).device
    expert.z = {k: v.to(device) for k, v in expert.z.items()}
    return expert
