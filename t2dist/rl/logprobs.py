"""Per-token log-probabilities of sampled completions under a model."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Forward = Callable[..., object]  # called as forward(input_ids=..., attention_mask=...) -> output with .logits


def pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int, device=None):
    """Right-padded ``prompt + completion`` batch and the completion positions.

    Returns ``input_ids (B, L)``, ``attention_mask (B, L)``, ``starts`` (index of each
    completion's first token) and ``lengths`` (completion lengths).
    """
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[i, : len(s)] = 1
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
):
    """Log-probabilities ``(B, T)`` of each completion token, its mask, and optionally the entropy.

    Only the logits that predict completion tokens are computed (``logits_to_keep``: the
    positions from the shortest prompt's end on) and go through ``log_softmax``.  The LM head of a
    real model dominates otherwise: SmolLM2's 49,152-row head over a 40-token chat prompt and 10
    completion tokens is 5x the work of the kept positions, more than all 30 layers below it.
    A model whose forward ignores ``logits_to_keep`` returns every position; both work.
    """
    ids, att, starts, lengths = pack(prompt_ids, completion_ids, pad_id, device)
    L = ids.shape[1]
    keep = L - int(starts.min()) + 1 if len(starts) else L  # logits from position min(start) - 1 on
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
    sel = logits[rows, pos - first].float()  # (B, T, V)
    logsm = torch.log_softmax(sel, dim=-1)
    tgt_pos = (starts.unsqueeze(1) + offs.unsqueeze(0)).clamp(max=ids.shape[1] - 1).to(ids.device)
    targets = ids[rows, tgt_pos]
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    if not with_entropy:
        return logp, mask
    entropy = -(logsm.exp() * logsm).sum(-1) * mask
    return logp, mask, entropy
