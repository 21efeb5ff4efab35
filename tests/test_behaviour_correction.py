"""Engine/learner mismatch statistics and truncated importance weights (rl.behaviour_correction=tis)."""
from __future__ import annotations

import pytest
import torch

from t2dist.config import ConfigError, load_config
from t2dist.rl.losses import policy_loss
from t2dist.rl.rollout import RolloutBatch


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 5, generator=g) * 3
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    behaviour = logp + 0.4 * torch.randn(4, 5, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    return logp, mask, behaviour, adv


def test_mismatch_statistics_by_hand():
    logp, mask, behaviour, adv = _case()
    _, stats = policy_loss(logp, mask, adv, behaviour_logp=behaviour)
    d = (logp - behaviour)[mask.bool()]
    assert torch.isclose(stats["behaviour_abs_dlogp"], d.abs().mean())
    assert torch.isclose(stats["behaviour_kl"], (d.exp() - d - 1).mean())
    _, same = policy_loss(logp, mask, adv, behaviour_logp=logp.clone())
    assert float(same["behaviour_abs_dlogp"]) == 0.0 and float(same["behaviour_kl"]) == 0.0


def test_no_correction_leaves_the_loss_alone():
    logp, mask, behaviour, adv = _case(1)
    a = logp.clone().requires_grad_()
    b = logp.clone().requires_grad_()
    la, _ = policy_loss(a, mask, adv)
    lb, _ = policy_loss(b, mask, adv, behaviour_logp=behaviour)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("cap", [1.0, 1.5, 10.0])
def test_tis_gradient_is_the_capped_importance_weighted_reinforce(cap):
    logp, mask, behaviour, adv = _case(2)
    x = logp.clone().requires_grad_()
    loss, stats = policy_loss(x, mask, adv, behaviour_logp=behaviour, tis_cap=cap)
    loss.backward()
    w = torch.exp(logp - behaviour).clamp(max=cap)
    expected = -(adv[:, None] * w * mask) / mask.sum()  # d/dlogp of token-mean(-A · w · ratio), ratio = 1
    torch.testing.assert_close(x.grad, expected)
    assert torch.isclose(stats["tis_weight"], w[mask.bool()].mean())
    assert 0.0 <= float(stats["tis_capped_frac"]) <= 1.0
    with pytest.raises(ValueError, match="behaviour_correction=tis"):
        policy_loss(logp, mask, adv, tis_cap=cap)


def test_config_keys():
    cfg = load_config(None, ["rl.behaviour_correction=tis", "rl.tis_cap=3"])
    assert cfg.rl.behaviour_correction == "tis" and cfg.rl.tis_cap == 3.0
    with pytest.raises(ConfigError, match="rl.behaviour_correction"):
        load_config(None, ["rl.behaviour_correction=is"])


def test_rollout_batch_carries_behaviour_logprobs_through_select_and_concat():
    lps = [[-0.1], [-0.2, -0.3], [-0.4], [-0.5, -0.6, -0.7]]
    b = RolloutBatch([[1], [1], [2], [2]], [[5], [6, 7], [8], [9, 9, 9]], torch.zeros(2, 2), torch.zeros(2, 2, dtype=bool),
                     ["a", "b", "c", "d"], behaviour_logprobs=lps)
    assert b.select([1]).behaviour_logprobs == lps[2:]
    both = RolloutBatch.concat([b.select([1]), b.select([0])])
    assert both.behaviour_logprobs == lps[2:] + lps[:2]
    t = both.behaviour_tensor()
    assert t.shape == (4, 3) and t[1].tolist() == pytest.approx([-0.5, -0.6, -0.7]) and t[0, 1] == 0
    plain = RolloutBatch([[1], [1]], [[2], [3]], torch.zeros(1, 2), torch.zeros(1, 2, dtype=bool))
    assert RolloutBatch.concat([b, plain]).behaviour_logprobs is None  # all or nothing
