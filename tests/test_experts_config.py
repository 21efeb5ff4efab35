"""Experts on disk (round trip, refusals, atomicity) and the typed config."""
import json

import pytest
import torch

from t2dist.config import ConfigError, load_config
from t2dist.experts.expert import ExpertError, load_expert, make_card, read_expert, save_expert, z_statistics
from t2dist.svf import Parametrization, SVFModel
from tiny_models import tiny_model

IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))


def trained_like_z(svf, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in svf.neutral_z().items()}


def test_expert_round_trip_reproduces_outputs(tmp_path):
    svf, _ = SVFModel.from_pretrained_model(tiny_model(), rank=4)
    z = trained_like_z(svf)
    svf.merge_(z)
    saved_logits = svf.model(input_ids=IDS).logits
    save_expert(tmp_path / "e", z, make_card(svf, name="e", task="math", metrics={"acc": 0.5}))
    svf.unmerge_()
    card = json.loads((tmp_path / "e" / "card.json").read_text())
    for key in ("name", "task", "parametrization", "targets", "rank", "base_fingerprint", "metrics", "config",
                "code_version", "created"):
        assert key in card
    fresh, _ = SVFModel.from_pretrained_model(tiny_model(), rank=4)  # same weights, a new process's view
    expert = load_expert(tmp_path / "e", fresh)
    fresh.merge_(expert.z)
    assert torch.allclose(fresh.model(input_ids=IDS).logits, saved_logits, atol=1e-6)


def test_expert_for_another_base_is_refused(tmp_path):
    svf, _ = SVFModel.from_pretrained_model(tiny_model(seed=0))
    save_expert(tmp_path / "e", svf.neutral_z(), make_card(svf, name="e", task="math", base_model="A"))
    other, _ = SVFModel.from_pretrained_model(tiny_model(seed=1))
    with pytest.raises(ExpertError) as err:
        load_expert(tmp_path / "e", other)
    assert svf.fingerprint in str(err.value) and other.fingerprint in str(err.value)


def test_expert_for_other_targets_is_refused(tmp_path):
    svf, _ = SVFModel.from_pretrained_model(tiny_model())
    save_expert(tmp_path / "e", svf.neutral_z(), make_card(svf, name="e", task="math"))
    attn, _ = SVFModel.from_pretrained_model(tiny_model(), targets="attention")
    with pytest.raises(ExpertError) as err:
        load_expert(tmp_path / "e", attn)
    assert "'mlp'" in str(err.value) and "'attention'" in str(err.value)
    sig, _ = SVFModel.from_pretrained_model(tiny_model(), parametrization=Parametrization("sigmoid"))
    with pytest.raises(ExpertError, match="parametrization"):
        load_expert(tmp_path / "e", sig)


def test_bad_expert_directories(tmp_path):
    with pytest.raises(ExpertError, match="does not exist"):
        read_expert(tmp_path / "nope")
    svf, _ = SVFModel.from_pretrained_model(tiny_model())
    save_expert(tmp_path / "e", svf.neutral_z(), make_card(svf, name="e", task="math"))
    card = json.loads((tmp_path / "e" / "card.json").read_text())
    del card["base_fingerprint"]
    (tmp_path / "e" / "card.json").write_text(json.dumps(card))
    with pytest.raises(ExpertError, match="missing fields: base_fingerprint"):
        read_expert(tmp_path / "e")
    with pytest.raises(ExpertError, match="missing fields"):
        save_expert(tmp_path / "f", svf.neutral_z(), {"name": "f"})
    assert not (tmp_path / "f").exists()


def test_overwriting_an_expert_is_atomic(tmp_path):
    svf, _ = SVFModel.from_pretrained_model(tiny_model())
    card = make_card(svf, name="e", task="math")
    save_expert(tmp_path / "e", svf.neutral_z(), card)
    z2 = trained_like_z(svf)
    save_expert(tmp_path / "e", z2, card)
    got = read_expert(tmp_path / "e").z
    assert all(torch.equal(got[n], z2[n]) for n in z2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temporary leftovers


def test_z_statistics_of_neutral():
    svf, _ = SVFModel.from_pretrained_model(tiny_model(), parametrization=Parametrization("sigmoid"))
    stats = z_statistics(svf.neutral_z(), svf.parametrization)
    assert stats["scale_mean"] == pytest.approx(1.0) and stats["mean_abs_change"] == pytest.approx(0.0, abs=1e-7)
    assert stats["values"] == svf.num_z


def test_config_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\nrl:\n  steps: 5\nsvf:\n  rank: 8\n")
    cfg = load_config(p, ["rl.lr=0.005", "svf.rank=null", "task.name=code", "svf.rescale=true"])
    assert (cfg.name, cfg.rl.steps, cfg.rl.lr, cfg.svf.rank, cfg.task.name, cfg.svf.rescale) == \
        ("demo", 5, 0.005, None, "code", True)


@pytest.mark.parametrize("override,needle", [
    ("rl.lr_rate=0.1", "rl.lr_rate"),
    ("rl.steps=many", "rl.steps"),
    ("task.name=chess", "unknown task 'chess'"),
    ("rl.advantage=magic", "unknown advantage estimator 'magic'"),
    ("rl.kl_estimator=k9", "unknown KL estimator 'k9'"),
    ("svf.parametrization=cubic", "svf.parametrization"),
    ("modle.path=x", "modle"),
    ("rl=3", "rl"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["rl.steps"])
