"""The DeepSpeed learner: real Ray actors, real DeepSpeed engines (CPU, gloo), a tiny random Llama.

Exactness is checked against a single-process loop that does what ``train_local``'s
inner step does (``rl_loss`` + ``backward`` + ``clip_grad_norm_`` + ``Adam.step``).
"""
from __future__ import annotations


import pytest
import torch

from learner.ds_config import make_ds_config
from learner.group import free_port, global_normalizer, split_batch
from t2dist.config import Config, config_from_dict
from t2dist.rl.losses import compute_advantages
from t2dist.rl.rollout import RolloutBatch
from tiny_models import save_char_llama

P, N = 4, 3  # prompts per step, samples per prompt


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A randomly initialised tiny Llama + a char-level tokenizer, saved as an HF directory."""
    return save_char_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def make_cfg(model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("factors")

    def make(ranks: int = 1, **learner) -> Config:
        return config_from_dict({
            "model": {"path": str(model_dir)},
            "svf": {"cache_dir": str(cache)},
            "rl": {"prompts_per_step": P, "samples_per_prompt": N, "lr": 1e-2, "beta": 0.1,
                   "clip_grad": 0.3, "loss_agg": "token_mean"},
            "learner": {"ranks": ranks, "threads_per_rank": 1, "zero_stage": 0, **learner},
        })

    return make


@pytest.fixture(scope="module")
def oracle_svf(make_cfg):
    """The single-process SVF model (also fills the factor cache before any worker starts)."""
    from t2dist.policy.load import load_policy

    return load_policy(make_cfg())


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def make_batch(seed: int, vocab: int = 100) -> RolloutBatch:
    """``P`` prompts × ``N`` random completions of random lengths, random ±1 rewards."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(P):
        prompt = torch.randint(4, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(N):
            n = int(torch.randint(1, 9, (1,), generator=g))
            prompts.append([1] + prompt)
            completions.append(torch.randint(4, vocab, (n,), generator=g).tolist())
    rewards = torch.randint(0, 2, (P, N), generator=g).float() * 2 - 1
    return RolloutBatch(prompts, completions, rewards, rewards > 0)


def start_workers(ray, cfg: Config, ranks: int):
    from learner.worker import LearnerWorker

    Actor = ray.remote(num_cpus=1)(LearnerWorker)
    port = free_port()
    workers = [Actor.remote(cfg.model_dump(), r, ranks, "127.0.0.1", port) for r in range(ranks)]
    infos = ray.get([w.ready.remote() for w in workers], timeout=300)
    assert [i["rank"] for i in infos] == list(range(ranks))
    return workers


def stop_workers(ray, workers):
    try:
        ray.get([w.shutdown.remote() for w in workers], timeout=60)
    finally:
        for w in workers:
            ray.kill(w)


def train_on(ray, workers, batch: RolloutBatch, cfg: Config) -> list[dict]:
    shards = split_batch(batch, len(workers), compute_advantages(batch.rewards, cfg.rl.advantage))
    norm = global_normalizer(batch, cfg.rl.loss_agg)
    return ray.get([w.train_step.remote(b, a, norm) for w, (b, a) in zip(workers, shards)], timeout=300)


def oracle_steps(svf, tok, cfg: Config, batches, z0: dict | None = None) -> tuple[dict, list[float], list[float]]:
    """What train_local's inner step computes, batch by batch: ``(z, grad_norms, losses)``."""
    from t2dist.rl.step import rl_loss
    from t2dist.policy.zparams import ZParams

    zp = ZParams(svf.init_z(cfg.svf.init) if z0 is None else z0)
    opt = torch.optim.Adam(zp.parameters(), lr=cfg.rl.lr)
    norms, losses = [], []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss, _ = rl_loss(svf, zp.as_dict(), batch, cfg.rl, pad_id=tok.pad_token_id)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(zp.parameters(), cfg.rl.clip_grad or float("inf"))))
        losses.append(float(loss.detach()))
        opt.step()
    return zp.detached(), norms, losses


def one_fresh_step(svf, tok, cfg: Config, z0: dict, batch) -> dict:
    from t2dist.rl.step import rl_loss
    from t2dist.policy.zparams import ZParams

    zp = ZParams(z0)
    opt = torch.optim.Adam(zp.parameters(), lr=cfg.rl.lr)
    loss, _ = rl_loss(svf, zp.as_dict(), batch, cfg.rl, pad_id=tok.pad_token_id)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(zp.parameters(), cfg.rl.clip_grad or float("inf"))
    opt.step()
    return zp.detached()


def oracle_grad(svf, tok, cfg: Config, batch) -> dict:
    from t2dist.rl.step import rl_loss
    from t2dist.policy.zparams import ZParams

    zp = ZParams(svf.init_z(cfg.svf.init))
    loss, _ = rl_loss(svf, zp.as_dict(), batch, cfg.rl, pad_id=tok.pad_token_id)
    loss.backward()
    return {n: p.grad.clone() for n, p in zip(zp.names, zp.params)}


def assert_z_close(a: dict, b: dict, atol: float):
    assert list(a) == list(b)
    for n in a:
        torch.testing.assert_close(a[n].float(), b[n].float(), atol=atol, rtol=0, msg=lambda m: f"{n}: {m}")


# -- pure helpers -----------------------------------------------------------------------
def test_make_ds_config_maps_the_learner_section():
    cfg = config_from_dict({"rl": {"clip_grad": 0.5},
                                 "learner": {"zero_stage": 2, "precision": "bf16", "grad_accum": 4}})
    gpu = make_ds_config(cfg, on_gpu=True)
    assert gpu["zero_optimization"]["stage"] == 2
    assert gpu["gradient_clipping"] == 0.5
    assert gpu["gradient_accumulation_steps"] == 4
    assert gpu["bf16"] == {"enabled": True} and "fp16" not in gpu
    with pytest.warns(UserWarning, match="learner.precision"):
        cpu = make_ds_config(cfg, on_gpu=False)
    assert "bf16" not in cpu and "fp16" not in cpu
    fp16 = make_ds_config(config_from_dict({"learner": {"precision": "fp16"}}), on_gpu=True)
    assert fp16["fp16"]["enabled"] is True and "bf16" not in fp16
    plain = make_ds_config(config_from_dict({"rl": {"clip_grad": None}}), on_gpu=False)
    assert plain["gradient_clipping"] == 0.0 and plain["zero_optimization"]["stage"] == 0
    assert "bf16" not in plain and "fp16" not in plain


def test_split_batch_by_prompt_groups():
    batch = make_batch(0)
    adv = compute_advantages(batch.rewards, "group_mean")
    shards = split_batch(batch, 2, adv)
    assert [s.num_prompts for s, _ in shards] == [P // 2] * 2
    assert RolloutBatch.concat([s for s, _ in shards]).completion_ids == batch.completion_ids
    torch.testing.assert_close(torch.cat([a for _, a in shards]), adv)
    assert global_normalizer(batch, "token_mean") == batch.num_tokens
    assert global_normalizer(batch, "seq_mean") == P * N
    with pytest.raises(ValueError, match=r"rl\.prompts_per_step.*learner\.ranks"):
        split_batch(batch, 3)


# -- real DeepSpeed engines in Ray actors ------------------------------------------------
def test_one_rank_matches_single_process_loop(ray_cluster, make_cfg, oracle_svf):
    cfg = make_cfg(ranks=1)
    batches = [make_batch(s) for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    z0 = {n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in oracle_svf[0].init_z(cfg.svf.init).items()}
    z_ref, norms_ref, losses_ref = oracle_steps(*oracle_svf, cfg, batches, z0=z0)
    assert max(norms_ref) > cfg.rl.clip_grad  # clipping is exercised
    workers = start_workers(ray_cluster, cfg, 1)
    try:
        ray_cluster.get(workers[0].set_z.remote(z0))
        assert_z_close(ray_cluster.get(workers[0].get_z.remote()), z0, atol=0)
        metrics = [train_on(ray_cluster, workers, b, cfg)[0] for b in batches]
        z = ray_cluster.get(workers[0].get_z.remote())
    finally:
        stop_workers(ray_cluster, workers)
    assert_z_close(z, z_ref, atol=1e-5)
    for m, gn, lo in zip(metrics, norms_ref, losses_ref):
        assert m["grad_norm"] == pytest.approx(gn, rel=1e-5)
        assert m["loss"] == pytest.approx(lo, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("stage", [0, 3])
def test_one_rank_follows_the_lr_schedule_across_a_resume(ray_cluster, make_cfg, oracle_svf, tmp_path, stage):
    """``rl.lr_schedule=linear``: each RL step's lr is Hugging Face's linear decay (the oracle:
    transformers' scheduler on a plain Adam), also after a checkpoint restores the step count, and
    under ZeRO-3, whose optimizer wraps the Adam whose lr is set."""
    from transformers import get_scheduler

    from t2dist.rl.step import rl_loss
    from t2dist.policy.zparams import ZParams

    cfg = make_cfg(ranks=1, zero_stage=stage)
    cfg = cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"lr_schedule": "linear", "steps": 4})})
    batches = [make_batch(s) for s in (11, 12, 13, 14)]
    svf, tok = oracle_svf
    zp = ZParams(svf.init_z(cfg.svf.init))
    opt = torch.optim.Adam(zp.parameters(), lr=cfg.rl.lr)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=cfg.rl.steps)
    lrs_ref = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        rl_loss(svf, zp.as_dict(), batch, cfg.rl, pad_id=tok.pad_token_id)[0].backward()
        torch.nn.utils.clip_grad_norm_(zp.parameters(), cfg.rl.clip_grad)
        lrs_ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    workers = start_workers(ray_cluster, cfg, 1)
    try:
        lrs = [train_on(ray_cluster, workers, b, cfg)[0]["lr"] for b in batches[:2]]
        ray_cluster.get(workers[0].save_checkpoint.remote(str(tmp_path / "ckpt"), "step2", {}))
    finally:
        stop_workers(ray_cluster, workers)
    workers = start_workers(ray_cluster, cfg, 1)  # a fresh process: the step count comes from the checkpoint
    try:
        ray_cluster.get(workers[0].load_checkpoint.remote(str(tmp_path / "ckpt"), "step2"))
        lrs += [train_on(ray_cluster, workers, b, cfg)[0]["lr"] for b in batches[2:]]
        z = ray_cluster.get(workers[0].get_z.remote())
    finally:
        stop_workers(ray_cluster, workers)
    assert lrs == pytest.approx(lrs_ref, rel=1e-12)
    assert_z_close(z, zp.detached(), atol=1e-5)
    z_const, _, _ = oracle_steps(svf, tok, make_cfg(ranks=1), batches)  # the same batches at a constant lr
    assert max(float((z_const[n] - z[n]).abs().max()) for n in z) > 1e-3  # the schedule really changed z


def test_two_ranks_match_one_rank(ray_cluster, make_cfg, oracle_svf):
    cfg = make_cfg(ranks=2, grad_accum=2)  # 2 micro-batches of 1 prompt group per rank
    batches = [make_batch(s) for s in (4, 5)]
    g_ref = oracle_grad(*oracle_svf, cfg, batches[0])
    z_ref, _, losses_ref = oracle_steps(*oracle_svf, cfg, batches)
    workers = start_workers(ray_cluster, cfg, 2)
    try:
        shards = split_batch(batches[0], 2, compute_advantages(batches[0].rewards, cfg.rl.advantage))
        norm = global_normalizer(batches[0], cfg.rl.loss_agg)
        grads = ray_cluster.get([w.grads_for.remote(b, a, norm) for w, (b, a) in zip(workers, shards)])
        metrics = [train_on(ray_cluster, workers, b, cfg) for b in batches]
        zs = ray_cluster.get([w.get_z.remote() for w in workers])
    finally:
        stop_workers(ray_cluster, workers)
    for g in grads:  # every rank holds the all-reduced gradient of the whole batch
        assert_z_close(g, g_ref, atol=1e-6)
    assert_z_close(zs[0], zs[1], atol=0)
    assert_z_close(zs[0], z_ref, atol=1e-5)
    for per_rank, lo in zip(metrics, losses_ref):
        assert per_rank[0]["loss"] == pytest.approx(lo, rel=1e-5, abs=1e-7)
        assert per_rank[0]["loss"] == per_rank[1]["loss"]


def test_checkpoint_round_trip_restores_z_and_optimizer(ray_cluster, make_cfg, oracle_svf, tmp_path):
    cfg = make_cfg(ranks=1)
    b1, b2, b3 = (make_batch(s) for s in (6, 7, 8))
    workers = start_workers(ray_cluster, cfg, 1)
    try:
        train_on(ray_cluster, workers, b1, cfg)
        train_on(ray_cluster, workers, b2, cfg)
        z_saved = ray_cluster.get(workers[0].get_z.remote())
        ray_cluster.get(workers[0].save_checkpoint.remote(str(tmp_path / "ckpt"), "step2", {"data_pos": 7}))
        train_on(ray_cluster, workers, b3, cfg)
        z_straight = ray_cluster.get(workers[0].get_z.remote())
    finally:
        stop_workers(ray_cluster, workers)
    workers = start_workers(ray_cluster, cfg, 1)  # a fresh process: nothing but the checkpoint
    try:
        state = ray_cluster.get(workers[0].load_checkpoint.remote(str(tmp_path / "ckpt"), "step2"))
        assert state["data_pos"] == 7
        assert_z_close(ray_cluster.get(workers[0].get_z.remote()), z_saved, atol=0)
        train_on(ray_cluster, workers, b3, cfg)
        z_resumed = ray_cluster.get(workers[0].get_z.remote())
    finally:
        stop_workers(ray_cluster, workers)
    assert_z_close(z_resumed, z_straight, atol=1e-7)
    # a fresh Adam from the restored z would step elsewhere: the moments really were restored
    z_fresh = one_fresh_step(*oracle_svf, cfg, z_saved, b3)
    assert max(float((z_fresh[n] - z_resumed[n]).abs().max()) for n in z_saved) > 1e-4


@pytest.mark.parametrize("stage", [1, 3])
def test_two_ranks_zero_stages_match_single_process(ray_cluster, make_cfg, oracle_svf, stage):
    """ZeRO 1 (optimizer state partitioned) and 3 (z partitioned too) over gloo, with set_z."""
    cfg = make_cfg(ranks=2, zero_stage=stage)
    batches = [make_batch(s) for s in (9, 10)]
    z0 = {n: v * 1.01 for n, v in oracle_svf[0].init_z(cfg.svf.init).items()}
    z_ref, norms_ref, _ = oracle_steps(*oracle_svf, cfg, batches, z0=z0)
    workers = start_workers(ray_cluster, cfg, 2)
    try:
        ray_cluster.get([w.set_z.remote(z0) for w in workers])
        metrics = [train_on(ray_cluster, workers, b, cfg) for b in batches]
        zs = ray_cluster.get([w.get_z.remote() for w in workers])
    finally:
        stop_workers(ray_cluster, workers)
    for z in zs:
        assert_z_close(z, z_ref, atol=1e-5)
    for per_rank, gn in zip(metrics, norms_ref):
        assert per_rank[0]["grad_norm"] == pytest.approx(gn, rel=1e-5)
