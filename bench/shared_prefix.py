"""The learner's forward + backward with and without the shared prompt prefix, side by side.

    python bench/shared_prefix.py                                   # SmolLM2 arith, one learner rank's shard
    python bench/shared_prefix.py --config configs/gemma3-arith.yaml --repeat 3

One learner rank's work of one RL step (``rl.prompts_per_step / learner.ranks`` prompts ×
``rl.samples_per_prompt`` samples; the completions are the task's reference answers with a few
tokens dropped or repeated, so their lengths vary as sampled ones do; arith's restate the
problem, "347 + 582 = 929", as SmolLM2's samples do: ~10 tokens), timed as the learner runs
it (``torch.set_num_threads(learner.threads_per_rank)``): ``rl_loss`` + ``backward`` with
``rl.shared_prefix`` false (every sample's prompt + completion in one packed forward) and true
(each prompt once, the completions on its KV cache), interleaved, median of ``--repeat``.  It
prints the token positions each way, the seconds, the ratio, and the largest difference of the
per-token log-probs and of the z gradients between the two (they compute the same function).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2dist.config import load_config  # noqa: E402
from t2dist.rl.rollout import RolloutBatch  # noqa: E402
from t2dist.rl.step import rl_loss  # noqa: E402
from t2dist.policy.load import load_policy  # noqa: E402
from t2dist.tasks.base import get_task  # noqa: E402


def make_batch(cfg, tok, prompts: int) -> RolloutBatch:
    task = get_task(cfg.task.name)
    examples = task.examples("train")[:prompts]
    n = cfg.rl.samples_per_prompt
    p_ids, c_ids = [], []
    for e in examples:
        prompt = tok(task.prompt_for(e, tok), add_special_tokens=False)["input_ids"]
        restated = re.search(r"What is (.+?)\?", e.prompt)
        text = f" {restated.group(1)} = {e.answer}" if restated else f" {e.answer}"
        answer = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for j in range(n):  # lengths vary as sampled completions do: drop or repeat a token
            c = answer[: max(1, len(answer) - j)] if j % 2 else answer + answer[:j]
            p_ids.append(prompt)
            c_ids.append(c[: cfg.task.max_new_tokens or len(c)])
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(prompts, n, generator=g) > 0.5).float() * 2 - 1
    return RolloutBatch(p_ids, c_ids, rewards, rewards > 0)


def run(svf, z, batch, cfg, pad_id, shared: bool):
    rl = cfg.rl.model_copy(update={"shared_prefix": shared})
    for t in z.values():
        t.grad = None
    t0 = time.perf_counter()
    loss, _ = rl_loss(svf, z, batch, rl, pad_id=pad_id, with_kl=False)
    loss.backward()
    seconds = time.perf_counter() - t0
    return seconds, {k: t.grad.clone() for k, t in z.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-arith.yaml")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.learner.threads_per_rank)
    svf, tok = load_policy(cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = max(1, cfg.rl.prompts_per_step // cfg.learner.ranks)
    batch = make_batch(cfg, tok, prompts)
    z = {k: v.detach().clone().requires_grad_(True) for k, v in svf.init_z(1.0).items()}
    with torch.no_grad():  # move z off neutral, so the gradients are not a special case
        for t in z.values():
            t.mul_(1 + 0.01 * torch.randn_like(t))
    packed_tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
    shared_tokens = sum(len(p) for p in {tuple(p) for p in batch.prompt_ids}) + sum(
        max(len(c) - 1, 1) for c in batch.completion_ids)
    times = {False: [], True: []}
    grads = {}
    run(svf, z, batch, cfg, pad_id, True)  # warm-up
    for _ in range(args.repeat):
        for shared in (False, True):
            s, grads[shared] = run(svf, z, batch, cfg, pad_id, shared)
            times[shared].append(s)
    rel = max(float((grads[True][k] - grads[False][k]).norm() / grads[False][k].norm().clamp(min=1e-30)) for k in z)
    packed, shared = statistics.median(times[False]), statistics.median(times[True])
    print(f"{cfg.name}: {prompts} prompts x {cfg.rl.samples_per_prompt} samples, {cfg.learner.threads_per_rank} thread(s), "
          f"{len(svf.targets)} targets")
    print(f"  packed        {packed_tokens:5d} token positions  {packed:7.2f} s")
    print(f"  shared prefix {shared_tokens:5d} token positions  {shared:7.2f} s")
    print(f"  shared / packed: {shared / packed:.2f}x time, {shared_tokens / packed_tokens:.2f}x positions; "
          f"z-gradient max relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
