"""The policy contract (t2dist/policy/base.py): every registered kind passes the same checks.

A new kind registered in ``t2dist.policy.registry`` is picked up here without editing this
file. The references are independent of the policy code: logits of an untouched copy of
the base model, its weights compared bit for bit, and a plain HF model with the weight
change added by hand. The learner's sharded SVF (not a kind of its own) is checked against
the full SVF model on the learning side.
"""
from __future__ import annotations

import copy

import pytest
import torch

from t2dist.config import Config, config_from_dict, load_config
from t2dist.experts.expert import Expert, check_compatible, make_card
from t2dist.policy.base import Policy
from t2dist.policy.registry import (POLICIES, PolicyKindError, config_from_card, policy_class, register_policy)
from tiny_models import tiny_model

IDS = torch.tensor([[5, 17, 3, 42, 8, 21], [9, 2, 33, 61, 7, 1]])

#: a non-default setup of each kind (what a card must carry back); a new kind falls back to its defaults
SETUPS = {
    "svf": {"svf": {"rank": 8, "parametrization": "sigmoid", "max_mult": 3.0, "rescale": True, "cache_dir": None,
                    "targets": "attention"}},
    "lora": {"lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": "q_proj,o_proj", "init_seed": 3}},
}


def config_of(kind: str) -> Config:
    return config_from_dict({"policy": {"kind": kind}, "svf": {"cache_dir": None}, **SETUPS.get(kind, {})})


def build(kind: str, seed: int = 0) -> Policy:
    cfg = config_of(kind)
    return policy_class(kind).from_config(tiny_model(seed=seed), cfg)


def away_from_neutral(policy: Policy, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in policy.neutral_z().items()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


KINDS = sorted(POLICIES)


@pytest.mark.parametrize("kind", KINDS)
def test_neutral_z_reproduces_the_base_model(kind):
    policy = build(kind)
    assert isinstance(policy, Policy) and policy.kind == kind
    base = logits(tiny_model(seed=0))
    with torch.no_grad():
        torch.testing.assert_close(policy(policy.neutral_z(), input_ids=IDS).logits, base, atol=1e-5, rtol=1e-5)
    policy.merge_(policy.neutral_z())
    torch.testing.assert_close(logits(policy.model), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_restores_the_base_weights_exactly(kind):
    policy = build(kind)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    z = away_from_neutral(policy)
    policy.merge_(z, version="v1")
    assert policy.merged_version == "v1"
    assert any(not torch.equal(v, before[k]) for k, v in policy.model.state_dict().items())  # merge did something
    policy.unmerge_()
    assert policy.merged_version is None
    after = policy.model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("kind", KINDS)
def test_learning_path_equals_generation_path_and_export(kind):
    """forward(z) == the merged model == the exported plain model == base weights + delta added by hand."""
    policy = build(kind)
    z = away_from_neutral(policy)
    with torch.no_grad():
        learned = policy(z, input_ids=IDS).logits
    assert not torch.allclose(learned, logits(tiny_model(seed=0)), atol=1e-3)  # z is not neutral
    policy.merge_(z)
    torch.testing.assert_close(logits(policy.model), learned, atol=1e-5, rtol=1e-5)
    policy.unmerge_()
    by_hand = tiny_model(seed=0)
    with torch.no_grad():
        for t in policy.targets:
            by_hand.get_submodule(t).weight += policy.delta(t, z).to(torch.float32)
    torch.testing.assert_close(logits(by_hand), learned, atol=1e-5, rtol=1e-5)
    with policy.merged_model(z) as plain:
        assert sorted(plain.state_dict()) == sorted(tiny_model(seed=0).state_dict())  # no t2dist/peft layers
        torch.testing.assert_close(logits(plain), learned, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(policy.model), logits(tiny_model(seed=0)), atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_check_z_rejects_a_missing_tensor_and_a_wrong_shape(kind):
    policy = build(kind)
    z = policy.init_z()
    assert {n: tuple(v.shape) for n, v in z.items()} == policy.z_shapes()
    assert policy.num_z == sum(v.numel() for v in z.values())
    policy.check_z(z)
    first = next(iter(z))
    with pytest.raises(KeyError, match="missing") as err:
        policy.check_z({n: v for n, v in z.items() if n != first})
    assert first in str(err.value)
    with pytest.raises(KeyError, match="unexpected"):
        policy.check_z({**z, "not.a.tensor": z[first]})
    bad = {**z, first: torch.zeros(3, 1)}
    with pytest.raises(ValueError, match=r"has shape \(3, 1\), expected") as err:
        policy.check_z(bad)
    assert first in str(err.value)
    with pytest.raises(ValueError):
        policy.merge_(bad)  # the generation path checks before writing anything


@pytest.mark.parametrize("kind", KINDS)
def test_card_to_config_to_from_config_gives_back_the_same_policy(kind):
    """The one card→config function, used by ``t2dist eval/export`` (as overrides) and by adaptation."""
    from t2dist.cli.main import policy_overrides_from_card

    policy = build(kind)
    z = away_from_neutral(policy)
    card = make_card(policy, name="e", task="math")
    other = load_config(None, ["policy.kind=svf" if kind != "svf" else "policy.kind=lora"])  # the other kind, defaults
    cfg = config_from_card(other, card)
    assert cfg.policy.kind == kind
    cli = load_config(None, ["policy.kind=svf" if kind != "svf" else "policy.kind=lora",
                             *(f"{k}={v}" for k, v in policy_overrides_from_card(card, []).items())])
    assert cli == cfg  # the CLI's overrides and adaptation's config agree
    again = policy_class(cfg.policy.kind).from_config(tiny_model(seed=0), cfg.model_copy(
        update={"svf": cfg.svf.model_copy(update={"cache_dir": None})}))
    assert again.card_fields() == policy.card_fields()
    check_compatible(Expert(z, card), again)
    with torch.no_grad():
        torch.testing.assert_close(again(z, input_ids=IDS).logits, policy(z, input_ids=IDS).logits, atol=1e-5,
                                   rtol=1e-5)


def test_user_overrides_win_over_the_card():
    from t2dist.cli.main import policy_overrides_from_card

    card = make_card(build("svf"), name="e", task="math")
    over = policy_overrides_from_card(card, ["svf.rank=4"])
    assert "svf.rank" not in over and over["svf.parametrization"] == "sigmoid" and over["svf.rescale"] == "true"


def test_registering_a_kind_twice_is_an_error():
    before = dict(POLICIES)
    with pytest.raises(PolicyKindError, match="'svf' is already registered"):
        register_policy("svf", POLICIES["svf"])
    assert POLICIES == before
    with pytest.raises(PolicyKindError, match="unknown; known kinds: lora, svf"):
        policy_class("dora")


def test_a_new_kind_is_one_registry_line():
    """A kind registered at run time is accepted by the config and looked up for cards."""
    from t2dist.experts.expert import card_kind

    class Dora(POLICIES["svf"]):
        kind = "dora"

    register_policy("dora", Dora)
    try:
        assert load_config(None, ["policy.kind=dora"]).policy.kind == "dora"
        assert card_kind({"kind": "dora"}) == "dora"
    finally:
        del POLICIES["dora"]


def test_sharded_svf_keeps_the_learning_side_of_the_contract():
    """R = 1 (SoloComm): the never-materialised low-rank path against the full SVF model."""
    from t2dist.svf.factors import FactorSlice
    from t2dist.svf.sharded import SoloComm, shard_model

    full = build("svf")
    slices = {n: FactorSlice(f.U, f.S, f.V, 0, f.rank) for n, f in full.factors.items()}
    sharded = shard_model(copy.deepcopy(tiny_model(seed=0)), slices, SoloComm(), full.parametrization,
                          fingerprint=full.fingerprint, svf_rank=full.rank, target_spec=full.target_spec)
    assert isinstance(sharded, Policy)
    assert sharded.card_fields() == full.card_fields() and sharded.z_shapes() == full.z_shapes()
    z = away_from_neutral(full)
    with torch.no_grad():
        torch.testing.assert_close(sharded(z, input_ids=IDS).logits, full(z, input_ids=IDS).logits, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(sharded(sharded.neutral_z(), input_ids=IDS).logits, logits(tiny_model(seed=0)),
                                   atol=1e-5, rtol=1e-5)
    for t in full.targets:
        torch.testing.assert_close(sharded.delta(t, z), full.delta(t, z), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="missing"):
        sharded.check_z({})
    with pytest.raises(NotImplementedError, match="rollout actors"):
        sharded.merge_(z)
