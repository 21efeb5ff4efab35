"""Sharded SVF factors (t2dist/svf/sharded.py, built per rank by learner/sharding.py): exactness
against the unsharded single process, per-rank memory and bytes read, and the errors for work that does not split or a damaged factor cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from learner.group import free_port, global_normalizer, split_batch
from t2dist.config import Config, ConfigError, config_from_dict
from t2dist.rl.losses import compute_advantages
from t2dist.rl.rollout import RolloutBatch
from t2dist.svf.factors import FACTORS_FILE, FactorCacheError, load_factor_slices, read_meta
from tiny_models import save_char_llama

P, N = 4, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A randomly initialised tiny Llama + a char-level tokenizer, saved as an HF directory."""
    return save_char_llama(tmp_path_factory.mktemp("tiny-llama-shard"), seed=1)


@pytest.fixture(scope="module")
def make_cfg(model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("factors")

    def make(ranks: int = 1, svf: dict | None = None, **learner) -> Config:
        return config_from_dict({
            "model": {"path": str(model_dir)},
            "svf": {"cache_dir": str(cache), "parametrization": "sigmoid", "rescale": True, **(svf or {})},
            "rl": {"prompts_per_step": P, "samples_per_prompt": N, "lr": 1e-2, "beta": 0.1, "clip_grad": 0.3,
                   "update_epochs": 2},
            "learner": {"ranks": ranks, "threads_per_rank": 1, "zero_stage": 0, **learner},
        })

    return make


@pytest.fixture(scope="module")
def oracle_svf(make_cfg):
    """The unsharded single-process SVF model (also writes the factor cache the ranks slice)."""
    from t2dist.policy.load import load_policy

    torch.set_num_threads(1)
    return load_policy(make_cfg())


def cache_of(cfg: Config) -> Path:
    """The one factor cache directory the module's model wrote."""
    (only,) = [p for p in Path(cfg.svf.cache_dir).iterdir() if (p / FACTORS_FILE).is_file()]
    return only


def make_batch(seed: int, vocab: int = 60) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(P):
        prompt = torch.randint(4, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(N):
            prompts.append([1] + prompt)
            completions.append(torch.randint(4, vocab, (int(torch.randint(1, 9, (1,), generator=g)),),
                                             generator=g).tolist())
    rewards = torch.randint(0, 2, (P, N), generator=g).float() * 2 - 1
    return RolloutBatch(prompts, completions, rewards, rewards > 0)


def oracle_ppo_steps(svf, tok, cfg: Config, batches):
    """What ``train_local`` does per batch with ``rl.update_epochs`` PPO-clipped updates, unsharded."""
    from t2dist.rl.step import behaviour_logprobs, rl_loss
    from t2dist.policy.zparams import ZParams

    zp = ZParams(svf.init_z(cfg.svf.init))
    opt = torch.optim.Adam(zp.parameters(), lr=cfg.rl.lr)
    for batch in batches:
        old = behaviour_logprobs(svf, zp.as_dict(), batch, pad_id=tok.pad_token_id)
        for _ in range(cfg.rl.update_epochs):
            opt.zero_grad(set_to_none=True)
            loss, _ = rl_loss(svf, zp.as_dict(), batch, cfg.rl, pad_id=tok.pad_token_id, old_logp=old)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(zp.parameters(), cfg.rl.clip_grad)
            opt.step()
    return zp.detached()


# -- in one process: the low-rank layer against the materialised W' ------------------------------
def test_sharded_forward_and_gradient_equal_the_merged_model(make_cfg, oracle_svf):
    """R=1 (no collectives): logits and dz of the never-materialised low-rank path equal SVFModel's."""
    from learner.sharding import build_sharded_svf

    cfg = make_cfg(shard_factors=True)
    svf, tok = oracle_svf
    sharded, _ = build_sharded_svf(cfg, rank=0, world=1, backend="gloo", device="cpu", on_gpu=False)
    g = torch.Generator().manual_seed(3)
    z = {n: (v + 0.3 * torch.randn(v.shape, generator=g)).requires_grad_(True) for n, v in svf.init_z().items()}
    z2 = {n: v.detach().clone().requires_grad_(True) for n, v in z.items()}
    ids = torch.randint(4, 60, (3, 7), generator=g)
    ref = svf(z, input_ids=ids).logits
    out = sharded(z2, input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (ref.square().mean()).backward()
    (out.square().mean()).backward()
    for n in z:
        torch.testing.assert_close(z2[n].grad, z[n].grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(sharded(sharded.neutral_z(), input_ids=ids).logits,
                               svf.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# -- real DeepSpeed ranks on CPU (gloo) in Ray actors ---------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def test_two_sharded_ranks_match_one_unsharded_process(ray_cluster, make_cfg, oracle_svf, tmp_path):
    """R=2 with sharded factors (PPO epochs, grad accumulation): z after 3 batches equals the unsharded oracle;
    each rank holds and read half the factors and half the target weights; a checkpoint round-trips."""
    from learner.worker import LearnerWorker

    ray = ray_cluster
    cfg = make_cfg(ranks=2, grad_accum=2, shard_factors=True)
    batches = [make_batch(s) for s in (11, 12, 13)]
    z_ref = oracle_ppo_steps(*oracle_svf, cfg, batches)

    Actor = ray.remote(num_cpus=1)(LearnerWorker)
    workers = [Actor.remote(cfg.model_dump(), r, 2) for r in range(2)]  # deferred rendezvous, as the driver does
    try:
        addr, port = ray.get(workers[0].endpoint.remote("127.0.0.1"))
        infos = ray.get([w.connect.remote(addr, port) for w in workers], timeout=300)
        for b in batches:
            shards = split_batch(b, 2, compute_advantages(b.rewards, cfg.rl.advantage))
            norm = global_normalizer(b, cfg.rl.loss_agg)
            ray.get([w.train_step.remote(s, a, norm) for w, (s, a) in zip(workers, shards)], timeout=300)
        zs = ray.get([w.get_z.remote() for w in workers])
        ray.get([w.save_checkpoint.remote(str(tmp_path / "ck"), "t", {"k": 1}) for w in workers])
        ray.get([w.shutdown.remote() for w in workers], timeout=60)
    finally:
        for w in workers:
            ray.kill(w)
    assert all(i["sharded"] for i in infos)
    moved = max(float((z_ref[n] - oracle_svf[0].init_z()[n]).abs().max()) for n in z_ref)
    assert moved > 1e-3
    for z in zs:
        for n in z_ref:
            torch.testing.assert_close(z[n], z_ref[n].float(), atol=1e-5, rtol=0, msg=lambda m: f"{n}: {m}")

    # memory and bytes read, against sizes taken independently from the factor cache and the model file
    cache = cache_of(cfg)
    total = sum(t.numel() * t.element_size() for t in load_file(str(cache / FACTORS_FILE)).values())
    weights = load_file(str(Path(cfg.model.path) / "model.safetensors"))
    target_total = sum(weights[f"{n}.weight"].numel() * 4 for n in oracle_svf[0].targets)
    for info in infos:
        mem = info["memory"]
        assert mem["factor_bytes"] <= 1.1 * total / 2, (mem, total)
        assert mem["factor_bytes_read"] <= 1.1 * total / 2, (mem, total)
        assert mem["target_weight_bytes"] == target_total // 2


def test_sharded_rank_restores_from_checkpoint_of_unsharded(ray_cluster, make_cfg, tmp_path):
    """A checkpoint holds only z and Adam: an R=1 run can resume with sharded factors (shard_factors=true) and back."""
    from learner.worker import LearnerWorker

    ray = ray_cluster
    Actor = ray.remote(num_cpus=1)(LearnerWorker)
    b1, b2 = make_batch(21), make_batch(22)
    zs = {}
    for shard in (False, True):
        cfg = make_cfg(ranks=1, shard_factors=shard, svf={"parametrization": "linear", "rescale": False})
        w = Actor.remote(cfg.model_dump(), 0, 1, "127.0.0.1", free_port())
        try:
            if not shard:
                ray.get(w.train_step.remote(b1, compute_advantages(b1.rewards, "group_mean"), float(b1.num_tokens)))
                ray.get(w.save_checkpoint.remote(str(tmp_path / "ck"), "s1", {}))
            else:
                ray.get(w.load_checkpoint.remote(str(tmp_path / "ck"), "s1"))
            ray.get(w.train_step.remote(b2, compute_advantages(b2.rewards, "group_mean"), float(b2.num_tokens)))
            zs[shard] = ray.get(w.get_z.remote())
            ray.get(w.shutdown.remote())
        finally:
            ray.kill(w)
    for n in zs[False]:
        torch.testing.assert_close(zs[True][n], zs[False][n], atol=1e-6, rtol=0)


# -- bad input -----------------------------------------------------------------------------------
def test_ranks_not_dividing_the_work_is_an_error_naming_the_keys(make_cfg):
    from t2dist.svf.sharded import check_shardable, target_shapes_from_config

    cfg = make_cfg(ranks=3, shard_factors=True)
    shapes = target_shapes_from_config(cfg)  # from the config alone (meta device)
    assert shapes["model.layers.0.mlp.down_proj"] == (32, 64)
    with pytest.raises(ConfigError) as err:
        check_shardable(cfg, shapes)
    for key in ("learner.ranks=3", "svf.rank", "learner.shard_factors"):
        assert key in str(err.value)
    check_shardable(make_cfg(ranks=2, shard_factors=True), shapes)  # 32 and 64 split in two
    with pytest.raises(ConfigError, match="svf.rank"):
        check_shardable(make_cfg(ranks=2, shard_factors=True, svf={"rank": 5}), shapes)
    check_shardable(make_cfg(ranks=3, shard_factors=False), shapes)  # unsharded: nothing to split


def test_preflight_rejects_unshardable_config_before_ray(make_cfg, monkeypatch, tmp_path):
    import t2dist.orchestration.train as driver

    monkeypatch.setattr(driver, "connect_ray", lambda cfg: (_ for _ in ()).throw(AssertionError("Ray contacted")))
    cfg = make_cfg(ranks=2, shard_factors=True, svf={"rank": 7}).model_copy(update={"run_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"learner\.ranks=2 does not divide"):
        driver.train(cfg, progress=False)


def test_damaged_factor_cache_names_file_and_tensor(oracle_svf, make_cfg, tmp_path):
    svf = oracle_svf[0]
    cache = cache_of(make_cfg())
    meta = read_meta(cache)
    kw = dict(model_fingerprint=meta["fingerprint"], targets=meta["targets"], rank=meta["rank"])
    target = svf.targets[1]
    comps = {n: (0, 16) for n in svf.targets}
    slices, nbytes = load_factor_slices(cache, comps, **kw)
    full = load_file(str(cache / FACTORS_FILE))
    torch.testing.assert_close(slices[target].U, full[f"{target}.U"][:, :16])
    torch.testing.assert_close(slices[target].V, full[f"{target}.V"][:, :16])
    with safe_open(str(cache / FACTORS_FILE), "pt") as f:
        assert nbytes < sum(f.get_tensor(k).numel() * 4 for k in f.keys())

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps(meta))
    save_file({k: v for k, v in full.items() if k != f"{target}.V"}, str(broken / FACTORS_FILE))
    with pytest.raises(FactorCacheError) as err:
        load_factor_slices(broken, comps, **kw)
    assert str(broken / FACTORS_FILE) in str(err.value) and f"{target}.V" in str(err.value)
    (broken / FACTORS_FILE).unlink()
    with pytest.raises(FactorCacheError, match="missing its tensor file"):
        load_factor_slices(broken, comps, **kw)
