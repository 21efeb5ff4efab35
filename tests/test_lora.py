"""The LoRA baseline policy (t2dist/policy/lora.py): exactness, gradients, experts, and the distributed pipeline."""
import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from t2dist.config import ConfigError, load_config
from t2dist.engines.hf import HFEngine
from t2dist.experts.expert import ExpertError, check_compatible, load_expert, make_card, read_expert, save_expert
from t2dist.policy.lora import LoRAModel
from t2dist.svf.targets import TargetSpecError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
IDS = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def fresh_toy():
    from t2dist.models.loading import load_model

    return load_model("toy")


def random_b(lora, seed=0, scale=0.2):
    """Adapter tensors as after training: the seeded A and a random B (the neutral B is 0)."""
    g = torch.Generator().manual_seed(seed)
    return {n: (scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if ".lora_B." in n else v.clone())
            for n, v in lora.init_z().items()}


def test_neutral_equals_base_and_merge_matches_functional_path():
    base, _ = fresh_toy()
    lora = LoRAModel.from_pretrained_model(fresh_toy()[0], r=4, alpha=8, targets="q_proj,v_proj", init_seed=3)
    assert lora.targets == [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    assert lora.num_z == 8 * (4 * 128 + 128 * 4)
    with torch.no_grad():
        want = base(input_ids=IDS).logits
        assert torch.equal(lora(lora.neutral_z(), input_ids=IDS).logits, want)  # exact, not approximately
        assert torch.equal(lora.model(input_ids=IDS).logits, want)
        z = random_b(lora)
        functional = lora(z, input_ids=IDS).logits
        assert (functional - want).abs().max() > 1e-2  # a non-neutral adapter changes the outputs
        lora.merge_(z, version=7)
        assert lora.merged_version == 7
        assert torch.allclose(lora.model(input_ids=IDS).logits, functional, atol=1e-5)
        lora.unmerge_()
        assert torch.equal(lora.model(input_ids=IDS).logits, want)
    # the same seed draws the same A in every process; another seed another A
    again = LoRAModel.from_pretrained_model(fresh_toy()[0], r=4, alpha=8, init_seed=3)
    other = LoRAModel.from_pretrained_model(fresh_toy()[0], r=4, alpha=8, init_seed=4)
    name = lora.names[0]
    assert torch.equal(again.init_z()[name], lora.init_z()[name])
    assert not torch.equal(other.init_z()[name], lora.init_z()[name])


def test_forward_and_gradient_match_explicit_weights_and_a_peft_model():
    """Our functional path against (1) the base run with W + alpha/r·BA written in by hand
    and (2) peft's own PeftModel with the same A and B, forward and gradient."""
    from peft import LoraConfig, get_peft_model

    lora = LoRAModel.from_pretrained_model(fresh_toy()[0], r=4, alpha=8, dropout=0.0, init_seed=1)
    z = {n: v.clone().requires_grad_(True) for n, v in random_b(lora, seed=2).items()}
    logits = lora(z, input_ids=IDS).logits
    loss = torch.log_softmax(logits, -1)[..., 7].mean()
    loss.backward()

    base, _ = fresh_toy()
    weights = {f"{t}.weight": base.get_submodule(t).weight + lora.delta(t, {n: v.detach() for n, v in z.items()})
               for t in lora.targets}
    with torch.no_grad():
        explicit = functional_call(base, weights, args=(), kwargs={"input_ids": IDS}).logits
    assert torch.allclose(logits.detach(), explicit, atol=1e-4)  # float32 reassociation: x(W+sBA) vs xW + s(xA)B

    peft_model = get_peft_model(fresh_toy()[0], LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"]))
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for n, v in z.items():
            peft_params[f"base_model.model.{n}"].copy_(v)
    peft_model.eval()
    peft_logits = peft_model(input_ids=IDS).logits
    torch.log_softmax(peft_logits, -1)[..., 7].mean().backward()
    assert torch.allclose(peft_logits.detach(), logits.detach(), atol=1e-5)
    for n, v in z.items():
        g = peft_params[f"base_model.model.{n}"].grad
        assert v.grad is not None and v.grad.abs().max() > 0, n
        assert torch.allclose(v.grad, g, atol=1e-6, rtol=1e-4), n


def test_dropout_only_in_the_learning_forward():
    lora = LoRAModel.from_pretrained_model(fresh_toy()[0], r=4, alpha=8, dropout=0.5, init_seed=0)
    z = random_b(lora)
    with torch.no_grad():  # generation, the KL reference, PPO's old log-probs: deterministic
        a = lora(z, input_ids=IDS).logits
        b = lora(z, input_ids=IDS).logits
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = lora(z, input_ids=IDS).logits  # autograd on: the learning forward drops adapter inputs
    assert not torch.allclose(a, c, atol=1e-4)
    assert not any(m.training for m in lora.model.modules())  # switched back off


def test_config_keys_and_errors():
    cfg = load_config(None, ["policy.kind=lora", "lora.r=8", "lora.targets=attention"])
    assert cfg.policy.kind == "lora" and cfg.lora.r == 8 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.05
    assert load_config(None).policy.kind == "svf"
    with pytest.raises(ConfigError, match="policy.kind"):
        load_config(None, ["policy.kind=dora"])
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_config(None, ["lora.dropout=1.5"])
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(None, ["lora.rank=8"])
    with pytest.raises(TargetSpecError, match="lora.targets='qproj'"):
        LoRAModel.from_pretrained_model(fresh_toy()[0], targets="qproj")


def test_lora_expert_save_load_eval_round_trip(tmp_path):
    """train-local a LoRA expert, write it, read it back into a fresh model, evaluate it via the CLI."""
    from t2dist.cli.main import main
    from t2dist.evaluation.accuracy import evaluate
    from t2dist.rl.local import train_local
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task

    cfg = load_config(DEMO, ["policy.kind=lora", "lora.r=4", "lora.alpha=8", "rl.steps=2", "rl.prompts_per_step=4",
                             "rl.samples_per_prompt=4", "rl.lr=0.02"])
    lora, tok = load_policy(cfg)
    assert isinstance(lora, LoRAModel)
    run = train_local(cfg, HFEngine(cfg, policy=lora, tokenizer=tok), get_task("math"), progress=False)
    assert max(float(v.abs().max()) for n, v in run.z.items() if ".lora_B." in n) > 1e-3  # B moved off zero
    card = make_card(lora, name="lora-math", task="math", metrics={}, base_model="toy")
    save_expert(tmp_path / "e", run.z, card)

    on_disk = json.loads((tmp_path / "e" / "card.json").read_text())
    assert on_disk["kind"] == "lora" and on_disk["rank"] == 4 and on_disk["num_z"] == lora.num_z
    assert on_disk["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.05, "targets": lora.targets,
                               "target_spec": "q_proj,v_proj"}
    fresh, _ = load_policy(load_config(DEMO, ["policy.kind=lora", "lora.r=4", "lora.alpha=8", "rl.seed=5"]))
    expert = load_expert(tmp_path / "e", fresh)  # another init seed: A comes from the expert
    fresh.merge_(expert.z)
    lora.merge_(run.z)
    with torch.no_grad():
        assert torch.allclose(fresh.model(input_ids=IDS).logits, lora.model(input_ids=IDS).logits, atol=1e-6)
    limit = 30
    want = evaluate(HFEngine(cfg, policy=fresh, tokenizer=tok), get_task("math"), split="test", limit=limit)

    out = tmp_path / "eval.json"
    assert main(["eval", "--expert", str(tmp_path / "e"), "--task", "math", "--limit", str(limit),
                 "--json", str(out)]) == 0  # the card sets policy.kind/lora.* for the CLI
    assert json.loads(out.read_text())["correct"] == want.correct
    assert main(["expert", "show", str(tmp_path / "e")]) == 0  # LoRA statistics instead of SVF scales

    # refusals: an SVF model for a LoRA expert, another rank, and a LoRA model for an SVF expert
    svf, _ = load_policy(load_config(DEMO))
    with pytest.raises(ExpertError, match="policy.kind=lora"):
        load_expert(tmp_path / "e", svf)
    r8, _ = load_policy(load_config(DEMO, ["policy.kind=lora", "lora.r=8"]))
    with pytest.raises(ExpertError, match="rank 4"):
        load_expert(tmp_path / "e", r8)
    svf_card = make_card(svf, name="s", task="math")
    assert svf_card["kind"] == "svf"
    del svf_card["kind"]  # a card written before LoRA existed is an SVF card
    save_expert(tmp_path / "s", svf.neutral_z(), svf_card)
    check_compatible(read_expert(tmp_path / "s"), svf)
    with pytest.raises(ExpertError, match="svf expert"):
        load_expert(tmp_path / "s", fresh)


def test_distributed_lora_run_matches_train_local(tmp_path):
    """1 rollout actor, 1 DeepSpeed rank, policy lora: the adapter equals the single-process oracle's."""
    import ray

    from t2dist.orchestration.checkpoint import latest_checkpoint, load_checkpoint
    from t2dist.rl.local import train_local
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task
    from t2dist.orchestration.train import train

    cfg = load_config(DEMO, [f"run_dir={tmp_path / 'run'}", f"registry.url={tmp_path / 'registry'}", "policy.kind=lora", "lora.r=4", "lora.alpha=8",
                             "lora.dropout=0", "rollout.actors=1", "learner.ranks=1", "rl.steps=3",
                             "rl.prompts_per_step=8", "rl.samples_per_prompt=4", "rl.lr=0.02", "eval.limit=20",
                             "train.eval_limit=20", "train.checkpoint_every=3", "train.eval_every=3"])
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        summary = train(cfg, progress=False)
    finally:
        ray.shutdown()
    z_dist, state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 3
    expert = read_expert(summary["expert"])
    assert expert.kind == "lora" and expert.card["lora"]["r"] == 4
    lora, tok = load_policy(cfg)
    local = train_local(cfg, HFEngine(cfg, policy=lora, tokenizer=tok), get_task("math"), progress=False)
    assert set(z_dist) == set(local.z)
    assert max(float(v.abs().max()) for n, v in local.z.items() if ".lora_B." in n) > 1e-3
    for n in local.z:
        assert torch.allclose(z_dist[n], local.z[n].float(), atol=1e-5), n
