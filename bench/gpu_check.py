"""GPU throughput of the SVF paths on a randomly initialised ~1B-parameter Llama (no download, no Ray).

    python bench/gpu_check.py                     # CUDA, hidden 2048, 16 layers, MLP 5632 (~1.1B parameters)
    python bench/gpu_check.py --device cpu --shape tiny   # a CPU smoke run of the same code (seconds)

Prints a markdown table; each row is measured in this process, one after another, with
``torch.cuda.synchronize()`` around the timed region and ``torch.cuda.empty_cache()`` between
phases (peak memory is reset per phase):

1. SVD of every MLP matrix (fp32, ``torch.linalg.svd``), the one-time factor cost;
2. recomposing W' for every target (``SVFModel.merge_``), what a rollout actor does per z sync;
3. generation (sampling, bf16 base): new tokens/s at batch 64;
4. a learner step (forward + completion log-prob loss + backward to z) on 16×512 tokens, three ways:
   ``SVFModel`` (fp32 factors, W' materialised through functional_call), the sharded layer of
   ``t2dist/svf/sharded.py`` at R=1 with bf16 factors (the low-rank path that never forms ΔW), and a plain
   bf16 forward without grad for scale.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def phase(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.type == "cuda" else "-"


def timed(fn, device, repeat: int = 3):
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--batch", type=int, default=16, help="learner sequences")
    ap.add_argument("--seq", type=int, default=512, help="learner tokens per sequence")
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.sharding import RowComm
    from t2dist.rl.logprobs import completion_logprobs
    from t2dist.svf.factors import FactorSlice, decompose
    from t2dist.svf.model import SVFModel
    from t2dist.svf.parametrization import Parametrization
    from t2dist.svf.sharded import shard_model
    from t2dist.svf.targets import select_targets

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py: CUDA is not available here (use --device cpu --shape tiny for a smoke run)")
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    mcfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(mcfg).to(low).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    names = select_targets(model, "mlp")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"model {args.shape}: {n_params / 1e9:.3f}B parameters, {len(names)} MLP targets, base dtype {low}\n")
    rows = []

    # 1. SVD
    phase(device)
    t = timed(lambda: decompose(model, names), device, repeat=1)
    factors = decompose(model, names)
    rows.append(("SVD of all MLP targets (fp32)", f"{t:.2f} s", "", peak_gib(device)))

    # 2. merge
    svf = SVFModel(model, factors, Parametrization(), fingerprint="random")
    z = {n: v * 1.1 for n, v in svf.init_z().items()}
    phase(device)
    t = timed(lambda: svf.merge_(z, object()), device)
    rows.append(("recompose W' (merge_, all targets)", f"{t * 1e3:.1f} ms", "", peak_gib(device)))
    svf.unmerge_()

    # 3. generation
    phase(device)
    prompt = torch.randint(3, mcfg.vocab_size, (args.gen_batch, 64), device=device)

    def gen():
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

    t = timed(gen, device, repeat=1)
    rows.append((f"generate {args.gen_batch}x{args.new_tokens} new tokens (sampling)",
                 f"{args.gen_batch * args.new_tokens / t:,.0f} tok/s", f"{t:.2f} s", peak_gib(device)))

    # 4. learner step
    B, L = args.batch, args.seq
    prompts = [torch.randint(3, mcfg.vocab_size, (L // 4,)).tolist() for _ in range(B)]
    comps = [torch.randint(3, mcfg.vocab_size, (L - L // 4,)).tolist() for _ in range(B)]

    def step(policy):
        zz = {n: v.detach().clone().requires_grad_(True) for n, v in z.items()}
        logp, mask = completion_logprobs(lambda **kw: policy(zz, **kw), prompts, comps, 0, device)
        (-(logp * mask).sum() / mask.sum()).backward()

    def plain():
        with torch.no_grad():
            completion_logprobs(lambda **kw: model(**kw), prompts, comps, 0, device)

    phase(device)
    t_plain = timed(plain, device)
    rows.append((f"plain forward, no grad ({B}x{L})", f"{B * L / t_plain:,.0f} tok/s", f"{t_plain:.3f} s",
                 peak_gib(device)))
    phase(device)
    t_svf = timed(lambda: step(svf), device)
    rows.append((f"learner step, SVFModel fp32 factors ({B}x{L})", f"{B * L / t_svf:,.0f} tok/s",
                 f"{t_svf:.3f} s", peak_gib(device)))
    slices = {n: FactorSlice(f.U.to(low), f.S.float(), f.V.to(low), 0, f.rank) for n, f in factors.items()}
    del svf, factors
    phase(device)
    sharded = shard_model(model, slices, RowComm(0, 1, "none"), Parametrization())
    del slices
    phase(device)
    t_sh = timed(lambda: step(sharded), device)
    rows.append((f"learner step, sharded low-rank layer {str(low).split('.')[-1]} factors, R=1 ({B}x{L})",
                 f"{B * L / t_sh:,.0f} tok/s", f"{t_sh:.3f} s", peak_gib(device)))
    mem = sharded.memory()

    print("| what | throughput | seconds | peak GiB |\n|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nlearner step: sharded/SVFModel time ratio {t_sh / t_svf:.2f}; SVFModel step / plain forward "
          f"{t_svf / t_plain:.2f}")
    print(f"sharded rank (R=1) holds factors {mem['factor_bytes'] / 2**30:.2f} GiB, target W "
          f"{mem['target_weight_bytes'] / 2**30:.2f} GiB, other weights {mem['other_weight_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
