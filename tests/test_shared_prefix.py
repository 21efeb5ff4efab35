"""The learner's shared-prefix forward (each distinct prompt once, completions on its KV cache) against the
packed forward (every prompt + completion in full), and the policies' ``bind``."""
import pytest
import torch
from torch.func import functional_call
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from t2dist.config import RLConfig
from t2dist.rl.logprobs import completion_logprobs, output_head
from t2dist.rl.rollout import RolloutBatch
from t2dist.rl.step import rl_loss
from t2dist.svf import SVFModel
from tiny_models import tiny_model

# Prompts of different lengths, samples of one prompt not adjacent (row 4 repeats prompt 0), completion
# lengths 1..4.  The longest prompt is longer than gemma3's 3-token sliding window.
PROMPTS = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9], [5, 6, 7], [10, 11, 12, 13, 14], [10, 11, 12, 13, 14]]
COMPS = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29], [40, 41, 42], [30, 31, 32], [33]]


def gemma3(window: int = 3):
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, vocab_size=97, max_position_embeddings=64,
                           sliding_window=window, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def logprobs_and_grads(model, prompts, comps, share: bool, head=None):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    calls = []

    def forward(**kw):
        calls.append(kw["input_ids"].shape)
        return functional_call(model, params, args=(), kwargs=kw)

    logp, mask, ent = completion_logprobs(forward, prompts, comps, pad_id=0, with_entropy=True, share_prefix=share,
                                          head=head)
    weights = torch.arange(1, len(prompts) + 1, dtype=torch.float32).unsqueeze(1)  # every row's own weight
    grads = torch.autograd.grad((logp * weights).sum() + ent.sum(), list(params.values()))
    return logp.detach(), mask, ent.detach(), grads, calls


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_shared_prefix_matches_packed_values_and_gradients(arch):
    model = tiny_model("llama") if arch == "llama" else gemma3()
    lp, mask, ent, grads, calls = logprobs_and_grads(model, PROMPTS, COMPS, share=False)
    lp2, mask2, ent2, grads2, calls2 = logprobs_and_grads(model, PROMPTS, COMPS, share=True)
    assert torch.equal(mask, mask2) and mask.sum() == sum(len(c) for c in COMPS)
    assert (lp - lp2).abs().max() < 1e-5 and (ent - ent2).abs().max() < 1e-5
    assert lp[mask].abs().min() > 0  # real log-probs, not zeros on both sides
    for g, g2 in zip(grads, grads2, strict=True):
        assert (g - g2).norm() <= 1e-5 * max(g.norm(), 1e-3)
    # one packed call over 7 full rows; then 3 distinct prompts (5 wide) and 7 completions less their last token
    assert calls == [(7, 5 + 3)]  # the longest row: prompt 5 + completion 3
    assert calls2 == [(3, 5), (7, 3)]


def test_shared_prefix_with_one_token_completions():
    """Every completion one token long: the first pass alone predicts them; the second still runs (the
    sharded learner's ranks must make the same number of calls whatever their data)."""
    model = tiny_model()
    comps = [[c[0]] for c in COMPS]
    lp, mask, ent, grads, _ = logprobs_and_grads(model, PROMPTS, comps, share=False)
    lp2, mask2, ent2, grads2, calls2 = logprobs_and_grads(model, PROMPTS, comps, share=True)
    assert (lp - lp2).abs().max() < 1e-5 and torch.equal(mask, mask2)
    assert calls2 == [(3, 5), (7, 1)]
    for g, g2 in zip(grads, grads2, strict=True):
        assert (g - g2).norm() <= 1e-5 * max(g.norm(), 1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("comps", [COMPS, [[c[0]] for c in COMPS]], ids=["lengths-1-to-4", "one-token"])
def test_head_only_at_completion_tokens_gives_the_same_values_and_gradients(arch, share, comps):
    """With ``head`` the LM head runs on the rows that predict a completion token and nothing else (not the
    padding of shorter completions, not prompt positions); log-probs, entropies and gradients unchanged."""
    model = tiny_model("llama") if arch == "llama" else gemma3()
    head = output_head(model)
    rows = []
    handle = head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[:-1].numel()))
    lp, mask, ent, grads, _ = logprobs_and_grads(model, PROMPTS, comps, share=False)
    full_rows = sum(rows)
    rows.clear()
    lp2, mask2, ent2, grads2, _ = logprobs_and_grads(model, PROMPTS, comps, share=share, head=head)
    handle.remove()
    assert torch.equal(mask, mask2)
    assert (lp - lp2).abs().max() < 1e-5 and (ent - ent2).abs().max() < 1e-5
    assert lp[mask].abs().min() > 0 and torch.all(lp2[~mask] == 0)
    for g, g2 in zip(grads, grads2, strict=True):
        assert (g - g2).norm() <= 1e-5 * max(g.norm(), 1e-3)
    n_tokens = sum(len(c) for c in comps)
    # shared prefix: pass 1 keeps each distinct prompt's last position (3 prompts), pass 2 the rest
    assert sum(rows) == (n_tokens + 3 - len(comps) if share else n_tokens) < full_rows


def test_a_head_the_forward_never_calls_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="did not call the output head"):
        completion_logprobs(lambda **kw: model(**kw), PROMPTS, COMPS, pad_id=0, head=torch.nn.Linear(4, 4))


def test_svf_bind_builds_the_adapted_weights_once(monkeypatch):
    svf, _ = SVFModel.from_pretrained_model(tiny_model())
    built = []
    delta = SVFModel.delta
    monkeypatch.setattr(SVFModel, "delta", lambda self, name, z: built.append(name) or delta(self, name, z))
    forward = svf.bind(svf.neutral_z())
    ids = torch.tensor([[5, 6, 7]])
    forward(input_ids=ids)
    forward(input_ids=ids)
    assert sorted(built) == sorted(svf.targets)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_rl_loss_same_with_and_without_shared_prefix(loss_agg):
    """The whole RL loss (policy gradient, KL to neutral, entropy) and its z gradient, on an SVF policy."""
    svf, _ = SVFModel.from_pretrained_model(tiny_model())
    g = torch.Generator().manual_seed(0)
    z0 = {n: v + 0.2 * torch.randn(v.shape, generator=g) for n, v in svf.neutral_z().items()}
    prompts = [p for p in ([5, 6, 7], [8, 9]) for _ in range(3)]
    comps = [[20, 21], [22, 23, 24], [26], [27, 28, 29, 30], [31], [32, 33]]
    batch = RolloutBatch(prompts, comps, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]),
                         torch.tensor([[True, False, False], [False, True, True]]))
    out = {}
    for share in (False, True):
        z = {n: v.clone().requires_grad_(True) for n, v in z0.items()}
        cfg = RLConfig(beta=0.1, loss_agg=loss_agg, shared_prefix=share)
        loss, stats = rl_loss(svf, z, batch, cfg, pad_id=0)
        loss.backward()
        out[share] = loss.item(), stats, torch.cat([z[n].grad for n in svf.targets])
    (l1, s1, g1), (l2, s2, g2) = out[False], out[True]
    assert abs(l1 - l2) < 1e-6 and s1["kl"] > 0 and abs(s1["kl"] - s2["kl"]) < 1e-6
    assert abs(s1["entropy"] - s2["entropy"]) < 1e-5
    assert g1.norm() > 0 and (g1 - g2).norm() <= 1e-5 * g1.norm()
