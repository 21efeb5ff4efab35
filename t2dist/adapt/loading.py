"""From expert references to a ready :class:`~t2dist.adapt.strategies.TwoPass`.

Every check that needs only the cards (unknown name, experts of different base models,
a task with fewer examples than shots) runs before the model is loaded.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from t2dist.adapt.strategies import AdaptError, TwoPass, check_expert_set
from t2dist.config import Config
from t2dist.engines import make_engine
from t2dist.experts.expert import Expert, ExpertError
from t2dist.policy.registry import config_from_card
from t2dist.registry import RegistryError, read_expert_ref
from t2dist.tasks import TASKS, get_task


def read_experts(refs: Sequence[str], registry: str | None = None) -> dict[str, Expert]:
    """``{category: expert}`` for registry refs or expert directories; the category is the task's skill."""
    out: dict[str, Expert] = {}
    for ref in refs:
        ref = ref.strip()
        if not ref:
            continue
        try:
            expert = read_expert_ref(ref, registry)
        except (RegistryError, ExpertError) as exc:
            raise AdaptError(f"expert {ref!r}: {exc}") from None
        cat = category_of(expert, ref)
        if cat in out:
            raise AdaptError(f"experts {ref!r} and {out[cat].card.get('name')!r} both cover category {cat!r}")
        out[cat] = expert
    check_expert_set(out)
    return out


def read_cls_expert(ref: str | None, registry: str | None = None) -> Expert | None:
    if not ref:
        return None
    try:
        return read_expert_ref(ref, registry)
    except (RegistryError, ExpertError) as exc:
        raise AdaptError(f"classifier expert {ref!r}: {exc}") from None


def category_of(expert: Expert, ref: str = "") -> str:
    """The dispatch category an expert serves: its training task's skill (``math`` for a math expert)."""
    task = expert.card.get("task", "")
    if task in TASKS and TASKS[task].skill:
        return TASKS[task].skill
    return expert.card.get("name") or ref


def build_two_pass(cfg: Config, experts: Mapping[str, Expert], cls_expert: Expert | None = None,
                   verbose: bool = False) -> TwoPass:
    """Load the base model with the experts' policy setup into the engine the config names
    (``eval.engine``, else ``rollout.engine``) and check every expert against it."""
    check_expert_set(experts)
    cfg = config_from_card(cfg, next(iter(experts.values())).card)
    if verbose:
        print(f"[t2dist] adaptation engine: {cfg.eval.engine or cfg.rollout.engine}", flush=True)
    engine = make_engine(cfg, cfg.eval.engine or cfg.rollout.engine, batch_size=cfg.adapt.batch_size)
    policy, tokenizer = engine.policy, engine.tokenizer
    device = next(policy.model.parameters()).device
    for e in [*experts.values(), *([cls_expert] if cls_expert else [])]:
        e.z = {k: v.to(device) for k, v in e.z.items()}
    return TwoPass(policy, tokenizer, experts, template=dispatch_template(cfg), cls_expert=cls_expert,
                   batch_size=cfg.adapt.batch_size, engine=engine, **first_pass(get_task(cfg.adapt.dispatch_task)))


def first_pass(dispatch_task) -> dict:
    """How :class:`TwoPass` asks the first-pass question: as the dispatch task writes its prompts
    (chat mode, the written start of the answer, new tokens), so the classifier expert sees
    exactly what it was trained on."""
    return {"chat": dispatch_task.chat, "answer_prefix": dispatch_task.answer_prefix,
            "dispatch_max_new_tokens": dispatch_task.max_new_tokens}


def dispatch_template(cfg: Config) -> str:
    """The first-pass question: ``adapt.template``, else the dispatch task's own (``adapt.dispatch_task``)."""
    return cfg.adapt.template or get_task(cfg.adapt.dispatch_task).template


def cem_settings(cfg: Config):
    """The CEM settings of a run: its ``adapt.cem`` section (``t2dist.adapt.cem.CEMSettings`` is that class)."""
    return cfg.adapt.cem
