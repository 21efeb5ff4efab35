"""Per-token log-probabilities of sampled completions under a model.

Two ways to the same numbers (equal to float tolerance, gradients included):

* packed (:func:`completion_logprobs` with ``share_prefix=False``): one forward over
  ``prompt + completion`` for every sequence;
* shared prefix (``share_prefix=True``, the RL learner's default, ``rl.shared_prefix``): every
  *distinct* prompt runs once with ``use_cache``, its KV cache is indexed out to its samples
  (differentiably: the gradient of every sample flows back into the prompt's keys and values),
  and only the completion tokens run on top of it.  With GRPO's groups of samples per prompt this
  is most of the learner's work saved: SmolLM2 arith (8 prompts × 4 samples, a ~43-token chat
  prompt, ~10 completion tokens) goes from ~1,700 token positions a step to ~660.

Either way, given the model's output layer (``head``, :func:`output_head`), the LM head and the
``log_softmax`` run only on the positions that predict a real completion token: the rows of a batch
are right-padded to its longest completion, and a big vocabulary makes that padding the costliest
part of a step (Gemma-3's 262k-row head over 8 completions of ~20 tokens padded to 96).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

Forward = Callable[..., object]  # called as forward(input_ids=..., attention_mask=...) -> output with .logits


def pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int, device=None):
    """Right-padded ``prompt + completion`` batch and the completion positions.

    Returns ``input_ids (B, L)``, ``attention_mask (B, L)``, ``starts`` (index of each
    completion's first token) and ``lengths`` (completion lengths).
    """
    ids, att = _right_pad([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)], pad_id)
    starts = torch.tensor([len(p) for p in prompt_ids])
    lengths = torch.tensor([len(c) for c in completion_ids])
    return ids.to(device), att.to(device), starts, lengths


def completion_logprobs(
    forward: Forward,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    device=None,
    with_entropy: bool = False,
    share_prefix: bool = False,
    head: nn.Module | None = None,
):
    """Log-probabilities ``(B, T)`` of each completion token, its mask, and optionally the entropy.

    ``share_prefix``: run each distinct prompt once and the completions on its KV cache
    (:func:`shared_prefix_logits`); ``forward`` is then called twice and must accept
    ``use_cache``, ``past_key_values`` and ``position_ids`` as a Hugging Face causal LM does.
    Otherwise (packed):

    Only the logits that predict completion tokens are computed (``logits_to_keep``: the
    positions from the shortest prompt's end on) and go through ``log_softmax``.  The LM head of a
    real model dominates otherwise: SmolLM2's 49,152-row head over a 40-token chat prompt and 10
    completion tokens is 5x the work of the kept positions, more than all 30 layers below it.
    A model whose forward ignores ``logits_to_keep`` returns every position; both work.

    ``head``: the module the model computes its logits with (:func:`output_head`); when given, it
    runs only on the hidden states of positions that predict a completion token (not on padding).
    """
    if head is not None:
        return _logprobs_at_tokens(forward, head, prompt_ids, completion_ids, pad_id, device, with_entropy,
                                   share_prefix)
    if share_prefix:
        logits, targets, mask = shared_prefix_logits(forward, prompt_ids, completion_ids, pad_id, device)
        return _token_logprobs(logits, targets, mask, with_entropy)
    ids, att, starts, lengths = pack(prompt_ids, completion_ids, pad_id, device)
    L = ids.shape[1]
    keep = _keep(L, starts)
    logits = forward(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
    first = L - logits.shape[1]  # the position of logits[:, 0]
    T = int(lengths.max()) if len(lengths) else 0
    B = ids.shape[0]
    # position t of the completion is predicted by the logits at starts + t - 1
    offs = torch.arange(T)
    pos = (starts.unsqueeze(1) + offs.unsqueeze(0) - 1).clamp(max=L - 1)
    mask = (offs.unsqueeze(0) < lengths.unsqueeze(1)).to(ids.device)
    pos = pos.to(ids.device)
    rows = torch.arange(B, device=ids.device).unsqueeze(1)
    sel = logits[rows, pos - first]  # (B, T, V)
    tgt_pos = (starts.unsqueeze(1) + offs.unsqueeze(0)).clamp(max=ids.shape[1] - 1).to(ids.device)
    return _token_logprobs(sel, ids[rows, tgt_pos], mask, with_entropy)


def _keep(L: int, starts: torch.Tensor) -> int:
    """``logits_to_keep`` of a packed batch: the positions from ``min(start) - 1`` on."""
    return L - int(starts.min()) + 1 if len(starts) else L


def output_head(model: nn.Module) -> nn.Module | None:
    """The module a causal LM computes its logits with (``get_output_embeddings``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


@contextmanager
def _head_only_where(head: nn.Module, wanted: torch.Tensor) -> Iterator[None]:
    """While open, ``head`` runs on the rows of its ``(B, L', H)`` input where ``wanted (B, L)`` is true
    (``L'`` its last positions: a model that keeps every logit passes ``L' = L``), returning ``(N, V)``."""

    def gather(_module, args):
        h = args[0]
        if h.dim() != 3 or h.shape[0] != wanted.shape[0] or h.shape[1] > wanted.shape[1]:
            raise RuntimeError(f"the output head got hidden states of shape {tuple(h.shape)}, not (B, <= L, H) "
                               f"with (B, L) = {tuple(wanted.shape)}: pass head=None for this model")
        return (h[wanted[:, wanted.shape[1] - h.shape[1]:].to(h.device)],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _logprobs_at_tokens(forward: Forward, head: nn.Module, prompt_ids, completion_ids, pad_id: int, device,
                        with_entropy: bool, share_prefix: bool):
    """:func:`completion_logprobs` with the head only at completion positions: ``(B, T)`` results."""
    targets, mask = _right_pad(completion_ids, pad_id)
    mask = mask.bool()
    B, T = targets.shape
    if share_prefix:
        rows, p_ids, p_att, p_len, p_pos = _distinct_prompts(prompt_ids, pad_id)
        out = forward(input_ids=p_ids.to(device), attention_mask=p_att.to(device), position_ids=p_pos.to(device),
                      logits_to_keep=1, use_cache=True)
        first = out.logits[:, -1][rows.to(out.logits.device)]  # (B, V): predicts completion token 0
        cache = out.past_key_values
        cache.batch_select_indices(rows.to(first.device))
        fed = targets[:, : max(T - 1, 1)]
        att = torch.cat([p_att[rows], mask[:, : fed.shape[1]].long()], dim=1)
        pos = p_len[rows].unsqueeze(1) + torch.arange(fed.shape[1]).unsqueeze(0)
        wanted = mask[:, 1: fed.shape[1] + 1]  # fed position j predicts token j + 1
        if wanted.shape[1] < fed.shape[1]:  # T == 1: the one fed token predicts nothing
            wanted = torch.zeros_like(fed, dtype=torch.bool)
        with _head_only_where(head, wanted):
            rest = forward(input_ids=fed.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                           past_key_values=cache, use_cache=True).logits  # (N, V)
        logits = torch.cat([first[mask[:, 0].to(first.device)], rest])
        idx = [torch.nonzero(mask[:, 0]).squeeze(1), torch.zeros(int(mask[:, 0].sum()), dtype=torch.long)]
        nz = torch.nonzero(wanted)
        idx = [torch.cat([idx[0], nz[:, 0]]), torch.cat([idx[1], nz[:, 1] + 1])]
    else:
        ids, att, starts, lengths = pack(prompt_ids, completion_ids, pad_id)
        L = ids.shape[1]
        p = torch.arange(L).unsqueeze(0)  # position p predicts token p + 1
        wanted = (p + 1 >= starts.unsqueeze(1)) & (p + 1 < (starts + lengths).unsqueeze(1))
        with _head_only_where(head, wanted):
            logits = forward(input_ids=ids.to(device), attention_mask=att.to(device),
                             logits_to_keep=_keep(L, starts)).logits  # (N, V)
        nz = torch.nonzero(wanted)
        idx = [nz[:, 0], nz[:, 1] + 1 - starts[nz[:, 0]]]
    if logits.dim() != 2:
        raise RuntimeError("the model's forward did not call the output head given as `head`: pass head=None")
    logsm = torch.log_softmax(logits.float(), dim=-1)
    dev = logsm.device
    rows_i, cols_i = idx[0].to(dev), idx[1].to(dev)
    tok = targets.to(dev)[rows_i, cols_i]
    logp = torch.zeros(B, T, device=dev, dtype=logsm.dtype).index_put((rows_i, cols_i), logsm.gather(-1, tok[:, None])[:, 0])
    mask = mask.to(dev)
    if not with_entropy:
        return logp, mask
    with torch.no_grad():  # a logged statistic, not a loss term
        ent = -(logsm.exp() * logsm).sum(-1)
        entropy = torch.zeros(B, T, device=dev, dtype=logsm.dtype).index_put((rows_i, cols_i), ent)
    return logp, mask, entropy


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, with_entropy: bool):
    """``log p(target)`` per position of ``(B, T, V)`` logits (zero where ``mask`` is 0), and the entropy."""
    logsm = torch.log_softmax(logits.float(), dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    if not with_entropy:
        return logp, mask
    with torch.no_grad():  # a logged statistic, not a loss term: no graph keeps a (B, T, V) copy alive
        entropy = -(logsm.exp() * logsm).sum(-1) * mask
    return logp, mask, entropy


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int):
    """``ids (B, L)`` right-padded with ``pad_id`` and the ``attention_mask`` (1 on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        att[i, : len(s)] = 1
    return ids, att


def shared_prefix_logits(forward: Forward, prompt_ids: Sequence[Sequence[int]],
                         completion_ids: Sequence[Sequence[int]], pad_id: int, device=None):
    """The ``(B, T, V)`` logits that predict each completion token, each distinct prompt computed once.

    Pass 1 runs the distinct prompts *left*-padded with ``use_cache`` and explicit
    ``position_ids`` (so every prompt ends at the same cache index and the distance between two
    real tokens is the same as in the packed forward: sliding-window layers see the same
    tokens); its last logits predict completion token 0.  Its cache is then indexed out to the B
    rows (``Cache.batch_select_indices``: plain tensor indexing, so differentiable) and pass 2
    runs the completions on it, each row's positions continuing after its own prompt.  Pass 2
    feeds all but the last completion token (whose logits would predict nothing), except when
    every completion is one token long: then it feeds that token, so the number of model calls
    never depends on the data (the sharded learner's ranks run collectives in every call).
    Returns ``logits, targets (B, T), mask (B, T)``.
    """
    rows, p_ids, p_att, p_len, p_pos = _distinct_prompts(prompt_ids, pad_id)
    out = forward(input_ids=p_ids.to(device), attention_mask=p_att.to(device), position_ids=p_pos.to(device),
                  logits_to_keep=1, use_cache=True)
    head = out.logits[:, -1]  # (U, V): after each prompt's last token
    cache = out.past_key_values
    cache.batch_select_indices(rows.to(head.device))
    targets, mask = _right_pad(completion_ids, pad_id)
    T = targets.shape[1]
    fed = targets[:, : max(T - 1, 1)]
    att = torch.cat([p_att[rows], mask[:, : fed.shape[1]]], dim=1)
    pos = p_len[rows].unsqueeze(1) + torch.arange(fed.shape[1]).unsqueeze(0)
    out2 = forward(input_ids=fed.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                   past_key_values=cache, use_cache=True)
    logits = torch.cat([head[rows.to(head.device)].unsqueeze(1), out2.logits[:, : T - 1]], dim=1)
    return logits, targets.to(logits.device), mask.bool().to(logits.device)


def _distinct_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int):
    """Each distinct prompt once, *left*-padded: ``rows (B,)`` (its index per sequence), ``ids``,
    ``attention_mask`` and ``position_ids`` ``(U, P)``, and the prompt lengths ``(U,)``."""
    index: dict[tuple[int, ...], int] = {}
    rows = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompt_ids])
    p_ids, p_att = _right_pad([p[::-1] for p in index], pad_id)
    p_ids, p_att = p_ids.flip(1), p_att.flip(1)  # left-padded
    return rows, p_ids, p_att, p_att.sum(1), (p_att.cumsum(1) - 1).clamp(min=0)
