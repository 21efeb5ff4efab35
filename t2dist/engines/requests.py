"""Generation per request, for a server: each request its own sampling parameters, streamed text, early stops.

A rollout engine's ``generate`` samples a batch of prompts with one set of parameters.  A server
holds requests that differ (``n``, temperature, top-p, ``max_tokens``, stop strings, seed), wants
them batched anyway, streamed token by token, and stopped early (the client went away; the first
pass's label is decided).  :class:`GenRequest` is one such request;
``engine.generate_requests(requests)`` (:meth:`t2dist.engines.base.RolloutEngine.generate_requests`)
answers a list of them with one list of ``n`` :class:`~t2dist.engines.generation.Completion` per request.

The HF engine (:func:`generate_requests_shared`) runs one shared-prefix decode loop per sub-group of
requests that can share one:

* greedy requests with the same ``n`` and stop strings together, whatever their ``max_tokens``: each
  row is finished at its own limit by the sampler's per-step hook (greedy tokens do not depend on
  the other rows of the batch; tests/test_serve_core.py checks each answer against the request alone);
* sampled requests without a seed with the same ``n``, temperature, top-p and stops together;
* a sampled request with a seed alone: the sampler draws once over the whole batch per step, so a
  seeded row's tokens would depend on its neighbours, and a seed promises the same answer every time.

vLLM takes per-request parameters in one engine loop (``VLLMEngine.generate_requests``).

Streaming: :class:`TextStream` turns one sample's tokens into text deltas that are always a prefix
of the final text (``Completion.text``): text that could still be the start of a stop string, or an
unfinished UTF-8 character (``\\ufffd``), is held back until a later token decides it, and the last
delta is the rest of the final text.  So the streamed text equals the text of the same request
without streaming.  A row whose text already holds a stop string is finished at once (the final
cut, :func:`~t2dist.engines.generation.finish`, is the same as after more tokens).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from t2dist.engines.generation import Completion, end_token_ids, finish, generate_shared

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    """One request: prompt token ids and its own sampling parameters.

    ``stop_when(text) -> bool`` finishes a sample early once its text so far satisfies it (the
    first pass stops when the label is decided); ``on_text(sample, delta)`` receives streamed text;
    ``is_cancelled()`` true finishes every sample of the request at the next step.
    """

    prompt_ids: list[int]
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_when: Callable[[str], bool] | None = field(default=None, repr=False)
    on_text: Callable[[int, str], None] | None = field(default=None, repr=False)
    is_cancelled: Callable[[], bool] | None = field(default=None, repr=False)
    adapter: tuple[str, int, str] | None = None  # vLLM multi-LoRA: (name, id, adapter directory); None: W' as set

    def __post_init__(self):
        self.stop = tuple(s for s in (self.stop or ()) if s)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def group_key(self) -> tuple:
        """Requests with equal keys share one HF decode loop (see the module docstring)."""
        if self.greedy:
            return ("greedy", self.n, self.stop)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.n, float(self.temperature), float(self.top_p), self.stop)


class TextStream:
    """Text deltas of one sample, each a prefix-safe piece of the final text (module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str], emit: Callable[[str], None]):
        self.tokenizer, self.stop, self.emit = tokenizer, tuple(stop), emit
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> bool:
        """Add one token; emit what is safe; True when the text now holds a stop string."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        safe = text[:min(hits)] if hits else text[:len(text) - self.hold]
        safe = safe.rstrip("\ufffd")
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.emit(safe[len(self.sent):])
            self.sent = safe
        return bool(hits)

    def close(self, final_text: str) -> None:
        """Emit the rest of the final text."""
        if not final_text.startswith(self.sent):  # a tokenizer whose decode is not prefix-stable
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent, final_text)
            return
        if len(final_text) > len(self.sent):
            self.emit(final_text[len(self.sent):])
        self.sent = final_text


class _Row:
    """Decode state of one sample of one request."""

    def __init__(self, req: GenRequest, sample: int, tokenizer):
        self.req, self.ids, self.done = req, [], False
        self.stream = None
        if req.on_text is not None:
            self.stream = TextStream(tokenizer, req.stop, lambda d, s=sample, f=req.on_text: f(s, d))

    def step(self, token: int, ends: frozenset[int], tokenizer) -> bool:
        """Record this step's token; True when the row is finished now."""
        self.ids.append(token)
        req = self.req
        done = token in ends or len(self.ids) >= req.max_new_tokens
        if self.stream is not None and self.stream.push(token):
            done = True
        if not done and req.stop_when is not None:
            done = bool(req.stop_when(tokenizer.decode(self.ids, skip_special_tokens=True)))
        if not done and req.is_cancelled is not None:
            done = bool(req.is_cancelled())
        self.done = done
        return done


def generate_requests_shared(model, tokenizer, requests: Sequence[GenRequest], *, batch_size: int = 64
                             ) -> list[list[Completion]]:
    """Answer ``requests`` with :func:`~t2dist.engines.generation.generate_shared`, one loop per sub-group."""
    out: list[list[Completion] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.group_key(), []).append(i)
    for idx in groups.values():
        for i, comps in zip(idx, _run_group(model, tokenizer, [requests[i] for i in idx], batch_size)):
            out[i] = comps
    return out  # type: ignore[return-value]


def _run_group(model, tokenizer, reqs: list[GenRequest], batch_size: int) -> list[list[Completion]]:
    first = reqs[0]
    eos, end_ids = end_token_ids(tokenizer, first.stop)
    ends = frozenset(end_ids)
    rows = {(i, s): _Row(r, s, tokenizer) for i, r in enumerate(reqs) for s in range(r.n)}

    def on_step(keys, tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        stop = torch.zeros(len(keys), dtype=torch.bool)
        for k, (key, tok, live) in enumerate(zip(keys, tokens.tolist(), alive.tolist())):
            row = rows[key]
            if live and not row.done:
                stop[k] = row.step(int(tok), ends, tokenizer)
        return stop

    generate_shared(model, tokenizer, [r.prompt_ids for r in reqs], num_samples=first.n,
                    temperature=first.temperature, top_p=first.top_p if not first.greedy else 1.0,
                    max_new_tokens=max(r.max_new_tokens for r in reqs), stop=first.stop, batch_size=batch_size,
                    seed=None if first.greedy else first.seed, on_step=on_step, reuse_prefix=True)
    out = []
    for i, r in enumerate(reqs):
        comps = []
        for s in range(r.n):
            row = rows[(i, s)]
            c = finish(tokenizer, i, list(r.prompt_ids), row.ids, r.stop, eos, end_ids)
            if row.stream is not None:
                row.stream.close(c.text)
            comps.append(c)
        out.append(comps)
    return out


def generate_requests_batched(engine, requests: Sequence[GenRequest]) -> list[list[Completion]]:
    """Any engine: one ``engine.generate`` call per distinct parameter set (no streaming until the end,
    no early stops); the fallback of :meth:`t2dist.engines.base.RolloutEngine.generate_requests`."""
    out: list[list[Completion] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (r.n, r.temperature, r.top_p, r.max_new_tokens, r.stop, r.seed if not r.greedy else None)
        groups.setdefault(key if r.seed is None or r.greedy else (key, i), []).append(i)
    for idx in groups.values():
        r0 = requests[idx[0]]
        comps = engine.generate([requests[i].prompt_ids for i in idx], n=r0.n, temperature=r0.temperature,
                                top_p=r0.top_p, max_new_tokens=r0.max_new_tokens, stop=r0.stop,
                                seed=None if r0.greedy else r0.seed)
        for j, i in enumerate(idx):
            mine = comps[j * r0.n:(j + 1) * r0.n]
            for s, c in enumerate(mine):
                if requests[i].on_text is not None and c.text:
                    requests[i].on_text(s, c.text)
            out[i] = mine
    return out  # type: ignore[return-value]
