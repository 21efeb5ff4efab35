"""The learner's LM head on every position vs only where a completion token is predicted, side by side.

    python bench/learner_head.py                                  # Gemma-3-270M pyfunc, one micro-batch
    python bench/learner_head.py --config configs/smollm2-pyfunc.yaml --repeat 5

One learner micro-batch as configured (``rl.prompts_per_step / learner.ranks / learner.grad_accum``
prompts × ``rl.samples_per_prompt`` samples): the task's real prompts; completions of the lengths
``--lengths`` (cycled; their tokens are random, which changes no cost): the default is a code step's
spread, most bodies 10-40 tokens and one sample that ran to ``task.max_new_tokens``, so the rows are
padded to it.  Timed as the learner runs it (``learner.threads_per_rank`` threads): completion
log-probs (``rl.shared_prefix`` as configured) + backward to z, with ``head=None`` (the logits of every
padded position, then ``log_softmax`` over the vocabulary) and with the model's output head restricted
to the completion tokens; interleaved, median of ``--repeat``.  Prints both, the ratio, the head's rows
each way and the largest differences of log-probs and z gradients (the same function).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2dist.config import load_config  # noqa: E402
from t2dist.policy.load import load_policy  # noqa: E402
from t2dist.rl.logprobs import completion_logprobs, output_head  # noqa: E402
from t2dist.tasks.base import get_task  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gemma3-pyfunc.yaml")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lengths", default="15,20,25,max,10,20,18,22,30,12,17,40,14,19,23,28",
                    help="completion lengths, cycled over the samples ('max': task.max_new_tokens)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.learner.threads_per_rank)
    policy, tok = load_policy(cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    task = get_task(cfg.task.name)
    P = max(1, cfg.rl.prompts_per_step // cfg.learner.ranks // cfg.learner.grad_accum)
    N = cfg.rl.samples_per_prompt
    longest = cfg.task.max_new_tokens or task.max_new_tokens
    lengths = [longest if x == "max" else int(x) for x in args.lengths.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts, comps = [], []
    for i, e in enumerate(task.examples("train")[:P]):
        p = tok(task.prompt_for(e, tok), add_special_tokens=False)["input_ids"]
        for j in range(N):
            prompts.append(p)
            comps.append(torch.randint(min(100, len(tok) // 2), len(tok) - 1, (lengths[(i * N + j) % len(lengths)],), generator=g).tolist())
    z = {k: v.detach().clone().requires_grad_(True) for k, v in policy.init_z(1.0).items()}
    with torch.no_grad():  # off neutral, so the gradients are not a special case
        for t in z.values():
            t.mul_(1 + 0.01 * torch.randn(t.shape, generator=g))
    weights = torch.randn(len(comps), 1, generator=g)  # advantages
    head = output_head(policy.model)
    rows: list[int] = []
    handle = head.register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[:-1].numel()))

    def once(restrict: bool):
        for t in z.values():
            t.grad = None
        rows.clear()
        t0 = time.perf_counter()
        logp, mask = completion_logprobs(policy.bind(z), prompts, comps, pad_id, share_prefix=cfg.rl.shared_prefix,
                                         head=head if restrict else None)
        (logp * weights).sum().backward()
        return time.perf_counter() - t0, logp.detach(), {k: t.grad.clone() for k, t in z.items()}, sum(rows)

    once(True)  # warm-up
    times, out = {False: [], True: []}, {}
    for _ in range(args.repeat):
        for restrict in (False, True):
            s, *out[restrict] = once(restrict)
            times[restrict].append(s)
    handle.remove()
    (lp0, g0, rows0), (lp1, g1, rows1) = out[False], out[True]
    rel = max(float((g1[k] - g0[k]).norm() / g0[k].norm().clamp(min=1e-30)) for k in z)
    every, only = statistics.median(times[False]), statistics.median(times[True])
    print(f"{cfg.name} ({cfg.model.path}, vocabulary {len(tok):,}): {P} prompts x {N} samples, completions "
          f"{min(len(c) for c in comps)}-{max(len(c) for c in comps)} tokens ({sum(len(c) for c in comps)} in all), "
          f"shared_prefix {cfg.rl.shared_prefix}, {cfg.learner.threads_per_rank} thread(s), {platform.processor() or platform.machine()}")
    print(f"  head on every position     {rows0:5d} rows  {every:7.2f} s")
    print(f"  head at completion tokens  {rows1:5d} rows  {only:7.2f} s")
    print(f"  restricted / every: {only / every:.2f}x time; log-prob max difference {float((lp1 - lp0).abs().max()):.1e}, "
          f"z-gradient max relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
