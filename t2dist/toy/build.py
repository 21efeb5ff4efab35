"""Build (pretrain) the toy base: a ~0.86M-parameter Llama on the synthetic suite.

    t2dist toy-base --out t2dist/assets/toy-base      # the checked-in asset (defaults: 2 threads, seed 0)

(``--threads`` changes floating-point summation order, so bit-identical weights
need the same thread count; the checked-in asset was built with the defaults and
``--threads 1`` in 1900 s of pretraining on a 2-core machine at load ~10 (other jobs);
unloaded, 1100 steps take ~6 min with 2 threads.)

Architecture: ``LlamaForCausalLM`` with hidden 128, 4 layers, 4 heads, MLP 384,
tied embeddings, float32, the character tokenizer of :mod:`t2dist.toy.tokenizer`.
Training: AdamW, linear warm-up then cosine decay, batches of 96 packed rows of
64 tokens from :class:`t2dist.toy.corpus.Corpus` (loss on answer tokens only).
Deterministic given the seed (``torch.manual_seed``, one data stream, 2 threads).

The output directory holds the HF checkpoint (safetensors), the tokenizer and
``toy_base.json`` with the build settings, the build time and the measured
accuracies (greedy test accuracy per task, sampled-correct rate on trap prompts).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from t2dist.engines.generation import generate
from t2dist.engines.in_process import base_model_engine
from t2dist.evaluation.accuracy import evaluate
from t2dist.tasks import get_task
from t2dist.tasks.synthetic import SUITE
from t2dist.toy.corpus import Corpus, CorpusConfig
from t2dist.toy.tokenizer import build_char_tokenizer

MODEL_KW = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    attention_dropout=0.0,
)


def make_model(tokenizer, seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_KW,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    return model


def measure(model, tokenizer, tasks=None, limit=None, trap_samples=8, trap_limit=120, seed=0) -> dict:
    """Greedy test accuracy per task and the sampled (T=1) correct rate on trap test prompts."""
    out = {}
    model.eval()
    for name in tasks or (*SUITE, "caps", "dispatch"):
        task = get_task(name)
        try:
            res = evaluate(base_model_engine(model, tokenizer), task, "test", limit=limit, records=True)
        except ImportError as err:  # code sandbox not importable
            out[name] = {"error": str(err)}
            continue
        recs = res.records
        trap = [r for r in recs if r["trap"]]
        clean = [r for r in recs if not r["trap"]]
        row = {
            "greedy_accuracy": res.accuracy,
            "n": res.n,
            "ci95": [res.ci_low, res.ci_high],
            "greedy_trap": sum(r["correct"] for r in trap) / max(1, len(trap)),
            "greedy_nontrap": sum(r["correct"] for r in clean) / max(1, len(clean)),
        }
        exs = [e for e in task.examples("test") if e.meta.get("trap")][:trap_limit]
        if not exs:  # a task without a trap subset (caps)
            out[name] = row
            continue
        comps = generate(
            model, tokenizer, [task.format_prompt(e) for e in exs], num_samples=trap_samples,
            temperature=1.0, max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=256, seed=seed,
        )
        rep = [e for e in exs for _ in range(trap_samples)]
        ver = task.verify_batch([c.text for c in comps], rep)
        row["sampled_trap_correct"] = sum(v.correct for v in ver) / max(1, len(ver))
        row["sampled_trap_trapanswer"] = sum(
            (v.parsed or "").replace(" ", "") == str(e.meta["trap_answer"]).replace(" ", "") for v, e in zip(ver, rep)
        ) / max(1, len(ver))
        out[name] = row
    return out


def format_table(acc: dict) -> str:
    lines = [f"{'task':<10} {'greedy':>7} {'non-trap':>9} {'trap':>6} {'T=1 trap ok':>12} {'T=1 trap ans':>13}"]
    for name, r in acc.items():
        if "error" in r:
            lines.append(f"{name:<10} {r['error']}")
            continue
        lines.append(
            f"{name:<10} {r['greedy_accuracy']:>7.3f} {r['greedy_nontrap']:>9.3f} {r['greedy_trap']:>6.3f}"
            f" {r.get('sampled_trap_correct', float('nan')):>12.3f} {r.get('sampled_trap_trapanswer', float('nan')):>13.3f}"
        )
    return "\n".join(lines)


def build_toy_base(
    out_dir: str | Path,
    steps: int = 1100,
    seed: int = 0,
    progress: bool = True,
    lr: float = 4e-3,
    warmup: int = 50,
    batch_size: int = 96,
    seq_len: int = 64,
    threads: int = 2,
    measure_accuracy: bool = True,
    corpus_cfg: CorpusConfig | None = None,
) -> Path:
    """Pretrain the toy base and save it (model, tokenizer, ``toy_base.json``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    t0 = time.time()
    tok = build_char_tokenizer()
    ccfg = corpus_cfg or CorpusConfig(batch_size=batch_size, seq_len=seq_len)
    corpus = Corpus(tok, ccfg, seed=seed)
    model = make_model(tok, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    bar = None
    if progress:
        bar = tqdm(total=steps, desc="toy base", unit="step")
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, att, lab = corpus.batch()
        out = model(input_ids=ids, attention_mask=att, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    train_s = time.time() - t0
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    info = {
        "model": {**MODEL_KW, "vocab_size": len(tok), "parameters": sum(p.numel() for p in model.parameters())},
        "training": {
            "steps": steps, "seed": seed, "lr": lr, "warmup": warmup, "schedule": "linear warm-up, cosine to 10%",
            "optimizer": "AdamW(0.9, 0.95), wd 0.01", "threads": threads, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        },
        "corpus": asdict(ccfg),
        "build_seconds": round(train_s, 1),
    }
    if measure_accuracy:
        acc = measure(model, tok, seed=seed)
        info["accuracy"] = acc
        if progress:
            print(format_table(acc))
    (out_dir / "toy_base.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="t2dist/assets/toy-base")
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a busy machine)")
    ap.add_argument("--no-measure", action="store_true")
    a = ap.parse_args(argv)
    p = build_toy_base(a.out, steps=a.steps, seed=a.seed, lr=a.lr, threads=a.threads, measure_accuracy=not a.no_measure)
    print(p)


if __name__ == "__main__":
    main()
