"""Batched generation for evaluation and RL rollouts.

``generate(model, tokenizer, prompts, ...)`` works with any Hugging Face causal LM
and tokenizer: prompts are tokenized one by one, left-padded by hand (so the
caller's tokenizer is never mutated; a tokenizer without a pad token pads with
eos) and run through ``model.generate`` with a fresh ``GenerationConfig`` (so a
checkpoint's own sampling defaults never leak in).  Greedy when
``temperature == 0``, otherwise sampling with ``temperature`` and ``top_p``
(no top-k).

Stops: every token whose text contains a stop string ends that sequence early
(as does eos); afterwards each completion is cut at the first stop string, so
stops spanning several tokens also work.  ``Completion.completion_ids`` are the
tokens actually generated up to and including the one that completed the stop
(or eos), never padding; ``Completion.text`` excludes the stop string.

``seed`` makes sampling reproducible for the same prompts, ``num_samples`` and
``batch_size`` (the global torch RNG is forked, so the caller's stream is untouched).
Measured on the toy base (2 CPU cores, batch 128-256): ``model.generate`` and a
hand-written KV-cache loop ran at the same speed, so this uses ``model.generate``.

``generate_shared`` is the shared-prefix path of the HF rollout engine
(``t2dist/engines/hf.py``): each prompt is prefilled *once* and its ``num_samples``
completions are decoded from copies of that KV cache (``DynamicCache.batch_repeat_interleave``),
where ``generate`` prefills every (prompt, sample) row.  The decode loop replays
``model.generate``'s sampling step for step (the same logits processors, one
``torch.multinomial`` over the whole batch per step, finished rows padded), so with the same
seed, and chunks holding whole prompts (``batch_size`` a multiple of ``num_samples``), it
samples the same tokens as ``generate``.  It also returns each sampled token's log-probability
under the model's raw distribution (``log_softmax`` of the logits, before temperature / top-p:
the quantity the learner computes).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class Completion:
    prompt_index: int
    text: str
    prompt_ids: list[int] = field(repr=False)
    completion_ids: list[int] = field(repr=False)
    stopped: bool = False  # True when a stop string or eos ended it (False: hit max_new_tokens)
    logprobs: list[float] | None = field(default=None, repr=False)  # per completion token (raw, T=1); None: not computed

    @property
    def stop_reason(self) -> str:
        """``stop`` (eos or a stop string ended it) or ``length`` (max_new_tokens reached)."""
        return "stop" if self.stopped else "length"


_STOP_ID_CACHE: dict[tuple, frozenset[int]] = {}
_VOCAB_TEXTS: dict[tuple, list[str]] = {}
_STOP_ID_CACHE_MAX = 1024  # distinct stop sets kept (a server's clients send their own stop strings)


def _stop_token_ids(tokenizer, stop: Sequence[str]) -> frozenset[int]:
    """Ids of all tokens whose decoded text contains one of ``stop`` (cached per tokenizer; the vocabulary is
    decoded once per tokenizer, each new stop set is one scan of it)."""
    tok_key = (id(tokenizer), len(tokenizer), getattr(tokenizer, "name_or_path", ""))  # id alone may be reused
    key = (tok_key, tuple(stop))
    if key not in _STOP_ID_CACHE:
        ids: set[int] = set()
        if stop:
            if tok_key not in _VOCAB_TEXTS:
                n = len(tokenizer)
                _VOCAB_TEXTS[tok_key] = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
            ids = {i for i, t in enumerate(_VOCAB_TEXTS[tok_key]) if any(s in t for s in stop)}
        if len(_STOP_ID_CACHE) >= _STOP_ID_CACHE_MAX:
            _STOP_ID_CACHE.pop(next(iter(_STOP_ID_CACHE)))
        _STOP_ID_CACHE[key] = frozenset(ids)
    return _STOP_ID_CACHE[key]


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def _cut(tokenizer, ids: list[int], stop: Sequence[str], eos: set[int]) -> tuple[str, list[int], bool]:
    """(text, kept ids, stopped) for one generated sequence (already free of padding)."""
    for j, t in enumerate(ids):  # eos ends the sequence; keep it in the ids, not in the text
        if t in eos:
            ids = ids[: j + 1]
            text = tokenizer.decode(ids[:j], skip_special_tokens=True)
            hit = [text.index(s) for s in stop if s in text]
            if not hit:
                return text, ids, True
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hit = [text.index(s) for s in stop if s and s in text]
    if not hit:
        return text, ids, False
    # Shortest prefix of ids whose text contains a stop string (binary search; monotone in k).
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        t = tokenizer.decode(ids[:mid], skip_special_tokens=True)
        if any(s and s in t for s in stop):
            hi = mid
        else:
            lo = mid + 1
    ids = ids[:lo]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = min(text.index(s) for s in stop if s and s in text)
    return text[:cut], ids, True


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the block and restore the caller's RNG state after it (None: no seeding)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 64,
    seed: int | None = None,
) -> list[Completion]:
    """Complete every prompt ``num_samples`` times; results grouped per prompt, in order."""
    stop = tuple(s for s in (stop or ()) if s)
    prompts = list(prompts)
    if not prompts or num_samples < 1:
        return []
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    eos, end_ids = end_token_ids(tokenizer, stop)
    encoded = encode_prompts(tokenizer, prompts)

    do_sample = temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=float(temperature) if do_sample else 1.0,
        top_p=float(top_p) if do_sample else 1.0,
        top_k=0 if do_sample else 50,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=end_ids or None,
        bos_token_id=tokenizer.bos_token_id,
    )
    # Flatten (prompt, sample) pairs; batch longest-first to limit padding.
    items = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
    order = sorted(range(len(items)), key=lambda k: -len(encoded[items[k][0]]))
    results: list[Completion | None] = [None] * len(items)
    with _seeded(seed, device):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [encoded[items[k][0]] for k in chunk]
            input_ids, mask = _left_pad(rows, pad, device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg)
            new = out[:, input_ids.shape[1]:].tolist()  # generate pads finished rows after their end token
            for r, k in enumerate(chunk):
                results[k] = finish(tokenizer, items[k][0], rows[r], new[r], stop, eos, end_ids)
    return results  # type: ignore[return-value]


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of every prompt: text is tokenized as ``generate`` does, id lists pass through."""
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    out: list[list[int] | None] = [None if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if texts:
        enc = tokenizer([prompts[i] for i in texts], add_special_tokens=True)["input_ids"]
        for i, ids in zip(texts, enc):
            out[i] = list(ids)
    return out  # type: ignore[return-value]


def end_token_ids(tokenizer, stop: Sequence[str]) -> tuple[set[int], list[int]]:
    """``(eos ids, ids that end a sequence)``: eos plus every token whose text holds a stop string."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return eos, sorted(eos | set(_stop_token_ids(tokenizer, stop)))


def finish(tokenizer, prompt_index: int, prompt_ids: list[int], ids: list[int], stop: Sequence[str],
           eos: set[int], end_ids: Sequence[int], logprobs: Sequence[float] | None = None) -> Completion:
    """A :class:`Completion` from raw generated ids (cut at the first end id, then at a stop string)."""
    ends = set(end_ids)
    for j, t in enumerate(ids):
        if t in ends:
            ids = ids[: j + 1]
            break
    text, kept, stopped = _cut(tokenizer, list(ids), stop, eos)
    lp = [float(x) for x in logprobs[: len(kept)]] if logprobs is not None else None
    return Completion(prompt_index, text, list(prompt_ids), kept, stopped, lp)


def _warpers(temperature: float, top_p: float):
    """The logits processors ``model.generate`` builds for this temperature / top-p (no top-k)."""
    procs = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if temperature > 0 and top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p)))
    return procs


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x):] = 1
    return ids.to(device), mask.to(device)


def _forward_args(model) -> frozenset[str]:
    return frozenset(inspect.signature(type(model).forward).parameters)


def _cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older): the forward's KV-cache argument."""
    return "cache" if "cache" in _forward_args(model) else "past_key_values"


PREFIX_REUSE_MIN = 16  # shared leading tokens worth a prefill of their own (reuse_prefix)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every row starts with, leaving each row at least one token of its own."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    k = 0
    while k < n and all(r[k] == first[k] for r in rows):
        k += 1
    return k


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def _prefill(model, rows: list[list[int]], pad: int, device, reuse_prefix: bool):
    """``(last-position logits, KV cache, attention mask)`` after the prompts ``rows``.

    ``reuse_prefix``: when every row starts with the same ``P >= PREFIX_REUSE_MIN`` tokens (a chat
    template's system prompt, the first pass's question), those are prefilled once and their KV cache
    is copied to every row; each row's own tokens follow, left-padded *after* the prefix (the padding is
    masked, positions continue from ``P``).  The same numbers up to float rounding (other matmul shapes),
    so it is off for training rollouts, whose samples must equal ``generate``'s for a seed."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_args(model) else {}  # the head on the last position only
    p = common_prefix(rows) if reuse_prefix and len(rows) > 0 else 0
    if p < PREFIX_REUSE_MIN:
        ids, mask = _left_pad(rows, pad, device)
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)  # as model.generate's prepare_inputs_for_generation
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        return out.logits[:, -1].to(dtype=torch.float32), _cache_of(out), mask
    prefix = torch.tensor([rows[0][:p]], dtype=torch.long, device=device)
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **keep)
    cache = _cache_of(out)
    cache.batch_repeat_interleave(len(rows))
    ids, own = _left_pad([r[p:] for r in rows], pad, device)
    pos = own.cumsum(-1) - 1 + p
    pos.masked_fill_(own == 0, 1)
    mask = torch.cat([torch.ones((len(rows), p), dtype=own.dtype, device=device), own], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{_cache_kwarg(model): cache},
                **keep)
    return out.logits[:, -1].to(dtype=torch.float32), cache, mask


def _decode_shared(model, rows: list[list[int]], n: int, *, temperature: float, top_p: float,
                   max_new_tokens: int, end_ids: Sequence[int], pad: int, device,
                   on_step=None, reuse_prefix: bool = False) -> tuple[list, list]:
    """Prefill ``rows`` once, expand the KV cache ``n`` times, sample; ``(token ids, log-probs)`` per row×n.

    ``on_step(tokens, alive)``, when given, is called after every decode step with this step's token of
    every row×n (a LongTensor; padding where a row had already finished) and ``alive``, the rows whose
    token is real; it may return a bool tensor of rows to finish now (a server's per-request token
    limits, early stops, cancellations, streaming).  It cannot change the tokens sampled.
    ``reuse_prefix``: see :func:`_prefill` (the server's path)."""
    logits, cache, mask = _prefill(model, rows, pad, device, reuse_prefix)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
    procs, do_sample = _warpers(temperature, top_p), temperature > 0
    ends = torch.tensor(list(end_ids) or [-1], device=device)
    unfinished = torch.ones(mask.shape[0], dtype=torch.bool, device=device)
    tokens, logps = [], []
    for t in range(max_new_tokens):
        scores = procs(None, logits)
        if do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        logps.append(torch.log_softmax(logits, dim=-1).gather(1, nxt[:, None]).squeeze(1))
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens.append(nxt)
        alive = unfinished.clone() if on_step is not None else None
        unfinished &= ~torch.isin(nxt, ends)
        if on_step is not None:
            stop_rows = on_step(nxt, alive)
            if stop_rows is not None:
                unfinished &= ~stop_rows.to(unfinished.device)
        if t == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    use_cache=True, **{_cache_kwarg(model): cache})
        logits = out.logits[:, -1].to(dtype=torch.float32)
    return torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()


@torch.no_grad()
def generate_shared(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 64,
    seed: int | None = None,
    on_step=None,
    reuse_prefix: bool = False,
) -> list[Completion]:
    """Like :func:`generate` (same arguments and result order), prefilling each prompt once.

    A chunk holds ``max(1, batch_size // num_samples)`` whole prompts (longest first), i.e.
    ``batch_size`` sequences while decoding; each completion carries its ``logprobs``.
    ``on_step(rows, tokens, alive)``: :func:`_decode_shared`'s hook, with ``rows`` the ``(prompt index,
    sample)`` of each row of the chunk (t2dist/engines/requests.py streams and stops requests with it).
    """
    stop = tuple(s for s in (stop or ()) if s)
    encoded = encode_prompts(tokenizer, list(prompts))
    if not encoded or num_samples < 1 or max_new_tokens < 1:
        return []
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    eos, end_ids = end_token_ids(tokenizer, stop)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # stable: generate's row order
    per_chunk = max(1, batch_size // num_samples)
    results: list[Completion | None] = [None] * (len(encoded) * num_samples)
    with _seeded(seed, device):
        for start in range(0, len(order), per_chunk):
            chunk = order[start: start + per_chunk]
            rows = [(i, s) for i in chunk for s in range(num_samples)]
            step = None if on_step is None else (lambda tok, alive, rows=rows: on_step(rows, tok, alive))
            toks, lps = _decode_shared(model, [encoded[i] for i in chunk], num_samples, temperature=temperature,
                                       top_p=top_p, max_new_tokens=max_new_tokens, end_ids=end_ids, pad=pad,
                                       device=device, on_step=step, reuse_prefix=reuse_prefix)
            for r, (ids, lp) in enumerate(zip(toks, lps)):
                i, s = chunk[r // num_samples], r % num_samples
                results[i * num_samples + s] = finish(tokenizer, i, encoded[i], ids, stop, eos, end_ids, lp)
    return results  # type: ignore[return-value]
