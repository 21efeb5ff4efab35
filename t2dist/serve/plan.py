"""What a server serves, decided once at start: the base, its experts, auto's routes, the first pass.

:func:`make_plan` runs before any replica starts.  It loads the base model once (converting
SmolLM2 from its GGUF the first time) for two facts no card gives: its fingerprint, which says
which experts of the registry belong to it, and its length limit.  Then it reads the cards (not
the z files) of the experts to serve:

* ``serve.experts`` lists references: each one's name is served, and a request naming just the
  name gets the listed reference (``arith:champion`` follows the alias, ``arith`` the latest
  version, ``arith@2`` stays on version 2); any version or alias of a served name may be requested.
  A listed expert of another base model or policy setup is an error before anything starts.
* ``serve.experts: null`` serves every expert in ``registry.url`` trained on this base (newest
  version of each name); experts of other bases are left out with a line saying so, and names
  published later are picked up while serving (:class:`t2dist.serve.resolver.ExpertResolver`).

All served experts share one engine, so they must share one policy setup (kind, targets, rank,
parametrization: ``card_overrides``); the engine is built with the first one's (``config_from_card``)
and every other card, also one published later, is checked against it (:func:`card_problem`).  ``model=auto`` routes a
category (the expert's task's skill: ``arith`` -> ``math``) to the first served expert of that
category; the classifier expert (a ``dispatch`` task) is no route.  The plan is a plain
dataclass: it travels to the Ray Serve replicas as it is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import AutoTokenizer

from t2dist.adapt.loading import dispatch_template, first_pass
from t2dist.config import Config, config_from_dict, dump_config
from t2dist.experts.expert import ExpertError, card_kind
from t2dist.models.loading import gguf_model, load_from_config, resolve_model_path
from t2dist.policy.registry import card_overrides, config_from_card, policy_class
from t2dist.registry import Registry, RegistryError, check_name
from t2dist.registry.store import ExpertRef
from t2dist.serve.dispatch import DispatchSpec
from t2dist.serve.errors import ServeError
from t2dist.svf.factors import fingerprint
from t2dist.svf.targets import select_targets
from t2dist.tasks import TASKS, get_task

log = logging.getLogger(__name__)


def ServePlanError(message: str) -> ServeError:  # noqa: N802 - raised like a class
    """A server that cannot start as configured (the message names the key or expert)."""
    return ServeError(message, status=500, type="server_error", code="bad_config")


@dataclass
class ServePlan:
    config: dict[str, Any]  # the run config (dump_config), its policy setup taken from the experts' cards
    model_name: str
    base_names: tuple[str, ...]
    fingerprint: str
    experts: dict[str, str]  # served name -> the reference a request naming just the name gets
    categories: dict[str, str | None]  # served name -> auto's category (None: the classifier, no route)
    dynamic: bool  # serve.experts is null: names published later are served too
    cls_expert: str | None  # the classifier's reference (strategy cls)
    max_model_len: int
    dispatch: DispatchSpec
    has_chat_template: bool
    full_rank: int  # the most singular triplets a target has (serve.mode=lora sizes its adapters by it)
    registry_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        return config_from_dict(self.config)

    @property
    def serve(self):
        return self.cfg.serve

    def routes(self, categories: dict[str, str | None] | None = None) -> dict[str, str]:
        """category -> expert name: the first served expert of each category."""
        out: dict[str, str] = {}
        for name, cat in (categories if categories is not None else self.categories).items():
            if cat and cat not in out:
                out[cat] = name
        return out


def base_names(path: str) -> tuple[str, ...]:
    """What ``model`` may say to mean the base: ``base``, ``model.path``, its last part, a GGUF model's aliases."""
    names = ["base", path, Path(path.rstrip("/")).name]
    spec = gguf_model(path)
    if spec is not None:
        names += list(spec.names)
    return tuple(dict.fromkeys(n for n in names if n))


def load_tokenizer(model_cfg):
    """The base's tokenizer alone, as :func:`t2dist.models.loading.load_model` loads it (the ingress needs no model)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.path, model_cfg.cache_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_facts(cfg: Config):
    """``(model, fingerprint, max_model_len, has_chat_template)`` of the base (the caller frees the model)."""
    model, tokenizer = load_from_config(cfg.model)
    fp = fingerprint(model)
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    if cfg.rollout.vllm.max_model_len:
        limits.append(cfg.rollout.vllm.max_model_len)
    max_len = min(int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7)
    return model, fp, max_len, bool(getattr(tokenizer, "chat_template", None))


def full_rank(model, cfg: Config) -> int:
    """The most singular triplets a target of ``cfg``'s policy setup has (``serve.mode=lora``'s adapter rank)."""
    if cfg.policy.kind != "svf":
        return cfg.lora.r
    ranks = [min(model.get_submodule(n).weight.shape) for n in select_targets(model, cfg.svf.targets)]
    return min(cfg.svf.rank, max(ranks)) if cfg.svf.rank else max(ranks)


def setup_mismatch(card: dict, cfg: Config) -> dict[str, tuple]:
    """``{config key: (engine's value, card's value)}`` where the card's policy setup differs from ``cfg``'s."""
    data = dump_config(cfg)
    out = {}
    for key, want in card_overrides(card).items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != want:
            out[key] = (node, want)
    return out


def card_problem(card: dict, fingerprint: str, cfg: Config | None) -> str | None:
    """Why an expert card cannot be served by this base (and by an engine set up as ``cfg``); None: it can."""
    try:
        kind = card_kind(card)
    except ExpertError as exc:
        return str(exc)
    if not policy_class(kind).mixable:
        return f"it is a {kind} expert (the server switches z vectors of SVF experts)"
    if card.get("base_fingerprint") != fingerprint:
        return (f"it was trained on another base model ({card.get('base_model') or '?'}, fingerprint "
                f"{card.get('base_fingerprint')}; this base's is {fingerprint})")
    diff = setup_mismatch(card, cfg) if cfg is not None else {}
    if diff:
        return "its policy setup differs from the served engine's: " + ", ".join(
            f"{k}={v[1]!r} (engine: {v[0]!r})" for k, v in diff.items())
    return None


def category(card: dict) -> str | None:
    """auto's category of an expert: its task's skill (None for a classifier, a ``dispatch`` task)."""
    task = card.get("task", "")
    skill = TASKS[task].skill if task in TASKS else ""
    if skill == "dispatch":
        return None
    return skill or card.get("name")


def _served_cards(cfg: Config, registry, fp: str, say: Callable[[str], None]) -> tuple[dict, dict, Config]:
    """``({name: ref}, {name: card}, cfg with the first served expert's policy setup)``."""
    explicit = cfg.serve.experts is not None
    refs = list(cfg.serve.experts) if explicit else (registry.names() if registry is not None else [])
    if explicit and refs and registry is None:
        raise ServePlanError("serve.experts names experts but registry.url is not set")
    served, cards, setup = {}, {}, None  # setup: the engine's config once the first expert fixed it
    for ref in refs:
        try:
            name = ExpertRef.parse(ref).name
            check_name(name)
            card = registry.card(ref)
        except RegistryError as exc:
            if explicit:
                raise ServePlanError(f"serve.experts: {exc}") from None
            say(f"not serving {ref!r}: {exc}")
            continue
        why = card_problem(card, fp, setup)
        if why:
            if explicit:
                raise ServePlanError(f"serve.experts: expert {ref!r} cannot be served with this base: {why}")
            say(f"not serving {name!r}: {why}")
            continue
        setup = setup if setup is not None else config_from_card(cfg, card)
        if name in served:
            raise ServePlanError(f"serve.experts lists {name!r} twice ({served[name]!r} and {ref!r})")
        served[name], cards[name] = ref, card
    return served, cards, setup or cfg


def make_plan(cfg: Config, say: Callable[[str], None] = print) -> ServePlan:
    """Everything the server needs to know before it starts (module docstring); errors name the key."""
    s = cfg.serve
    if s.mode == "lora" and s.engine == "hf":
        raise ServePlanError("serve.mode=lora runs on vLLM's multi-LoRA path: use serve.engine=vllm (or auto)")
    registry = None
    if cfg.registry.url:
        try:
            registry = Registry(cfg.registry.url, cfg.registry.storage_options)
        except RegistryError as exc:
            raise ServePlanError(f"registry.url: {exc}") from None
    model, fp, max_len, chat = model_facts(cfg)
    served, cards, engine_cfg = _served_cards(cfg, registry, fp, say)
    cats = {n: category(c) for n, c in cards.items()}
    names = base_names(cfg.model.path)
    for n in served:
        if n in names or n == "auto":
            raise ServePlanError(f"expert name {n!r} collides with the base model's names {names} or 'auto'; "
                                 "publish it under another name")
    cls_ref, cls_card = (None, None) if s.strategy != "cls" else _check_cls(cfg, registry, fp,
                                                                            engine_cfg if cards else None)
    cfg = engine_cfg if cards else (config_from_card(cfg, cls_card) if cls_card else cfg)
    rank = full_rank(model, cfg)
    del model
    plan = ServePlan(dump_config(cfg), cfg.model.path, names, fp, served, cats, s.experts is None, cls_ref,
                     max_len, DispatchSpec("", "never", "", 1, None, ()), chat, rank, cfg.registry.url,
                     dict(cfg.registry.storage_options))
    task = get_task(cfg.adapt.dispatch_task)
    plan.dispatch = DispatchSpec(dispatch_template(cfg), **_first_pass(first_pass(task)),
                                 prompt_tokens=s.dispatch_prompt_tokens,
                                 categories=(*plan.routes(), "other"))
    return plan


def _first_pass(fp: dict) -> dict:
    return {"chat": fp["chat"], "answer_prefix": fp["answer_prefix"], "max_new_tokens": fp["dispatch_max_new_tokens"]}


def _check_cls(cfg: Config, registry, fp: str, engine_cfg: Config | None) -> tuple[str, dict]:
    ref = cfg.serve.cls_expert
    if registry is None:
        raise ServePlanError("serve.strategy=cls needs the classifier expert serve.cls_expert in registry.url, "
                             "which is not set; or use serve.strategy=prompt")
    try:
        card = registry.card(ref)
    except RegistryError as exc:
        raise ServePlanError(f"serve.cls_expert={ref!r}: {exc}; or use serve.strategy=prompt") from None
    why = card_problem(card, fp, engine_cfg)
    if why:
        raise ServePlanError(f"serve.cls_expert={ref!r} cannot be served with this base: {why}")
    return ref, card
