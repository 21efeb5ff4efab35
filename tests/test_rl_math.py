"""Advantage and KL estimators, the policy-gradient loss and completion log-probs, against hand computations."""
import math

import pytest
import torch

from t2dist.rl.data import PromptStream
from t2dist.rl.logprobs import completion_logprobs
from t2dist.rl.losses import (ADVANTAGES, KL_ESTIMATORS, aggregate, compute_advantages, policy_loss, register_advantage,
                              register_kl)
from t2dist.tasks.base import Example
from tiny_models import tiny_model

R = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, 1.0]])


def test_advantages_by_hand():
    assert torch.allclose(compute_advantages(R, "group_mean"), torch.tensor([[0.5, -1.5, 0.5, 0.5], [-0.5, -0.5, -0.5, 1.5]]))
    # leave-one-out: r_i - mean of the other three
    assert torch.allclose(compute_advantages(R, "rloo")[0], torch.tensor([1 - 1 / 3, -1 - 1, 1 - 1 / 3, 1 - 1 / 3]))
    std = math.sqrt(0.75)
    assert torch.allclose(compute_advantages(R, "grpo")[0], torch.tensor([0.5, -1.5, 0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(compute_advantages(R, "none"), R)
    assert set(ADVANTAGES) >= {"group_mean", "rloo", "grpo", "none"}
    with pytest.raises(ValueError, match="unknown advantage"):
        compute_advantages(R, "nope")


def test_kl_estimators_against_exact_kl():
    """Sampled from p, k1 and k3 are unbiased for KL(p||q); all are ~0 when p == q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, logq = p.log()[x], q.log()[x]
    assert float(KL_ESTIMATORS["k1"](logp, logq).mean()) == pytest.approx(exact, abs=2e-3)
    assert float(KL_ESTIMATORS["k3"](logp, logq).mean()) == pytest.approx(exact, abs=2e-3)
    assert float(KL_ESTIMATORS["k2"](logp, logq).mean()) == pytest.approx(exact, rel=0.1)  # biased, close for close p, q
    for est in KL_ESTIMATORS.values():
        assert float(est(logp, logp).abs().max()) == 0.0



@pytest.mark.parametrize("registry, register, name", [(ADVANTAGES, register_advantage, "grpo"),
                                                      (KL_ESTIMATORS, register_kl, "k3")])
def test_registering_an_estimator_name_twice_fails_and_keeps_the_first(registry, register, name):
    first = registry[name]
    r = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    before = first(r) if registry is ADVANTAGES else first(r, torch.zeros_like(r))
    with pytest.raises(ValueError, match=f"'{name}' is registered twice"):
        register(name)(lambda *a: torch.zeros(()))
    assert registry[name] is first
    after = registry[name](r) if registry is ADVANTAGES else registry[name](r, torch.zeros_like(r))
    assert torch.equal(before, after)
    # a new name still registers (and is removed again: no process-wide state left behind)
    register(f"{name}-test-only")(first)
    assert registry.pop(f"{name}-test-only") is first

def test_policy_gradient_is_reinforce():
    """grad of the loss = -(1/#tokens) Σ A_i ∇ log π(token) for token_mean."""
    theta = torch.randn(2, 3, requires_grad=True, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    logp = torch.log_softmax(theta, -1)  # pretend per-token log-probs
    loss, _ = policy_loss(logp, mask, adv, agg="token_mean")
    (g_loss,) = torch.autograd.grad(loss, theta)
    logp = torch.log_softmax(theta, -1)
    manual = -(adv.unsqueeze(1) * logp * mask).sum() / mask.sum()
    (g_manual,) = torch.autograd.grad(manual, theta)
    assert torch.allclose(g_loss, g_manual)
    # sequence mean: each sequence's token mean, averaged
    logp = torch.log_softmax(theta, -1)
    loss, _ = policy_loss(logp, mask, adv, agg="seq_mean")
    (g_loss,) = torch.autograd.grad(loss, theta)
    logp = torch.log_softmax(theta, -1)
    manual = -((adv.unsqueeze(1) * logp * mask).sum(1) / mask.sum(1)).mean()
    (g_manual,) = torch.autograd.grad(manual, theta)
    assert torch.allclose(g_loss, g_manual)


def test_kl_term_and_global_normalizer():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5], [-0.5, -0.3]])
    mask = torch.ones(2, 2)
    adv = torch.zeros(2)
    loss, stats = policy_loss(logp, mask, adv, ref_logp=ref, beta=0.5, kl_estimator="k1")
    assert loss.item() == pytest.approx(0.5 * (logp - ref).mean().item())
    assert stats["kl"] == pytest.approx((logp - ref).mean().item())
    # two halves with the global normaliser sum to the whole
    whole = aggregate(logp, mask, "token_mean")
    halves = aggregate(logp[:1], mask[:1], "token_mean", normalizer=4) + aggregate(logp[1:], mask[1:], "token_mean", normalizer=4)
    assert whole.item() == pytest.approx(halves.item())


def test_ppo_clipping_stops_the_gradient_outside_the_trust_region():
    logp = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-0.5]])  # ratio e^0.5 ≈ 1.65 > 1.2
    loss, stats = policy_loss(logp, torch.ones(1, 1), torch.tensor([1.0]), old_logp=old, clip_eps=0.2)
    (g,) = torch.autograd.grad(loss, logp)
    assert float(g.abs().sum()) == 0.0 and stats["clip_frac"] == 1.0


@pytest.mark.parametrize("honours_keep", [True, False])
def test_completion_logprobs_match_unpadded_computation(honours_keep):
    """Prompts of different lengths: the logits kept (``logits_to_keep``, from the shortest prompt's end
    on) must line up with each row's completion; a model that ignores the argument works too."""
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    comps = [[20, 21], [22, 23, 24, 25], [26]]
    kept = []

    def forward(**kw):
        kept.append(kw["logits_to_keep"])
        if not honours_keep:
            kw.pop("logits_to_keep")
        return model(**kw)

    logp, mask, ent = completion_logprobs(forward, prompts, comps, pad_id=0, with_entropy=True)
    assert kept == [6 - 2 + 1]  # L = 2 + 4 (the longest row); from position 1 (the shortest prompt ends at 2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids = torch.tensor([p + c])
        lsm = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1).detach()
        for t, tok in enumerate(c):
            assert float(logp[i, t].detach()) == pytest.approx(float(lsm[len(p) + t - 1, tok]), abs=1e-5)
            expected_ent = float(-(lsm[len(p) + t - 1].exp() * lsm[len(p) + t - 1]).sum())
            assert float(ent[i, t]) == pytest.approx(expected_ent, abs=1e-5)
    # the entropy is only logged: no autograd graph holds the (B, T, V) tensors behind it (a 262k-token
    # head makes each one ~0.8 GB per micro-batch); the log-probabilities keep theirs
    assert logp.requires_grad and not ent.requires_grad


def test_prompt_stream_is_deterministic_and_resumable():
    exs = [Example("t", str(i), str(i)) for i in range(10)]
    a = PromptStream(exs, seed=3)
    first = [e.prompt for _ in range(5) for e in a.next_batch(4)]
    assert sorted(first[:10]) == sorted(str(i) for i in range(10))  # an epoch covers every example once
    b = PromptStream(exs, seed=3)
    b.next_batch(4)
    resumed = PromptStream(exs, seed=3, position=b.position)
    assert [e.prompt for e in resumed.next_batch(16)] == first[4:20]
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], seed=0)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_matches_transformers(schedule):
    """``rl.lr_schedule`` gives, step by step, the lr of Hugging Face's scheduler of that name
    (warm-up 0), the one TRL's GRPOTrainer would use: an independent implementation."""
    from transformers import get_scheduler

    from t2dist.config import RLConfig
    from t2dist.rl.schedule import set_step_lr

    rl = RLConfig(steps=7, lr=3e-3, lr_schedule=schedule)
    ref_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=rl.lr)
    hf = get_scheduler(schedule, ref_opt, num_warmup_steps=0, num_training_steps=rl.steps)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=rl.lr)
    lrs = []
    for step in range(rl.steps):
        lrs.append(set_step_lr(opt, rl, step))
        assert opt.param_groups[0]["lr"] == lrs[-1]
        assert lrs[-1] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        ref_opt.step()
        hf.step()
    assert lrs[0] == rl.lr
    if schedule != "constant":
        assert lrs[-1] < rl.lr / 5 and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_unknown_lr_schedule_is_a_config_error():
    from pydantic import ValidationError

    from t2dist.config import RLConfig

    with pytest.raises(ValidationError, match="lr_schedule"):
        RLConfig(lr_schedule="exponential")
