"""Side-by-side costs of the SVF core, as ratios measured in one run.

    python bench/svf_core.py [--model toy|PATH] [--shape small|medium ...] [--targets mlp]
                             [--repeat N] [--threads N]

Rows (each is "A vs B" timed in the same process, median of ``--repeat`` runs after a
warm-up; compare the ratios, not the absolute milliseconds):

1. SVD of all target matrices (``decompose``) vs loading them from the factor cache
   (``get_factors`` into a fresh temp dir: first call computes+saves, second loads).
2. Recomposing every target (``SVFModel.merge_`` with a non-neutral z) vs one
   generation batch (16 prompts x 8 samples, T=1, 16 new tokens).
3. One learning-path step (``svf(z, ...)`` forward + completion log-prob loss +
   backward to z) vs a full fine-tuning forward+backward of the base (all base params
   requiring grad, no optimizer) and vs a plain forward without grad; 128 x 48 tokens.

``--model toy`` uses the embedded toy base when it has been built; otherwise (and for
``--shape``) a randomly initialised ``LlamaForCausalLM`` with the given shape is used.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # small = the toy base's shapes
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
}
PROMPTS = [f"{a}+{b}=" for a, b in [(3, 4), (12, 7), (25, 9), (8, 8), (41, 16), (5, 60), (33, 33), (19, 2)]] + [
    "def f(x):\n", "Q: is 7 odd?\nA:", "reverse 'abc' ->", "max(3, 9) =", "2*6=", "sort [3,1,2] ->", "len('hello') =", "9-4=",
]
BATCH, SEQ, COMPLETION = 128, 48, 16


def timed(fn, repeat: int, setup=None) -> float:
    """Median wall time of ``fn()`` in ms over ``repeat`` runs after one warm-up; ``setup()`` runs untimed before each."""
    times = []
    for i in range(repeat + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt * 1e3)
    return statistics.median(times)


# -- models --------------------------------------------------------------------------------
def char_tokenizer():
    try:
        from t2dist.toy.tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    except Exception:  # the toy package is still being written
        return None


def random_llama(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    kw = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id) if tok is not None else dict(vocab_size=64)
    cfg = LlamaConfig(**SHAPES[shape], num_key_value_heads=SHAPES[shape]["num_attention_heads"],
                      max_position_embeddings=128, tie_word_embeddings=True, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    note = f"random LlamaForCausalLM, shape {shape} ({_shape_str(cfg)})"
    note += ", char tokenizer of the toy" if tok is not None else ", no tokenizer (vocab 64)"
    return model, tok, note


def _shape_str(cfg) -> str:
    return (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
            f"MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}")


def load(model_arg: str, shape: str | None):
    """``(model, tokenizer or None, description, notes)``."""
    notes = []
    if shape is not None:
        return (*random_llama(shape), notes)
    from t2dist.models.loading import ModelLoadError, load_model, toy_base_dir

    if model_arg == "toy":
        try:
            toy_base_dir(build_if_missing=False)  # never start the (minutes-long) toy build from a benchmark
        except ModelLoadError as exc:
            notes.append(f"toy base not built yet ({exc}); using a random model with the toy's shapes")
            return (*random_llama("small"), notes)
    model, tok = load_model(model_arg)
    return model, tok, f"{model_arg} ({_shape_str(model.config)})", notes


# -- rows ----------------------------------------------------------------------------------
def bench_factors(model, targets, repeat):
    from t2dist.svf.factors import decompose, fingerprint, get_factors

    fp = fingerprint(model)
    t_svd = timed(lambda: decompose(model, targets), repeat)
    state = {}

    def fresh_dir():
        if "tmp" in state:
            state["tmp"].cleanup()
        state["tmp"] = tempfile.TemporaryDirectory(prefix="svf-bench-")

    def first():
        _, hit = get_factors(model, targets, None, state["tmp"].name, model_fingerprint=fp)
        assert not hit

    t_save = timed(first, repeat, setup=fresh_dir)  # each run: new empty dir, so compute + save

    def second():
        _, hit = get_factors(model, targets, None, state["tmp"].name, model_fingerprint=fp)
        assert hit

    t_load = timed(second, repeat)  # the dir filled by the last `first` run
    t_fp = timed(lambda: fingerprint(model), repeat)
    state["tmp"].cleanup()
    return [
        ("SVD of all targets (`decompose`)", t_svd, "cache load (`get_factors`, 2nd call)", t_load),
        ("1st `get_factors` (SVD + save)", t_save, "cache load (`get_factors`, 2nd call)", t_load),
        ("SVD of all targets (`decompose`)", t_svd, "cache load + `fingerprint` (what a hit costs)", t_load + t_fp),
    ]


def bench_merge_vs_generate(svf, model, tok, repeat, notes):
    z = {n: v * 1.1 for n, v in svf.init_z(1.0).items()}  # non-neutral
    t_merge = timed(lambda: svf.merge_(z), repeat)
    svf.unmerge_()
    if tok is None:
        notes.append("generation row skipped: no tokenizer for this model")
        return [("recompose all targets (`merge_`)", t_merge, "generation batch (skipped: no tokenizer)", None)]
    try:
        from t2dist.engines.generation import generate

        label = "`generate` 16 prompts x 8, T=1, 16 tok"
        run = lambda: generate(model, tok, PROMPTS, num_samples=8, temperature=1.0, max_new_tokens=16)  # noqa: E731
    except ImportError as exc:
        notes.append(f"t2dist.engines.generation not importable ({exc}); generation row uses model.generate(do_sample=True)")
        label = "`model.generate` 128 rows, sample, 16 tok"
        enc = tok(PROMPTS * 8, return_tensors="pt", padding=True)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        run = lambda: model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=16,  # noqa: E731
                                     pad_token_id=pad)
    counts = []

    def gen():
        out = run()
        if isinstance(out, list):
            counts.append(sum(len(c.completion_ids) for c in out))

    torch.manual_seed(0)
    t_gen = timed(gen, repeat)
    if counts:
        notes.append(f"generation produced {statistics.median(counts):.0f} new tokens per batch (median; stops at "
                     f"eos/newline), {statistics.median(counts) / t_gen * 1e3:.0f} tok/s")
    return [("recompose all targets (`merge_`)", t_merge, label, t_gen)]


def bench_step(svf, model, repeat):
    from t2dist.rl.logprobs import completion_logprobs

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (BATCH, SEQ), generator=g).tolist()
    prompts = [r[: SEQ - COMPLETION] for r in ids]
    completions = [r[SEQ - COMPLETION:] for r in ids]
    adv = torch.randn(BATCH, 1, generator=g)
    pad = 0

    def loss_of(forward):
        logp, mask = completion_logprobs(forward, prompts, completions, pad)
        return -(logp * adv).sum() / mask.sum()

    z = {n: (v * 1.1).requires_grad_(True) for n, v in svf.init_z(1.0).items()}
    params = list(model.parameters())

    def no_grads():
        for t in list(z.values()) + params:
            t.grad = None

    def svf_step():
        loss_of(lambda **kw: svf(z, **kw)).backward()

    def plain_fwd():
        with torch.no_grad():
            loss_of(model)

    t_svf = timed(svf_step, repeat, setup=no_grads)
    assert all(v.grad is not None for v in z.values())
    t_fwd = timed(plain_fwd, repeat)
    for p in params:
        p.requires_grad_(True)
    try:
        t_full = timed(lambda: loss_of(model).backward(), repeat, setup=no_grads)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    label = f"SVF step: `svf(z,..)` fwd + loss + bwd to z ({BATCH}x{SEQ})"
    return [
        (label, t_svf, "full fine-tuning fwd + bwd (all base params)", t_full),
        (label, t_svf, "plain forward, no grad", t_fwd),
    ]


def run_one(args, shape):
    from t2dist.svf.model import SVFModel

    model, tok, desc, notes = load(args.model, shape)
    n_params = sum(p.numel() for p in model.parameters())
    svf, _ = SVFModel.from_pretrained_model(model, targets=args.targets, cache_dir=None)
    t_total = time.perf_counter()
    rows = bench_factors(model, svf.targets, args.repeat)
    rows += bench_merge_vs_generate(svf, model, tok, args.repeat, notes)
    rows += bench_step(svf, model, args.repeat)
    t_total = time.perf_counter() - t_total

    print(f"\n### {desc}")
    print(f"{n_params / 1e6:.2f}M parameters; targets `{args.targets}`: {len(svf.targets)} matrices, "
          f"{svf.num_z} z values; median of {args.repeat} after 1 warm-up; section took {t_total:.1f} s, "
          f"1-min load average at its end {os.getloadavg()[0]:.2f}\n")
    print("| # | A | A ms | B | B ms | A / B |")
    print("|---|---|---:|---|---:|---:|")
    for i, (a, ta, b, tb) in enumerate(rows, 1):
        ratio = f"{ta / tb:.3g}" if tb else "n/a"
        tbs = f"{tb:.2f}" if tb is not None else "—"
        print(f"| {i} | {a} | {ta:.2f} | {b} | {tbs} | {ratio} |")
    for n in notes:
        print(f"\n- note: {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="'toy' (embedded toy base) or a local HF model directory")
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES),
                    help="benchmark a random Llama of this shape instead of --model (repeatable: one table each)")
    ap.add_argument("--targets", default="mlp", help="SVF target spec (preset or regex)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import transformers

    print("## SVF core costs (ratios measured side by side in one run)\n")
    print(f"- torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"- {platform.platform()}, {platform.machine()}, python {platform.python_version()}, "
          f"cpu_count {os.cpu_count()}, processor '{platform.processor() or '?'}'")
    load = os.getloadavg()
    print(f"- load average before start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    if load[0] > 0.5 and args.threads > 1:
        print(f"- WARNING: other processes are using the CPUs; with {args.threads} threads OpenMP/BLAS oversubscription "
              "can slow single ops (SVD, matmul) 10x or more and make medians noisy. Ratios are still measured "
              "side by side, but compare against a quiet run or `--threads 1`.")
    for shape in args.shape or [None]:
        run_one(args, shape)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
