"""Two-pass inference: classify (first pass), then answer with the chosen expert (second pass).

Strategies:

* ``prompt`` — the base model itself names the kind of the prompt (dispatch template);
* ``cls`` — a classifier expert (an SVF expert RL-trained on the ``dispatch`` task) does;
* ``fewshot`` — no per-prompt dispatch: a CEM search over mixing weights α on k
  examples of the task (:mod:`t2dist.adapt.cem`) gives one mixed expert for all prompts.

A prompt labelled ``other`` (or with a category that has no expert) is answered by the
base model.  Requests are grouped by label, so each expert's ``W'`` is composed once
per batch (composing ``W'`` is the expensive step on a real model), however the labels
interleave.

Both passes and the CEM scoring talk to a rollout engine only
(:class:`t2dist.engines.base.RolloutEngine`: ``set_z`` / ``unset_z`` / ``generate``), so they
run on the engine the config names (``eval.engine``, else ``rollout.engine``: hf or vllm).
Without an engine, :class:`TwoPass` wraps its SVF model in the HF engine (in this process).
"""
from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from t2dist.adapt.cem import CEMResult, CEMSettings, Evaluator, cem_search
from t2dist.adapt.dispatch import DEFAULT_TEMPLATE, OTHER, check_template, dispatch_prompt, parse_label
from t2dist.engines.in_process import InProcessEngine
from t2dist.errors import UserError
from t2dist.evaluation.accuracy import generate_grouped, wilson_interval
from t2dist.experts.expert import Expert, ExpertError, card_kind, check_compatible
from t2dist.policy.registry import POLICIES, policy_class
from t2dist.svf.model import mix_z
from t2dist.tasks import get_task
from t2dist.tasks.base import Example, Task, apply_chat_template

STRATEGIES = ("prompt", "cls", "fewshot")
_UNKNOWN = object()
_SERIALS = itertools.count(1)  # tags the versions each TwoPass sets (see TwoPass.current)
DISPATCH_MAX_NEW_TOKENS = 10


class AdaptError(UserError, ValueError):
    """Bad adaptation input (experts, strategy, task, shots); raised before any model work."""


def check_expert_set(experts: Mapping[str, Expert], policy=None) -> None:
    """All experts must come from one base model (and match ``policy`` when given)."""
    if not experts:
        raise AdaptError("adaptation needs at least one expert (adapt.experts / --experts)")
    items = list(experts.items())
    for name, e in items:
        try:
            mixable = policy_class(card_kind(e.card)).mixable
        except ExpertError as exc:
            raise AdaptError(f"expert {name!r}: {exc}") from None
        if not mixable:
            kinds = ", ".join(f"policy.kind={k}" for k, c in sorted(POLICIES.items()) if c.mixable)
            raise AdaptError(f"expert {name!r} is a {e.card.get('kind')} expert; self-adaptation dispatches and "
                             f"mixes z vectors of one base linearly, so use experts trained with {kinds}")
    name0, e0 = items[0]
    for name, e in items[1:]:
        if e.card.get("base_fingerprint") != e0.card.get("base_fingerprint"):
            raise AdaptError(
                f"experts {name0!r} and {name!r} belong to different base models "
                f"({e0.card.get('base_model') or '?'} fingerprint {e0.card.get('base_fingerprint')} vs "
                f"{e.card.get('base_model') or '?'} fingerprint {e.card.get('base_fingerprint')}); "
                f"mix and dispatch only experts of one base")
        if list(e.card.get("targets", [])) != list(e0.card.get("targets", [])):
            raise AdaptError(f"experts {name0!r} and {name!r} adapt different target matrices")
    if policy is not None:
        for name, e in items:
            try:
                check_compatible(e, policy, source=f"expert {name!r}")
            except ExpertError as exc:
                raise AdaptError(str(exc)) from None


def gold_category(example: Example, categories: Sequence[str]) -> str:
    """The dispatch category an example should get: its task's skill, or ``other``."""
    skill = get_task(example.task).skill if example.task else ""
    if example.task == "dispatch":
        return example.answer
    return skill if skill in categories else OTHER


@dataclass
class AdaptRun:
    """What one batch of two-pass inference produced."""

    strategy: str
    labels: list[str]
    texts: list[str]
    correct: list[bool] = field(default_factory=list)
    gold_labels: list[str] = field(default_factory=list)
    first_pass_s: float = 0.0
    second_pass_s: float = 0.0
    merges: int = 0
    cem: CEMResult | None = None

    @property
    def n(self) -> int:
        return len(self.texts)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(sum(self.correct), len(self.correct))

    @property
    def dispatch_accuracy(self) -> float | None:
        if not self.gold_labels or self.strategy == "fewshot":
            return None
        return sum(a == b for a, b in zip(self.labels, self.gold_labels)) / len(self.gold_labels)

    def as_dict(self) -> dict:
        lo, hi = self.interval
        d = {"strategy": self.strategy, "n": self.n, "accuracy": self.accuracy, "ci_low": lo, "ci_high": hi,
             "dispatch_accuracy": self.dispatch_accuracy, "first_pass_s": self.first_pass_s,
             "second_pass_s": self.second_pass_s, "merges": self.merges,
             "labels": {c: self.labels.count(c) for c in sorted(set(self.labels))}}
        if self.cem is not None:
            d["cem"] = self.cem.summary()
        return d


class TwoPass:
    """Dispatch and answer with a fixed set of experts over one SVF model.

    ``experts`` maps a category (``math``, ``code``, ``reasoning``) to its expert;
    ``cls_expert`` is the classifier expert of the ``cls`` strategy; ``engine`` the rollout
    engine that generates (default: the HF engine over ``policy``).
    """

    def __init__(self, policy, tokenizer, experts: Mapping[str, Expert], *, template: str = DEFAULT_TEMPLATE,
                 cls_expert: Expert | None = None, batch_size: int = 64, engine=None, chat: str = "never",
                 answer_prefix: str = "", dispatch_max_new_tokens: int = DISPATCH_MAX_NEW_TOKENS):
        check_expert_set(experts, policy)
        if cls_expert is not None:
            check_expert_set({**experts, "cls": cls_expert}, policy)
        self.policy, self.tokenizer = policy, tokenizer
        self.engine = engine if engine is not None else hf_engine(policy, tokenizer, batch_size)
        # z in the model's target order (safetensors files do not keep the order; mix_z needs one)
        self.experts = {c: Expert({n: e.z[n] for n in policy.targets}, e.card) for c, e in experts.items()}
        self.cls_expert = cls_expert
        self.template = check_template(template)
        self.chat = chat  # how the dispatch question meets the chat template (Task.chat's modes)
        self.answer_prefix = answer_prefix  # the start of the model's answer, written for it ("It is a")
        self.dispatch_max_new_tokens = dispatch_max_new_tokens
        self.batch_size = batch_size
        self.categories = [*self.experts, OTHER]
        self.merges = 0
        self._tag = f"two-pass-{next(_SERIALS)}"
        self._last: tuple[object, object] = (_UNKNOWN, _UNKNOWN)  # (engine version, key) of this object's last set_z

    # -- weights ------------------------------------------------------------------------
    @property
    def current(self) -> object:
        """The key of the weights the engine holds: None (the base), a key this object set last, or
        ``_UNKNOWN`` (weights set by someone else).  The engine's ``version`` is the truth; the versions
        this object sets carry its own tag, so another TwoPass on the same engine or policy with an
        ``("expert", "math")`` of its own is never taken for this one's."""
        version = self.engine.version
        if version is None:
            return None
        return self._last[1] if version == self._last[0] else _UNKNOWN

    def use(self, key: object, z: Mapping[str, torch.Tensor] | None) -> None:
        """Make the engine compute with ``z`` (None: base); composes W' only when ``key`` is not held."""
        if key == self.current:
            return
        if z is None:
            self.engine.unset_z()
            return
        version = (*(key if isinstance(key, tuple) else (key,)), self._tag)
        self.engine.set_z(z, version)
        self._last = (version, key)
        self.merges += 1

    def reset(self) -> None:
        self.use(None, None)

    def _generate(self, prompts: Sequence[str], max_new_tokens: int, stop=("\n",)) -> list[str]:
        comps = self.engine.generate(list(prompts), temperature=0.0, max_new_tokens=max_new_tokens, stop=stop)
        return [c.text for c in comps]

    # -- first pass ---------------------------------------------------------------------
    def classify(self, prompts: Sequence[str], strategy: str = "prompt") -> list[str]:
        """One category per prompt: the base model (``prompt``) or the classifier expert (``cls``)."""
        if strategy == "cls":
            if self.cls_expert is None:
                raise AdaptError("strategy 'cls' needs a classifier expert (adapt.cls_expert / --cls-expert)")
            self.use(("cls", id(self.cls_expert)), self.cls_expert.z)
        elif strategy == "prompt":
            self.use(None, None)
        else:
            raise AdaptError(f"classify: strategy {strategy!r} has no first pass; use prompt or cls")
        questions = [apply_chat_template(dispatch_prompt(p, self.template), self.tokenizer, self.chat, "dispatch")
                     + self.answer_prefix for p in prompts]
        texts = self._generate(questions, self.dispatch_max_new_tokens)
        return [parse_label(t, self.categories) for t in texts]

    # -- second pass --------------------------------------------------------------------
    def answer(self, prompts: Sequence[str], labels: Sequence[str], max_new_tokens: int = 16,
               stop=("\n",), settings: Sequence[tuple[int, tuple[str, ...]]] | None = None) -> list[str]:
        """Answer each prompt with its label's expert; grouped so each expert is merged once.

        ``settings``: one ``(max_new_tokens, stop)`` per prompt (``Task.generation_for``), else
        ``max_new_tokens`` and ``stop`` for all."""
        settings = per_prompt(settings, len(prompts), max_new_tokens, stop)
        out: list[str | None] = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab if lab in self.experts else OTHER, []).append(i)
        # the weights merged now go first (saves one composition when they are needed)
        order = sorted(groups, key=lambda g: (g != self._current_label(), g))
        for lab in order:
            idx = groups[lab]
            if lab == OTHER:
                self.use(None, None)
            else:
                self.use(("expert", lab), self.experts[lab].z)
            texts = generate_grouped(self._generate, [prompts[i] for i in idx], [settings[i] for i in idx])
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]

    def _current_label(self) -> str | None:
        cur = self.current
        if cur is None:
            return OTHER
        return cur[1] if isinstance(cur, tuple) and cur[0] == "expert" else None

    def answer_with(self, key: object, z: Mapping[str, torch.Tensor] | None, prompts: Sequence[str],
                    max_new_tokens: int = 16, stop=("\n",),
                    settings: Sequence[tuple[int, tuple[str, ...]]] | None = None) -> list[str]:
        """Answer every prompt with ``z`` (``settings`` as in :meth:`answer`)."""
        self.use(key, z)
        return generate_grouped(self._generate, list(prompts), per_prompt(settings, len(prompts), max_new_tokens, stop))

    # -- few-shot -----------------------------------------------------------------------
    def mixture_evaluator(self, task: Task, shots: Sequence[Example]) -> Evaluator:
        """Score candidates α locally: greedy accuracy of ``mix_z(experts, α)`` on the shots."""
        zs = [e.z for e in self.experts.values()]

        def evaluate(cands):
            return [score_mixture(self, zs, a, task, shots) for a in cands]

        return evaluate

    def fewshot(self, task: Task, shots: Sequence[Example], settings: CEMSettings,
                evaluator: Evaluator | None = None, log=None) -> CEMResult:
        evaluator = evaluator or self.mixture_evaluator(task, shots)
        return cem_search(len(self.experts), evaluator, settings, num_matrices=len(self.policy.targets), log=log)

    def mixed_z(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        return mix_z([e.z for e in self.experts.values()], alpha)

    # -- a whole batch ------------------------------------------------------------------
    def run(self, task: Task, examples: Sequence[Example], strategy: str, *, shots: Sequence[Example] = (),
            settings: CEMSettings | None = None, evaluator: Evaluator | None = None, log=None) -> AdaptRun:
        """Two-pass inference on ``examples`` of ``task``, scored with the task's verifier."""
        if strategy not in STRATEGIES:
            raise AdaptError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        texts_in = [task.format_prompt(e) for e in examples]  # what the first pass classifies
        prompts = [task.prompt_for(e, self.tokenizer) for e in examples]  # what the second pass answers
        per_example = [task.generation_for(e) for e in examples]
        merges0 = self.merges
        cem = None
        t0 = time.perf_counter()
        if strategy == "fewshot":
            cem = self.fewshot(task, shots, settings or CEMSettings(), evaluator, log)
            labels = ["mixture"] * len(prompts)
        else:
            labels = self.classify(texts_in, strategy)
        t1 = time.perf_counter()
        if strategy == "fewshot":
            texts = self.answer_with(("mixture", tuple(cem.alpha.flatten().tolist())), self.mixed_z(cem.alpha),
                                     prompts, settings=per_example)
        else:
            texts = self.answer(prompts, labels, settings=per_example)
        t2 = time.perf_counter()
        verdicts = task.verify_batch(texts, list(examples))
        return AdaptRun(strategy, labels, texts, [v.correct for v in verdicts],
                        [gold_category(e, self.categories) for e in examples], t1 - t0, t2 - t1,
                        self.merges - merges0, cem)


def per_prompt(settings, n: int, max_new_tokens: int, stop) -> list[tuple[int, tuple[str, ...]]]:
    """``settings`` as a list, or ``(max_new_tokens, stop)`` for each of ``n`` prompts when it is None."""
    return list(settings) if settings is not None else [(max_new_tokens, tuple(stop))] * n


def hf_engine(policy, tokenizer, batch_size: int):
    """The HF engine over an SVF model already loaded in this process (no config needed)."""
    return InProcessEngine(policy, tokenizer, batch_size)


def alpha_key(alpha: torch.Tensor | Sequence[float]) -> tuple:
    """The version key of the mixture ``alpha`` (its weights as a flat tuple)."""
    return ("alpha", tuple(torch.as_tensor(alpha).flatten().tolist()))


def score_alpha(engine, zs, alpha: torch.Tensor, task: Task, shots: Sequence[Example]) -> float:
    """Greedy accuracy of the mixture ``alpha`` of ``zs`` on ``shots`` (one composition of W', in ``engine``).

    The rollout actors' scorer (``actors/adapt.py``); in process, :func:`score_mixture`.
    """
    engine.set_z(mix_z(zs, alpha), alpha_key(alpha))
    return shots_accuracy(engine, task, shots)


def shots_accuracy(engine, task: Task, shots: Sequence[Example]) -> float:
    """Greedy accuracy of whatever ``engine`` holds on ``shots``."""
    comps = generate_grouped(
        lambda ps, n, st: engine.generate(ps, temperature=0.0, max_new_tokens=n, stop=st),
        [task.prompt_for(e, engine.tokenizer) for e in shots], [task.generation_for(e) for e in shots])
    verdicts = task.verify_batch([c.text for c in comps], list(shots))
    return sum(v.correct for v in verdicts) / max(1, len(verdicts))


def score_mixture(tp: "TwoPass", zs, alpha: torch.Tensor, task: Task, shots: Sequence[Example]) -> float:
    """:func:`score_alpha` on ``tp``'s engine, the candidate set through :meth:`TwoPass.use` (counted in ``merges``)."""
    tp.use(alpha_key(alpha), mix_z(zs, alpha))
    return shots_accuracy(tp.engine, task, shots)


def pick_shots(task: Task, k: int, split: str = "train", seed: int = 0) -> list[Example]:
    """``k`` examples of ``task``'s ``split`` for the few-shot search (a clear error when there are fewer)."""
    pool = task.examples(split)
    if k > len(pool):
        raise AdaptError(f"task {task.name!r} has {len(pool)} {split} examples, fewer than "
                         f"adapt.cem.shots={k}")
    rng = random.Random(f"shots/{task.name}/{seed}")
    return rng.sample(pool, k)
