"""Every shipped ``configs/*.yaml`` loads and is consistent, without downloading anything.

A config for a cluster says so in a comment line ``# cluster: N nodes x G GPUs, C CPUs each``;
the others describe one local machine (Ray starts with the CPUs the run needs, and no GPUs).
For the hub models of the paper recipes the SVF targets are taken from a ``meta`` model built
from the published architecture (no weights, no download): the count of z values must be the
paper's 0.39M for MLP targets, and the learner ranks must be able to shard the factors.
"""
import re
from pathlib import Path

import pytest
import torch

from t2dist.config import ConfigError, load_config
from t2dist.tasks import TASKS

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
CLUSTER = re.compile(r"^#\s*cluster:\s*(\d+)\s*nodes?\s*x\s*(\d+)\s*GPUs?,\s*(\d+)\s*CPUs", re.MULTILINE | re.IGNORECASE)


def _hub_arch(name: str):
    """The published architecture of the paper's models, as a transformers config (no download)."""
    from transformers import LlamaConfig, MistralConfig

    if name == "meta-llama/Meta-Llama-3-8B-Instruct":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256)
    if name == "mistralai/Mistral-7B-Instruct-v0.3":
        return MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32768)
    return None


def test_there_are_real_model_recipes():
    names = {p.stem for p in CONFIGS}
    for model in ("llama3-8b", "mistral-7b"):
        for task in ("gsm8k", "mbpp", "arc_easy"):
            assert f"{model}-{task}" in names
        assert f"{model}-gsm8k-2node" in names
    assert any(n.startswith("smollm2-") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid_and_resources_fit(path):
    cfg = load_config(path)  # types, unknown keys, registered task/estimator names
    assert cfg.task.name in TASKS
    rl, ro, lc, tr = cfg.rl, cfg.rollout, cfg.learner, cfg.train
    assert rl.prompts_per_step % lc.ranks == 0, "learner.ranks must divide rl.prompts_per_step"
    assert ro.actors <= rl.prompts_per_step
    gpus = ro.actors * ro.gpus_per_actor + lc.ranks * lc.gpus_per_rank + tr.evaluator_gpus
    cpus = ro.actors * ro.cpus_per_actor + lc.ranks * lc.cpus_per_rank + tr.evaluator_cpus
    m = CLUSTER.search(path.read_text())
    if m:
        nodes, gpus_per_node, cpus_per_node = map(int, m.groups())
        assert 0 < gpus <= nodes * gpus_per_node, f"asks {gpus} GPUs of {nodes}x{gpus_per_node}"
        assert cpus <= nodes * cpus_per_node
        assert max(ro.gpus_per_actor, lc.gpus_per_rank, tr.evaluator_gpus) <= gpus_per_node
        assert cfg.model.device.startswith("cuda") and cfg.model.dtype == "bfloat16" and lc.precision == "bf16"
        if nodes > 1:  # ranks of one NCCL group are packed; the rest spread over the nodes
            assert cfg.ray.placement == "separate"
            assert lc.ranks * lc.gpus_per_rank <= gpus_per_node or cfg.ray.placement != "colocated"
    else:
        assert gpus == 0 and cfg.model.device in ("cpu", "auto")


@pytest.mark.parametrize("path", [p for p in CONFIGS if CLUSTER.search(p.read_text())],
                         ids=lambda p: p.stem)
def test_paper_recipe_matches_the_paper_and_shards(path):
    from transformers import AutoModelForCausalLM

    from t2dist.svf.sharded import check_shardable
    from t2dist.svf.targets import select_targets

    cfg = load_config(path)
    assert (cfg.svf.targets, cfg.rl.lr, cfg.task.max_new_tokens, cfg.train.eval_every) == ("mlp", 0.002, 512, 10)
    assert cfg.rl.prompts_per_step * cfg.rl.samples_per_prompt == 256
    assert cfg.rl.beta in (0.0, 0.1, 0.2, 0.3)
    assert cfg.task.name in ("gsm8k", "mbpp", "arc_easy") and not TASKS[cfg.task.name].unseen
    arch = _hub_arch(cfg.model.path)
    assert arch is not None, f"unexpected model {cfg.model.path}"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
    names = select_targets(model, cfg.svf.targets)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    assert sum(min(s) for s in shapes.values()) == 393_216  # the paper's 0.39M SVF parameters (MLP)
    check_shardable(cfg, shapes)


def test_a_new_policy_kind_brings_its_own_section_without_touching_config_py():
    """Components own their settings: registering a kind whose class declares a ``Config`` adds its section
    (named after the kind) to the config; removing the kind removes the section (no state left behind)."""
    from pydantic import Field

    from t2dist.config import config_class, config_from_dict, dump_config
    from t2dist.config_section import Section
    from t2dist.policy.registry import register_policy, unregister_policy

    class ScaledConfig(Section):
        alpha: float = Field(1.0, gt=0.0, description="how much to scale")

    class Scaled:
        kind = "scaled"
        Config = ScaledConfig

    register_policy("scaled", Scaled)
    try:
        cfg = load_config(None, ["policy.kind=scaled", "scaled.alpha=2"])
        assert cfg.policy.kind == "scaled" and cfg.scaled.alpha == 2 and isinstance(cfg.scaled, ScaledConfig)
        assert load_config(None).scaled.alpha == 1.0  # the section's defaults
        assert config_from_dict(dump_config(cfg)).scaled.alpha == 2  # what actors and --resume read back
        with pytest.raises(ConfigError, match=r"scaled\.alpah: Extra inputs are not permitted"):
            load_config(None, ["policy.kind=scaled", "scaled.alpah=2"])
        with pytest.raises(ConfigError, match=r"scaled\.alpha: .*greater than 0"):
            load_config(None, ["scaled.alpha=0"])
        assert cfg.svf.targets == "mlp" and cfg.rollout.vllm.seed == 0  # the other sections are still there
    finally:
        unregister_policy("scaled")
    assert "scaled" not in config_class().model_fields
    with pytest.raises(ConfigError, match=r"scaled: Extra inputs are not permitted"):
        load_config(None, ["scaled.alpha=2"])
    with pytest.raises(ConfigError, match=r"policy\.kind: unknown policy kind 'scaled'"):
        load_config(None, ["policy.kind=scaled"])


def test_an_engine_registered_with_settings_gets_a_rollout_section():
    from pydantic import Field

    from t2dist.config_section import Section
    from t2dist.engines import register_engine, unregister_engine

    class FakeConfig(Section):
        slots: int = Field(4, ge=1)

    register_engine("fake", "t2dist.engines.hf:HFEngine", settings=FakeConfig)
    try:
        cfg = load_config(None, ["rollout.engine=fake", "rollout.fake.slots=8"])
        assert cfg.rollout.fake.slots == 8 and cfg.rollout.vllm.tensor_parallel_size == 1
        with pytest.raises(ConfigError, match=r"rollout\.fake\.slot: Extra inputs"):
            load_config(None, ["rollout.fake.slot=8"])
    finally:
        unregister_engine("fake")
    with pytest.raises(ConfigError, match=r"rollout\.fake: Extra inputs"):
        load_config(None, ["rollout.fake.slots=8"])


def test_registered_settings_may_not_replace_a_section_of_the_config():
    from t2dist.config import config_class
    from t2dist.config_section import Section
    from t2dist.policy.registry import register_policy, unregister_policy

    class Model:
        kind = "model"
        Config = Section

    register_policy("model", Model)
    try:
        with pytest.raises(ConfigError, match=r"\['model'\] would replace sections"):
            config_class()
    finally:
        unregister_policy("model")
    assert "svf" in config_class().model_fields


def test_torch_threads_default_to_the_cpus_a_process_holds():
    """A rank or actor given two CPUs and no thread count uses both (the default of 1 left Gemma's one learner
    rank on one of its two cores); an explicit count wins; a fraction of a CPU still gets one thread."""
    cfg = load_config(None, ["learner.cpus_per_rank=2", "rollout.cpus_per_actor=3"])
    assert (cfg.learner.threads_per_rank, cfg.rollout.threads_per_actor) == (2, 3)
    cfg = load_config(None, ["learner.cpus_per_rank=2", "learner.threads_per_rank=1", "rollout.cpus_per_actor=0.5"])
    assert (cfg.learner.threads_per_rank, cfg.rollout.threads_per_actor) == (1, 1)
    assert load_config("configs/gemma3-pyfunc.yaml").learner.threads_per_rank == 2
