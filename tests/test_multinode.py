"""scripts/ray-head.sh + scripts/ray-worker.sh on loopback: a two-node Ray cluster on this machine, a training
job submitted with `ray job submit`, and a worker that cannot reach its head failing fast and clearly.

The nodes share one Ray session directory (Ray allows --temp-dir on the head only) and differ in every port.
Each node runs `ray start --block` in its own process group, which the test stops itself (never `ray stop`,
which would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "t2dist-loopback-test-" + "0123456789abcdef" * 2


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_ports() -> list[str]:
    """Distinct fixed ports for the per-node services, so two nodes on one machine never collide."""
    nm, om, agent, agent_grpc, rt_env, metrics = free_ports(6)
    return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
            f"--metrics-export-port={metrics}"]


def base_env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "NODE_IP": "127.0.0.1", "RAY_AUTH_TOKEN": TOKEN, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # clients (probes, `ray job submit`) need the token and the mode, as docs/cluster.md says
    return env


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop one node: SIGTERM to its process group (ray start --block and everything it spawned), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # daemons of the group exit after the ray start process
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def alive_nodes(gcs: str, env: dict, want: int, timeout: float) -> list[dict]:
    code = ("import json, sys, time, ray\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "deadline = time.time() + float(sys.argv[3])\n"
            "while True:\n"
            "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
            "    if len(nodes) >= int(sys.argv[2]) or time.time() > deadline: break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in nodes]))\n")
    out = subprocess.run([sys.executable, "-c", code, gcs, str(want), str(timeout)], env=env, capture_output=True,
                         text=True, timeout=timeout + 60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def actor_nodes(gcs: str, env: dict) -> dict[str, set[str]]:
    """``{actor class: {node ids}}`` from Ray's state API (dead actors are listed too)."""
    code = ("import json, sys, ray\n"
            "from ray.util.state import list_actors\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "print(json.dumps([[a.class_name, a.node_id] for a in list_actors(address=sys.argv[1], limit=1000, raise_on_missing_output=False)]))\n")
    out = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    found: dict[str, set[str]] = {}
    for cls, node in json.loads(out.stdout.strip().splitlines()[-1]):
        found.setdefault(cls, set()).add(node)
    return found


def test_worker_that_cannot_reach_the_head_fails_fast_and_says_why():
    (closed,) = free_ports(1)
    env = {**base_env(), "RAY_CONNECT_TIMEOUT": "2"}
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(ROOT / "scripts" / "ray-worker.sh"), f"127.0.0.1:{closed}"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"cannot reach the Ray head at 127.0.0.1:{closed}" in out.stderr
    assert time.monotonic() - t0 < 20
    usage = subprocess.run(["bash", str(ROOT / "scripts" / "ray-worker.sh")], env=env, capture_output=True, text=True)
    assert usage.returncode == 64 and "HEAD_IP:RAY_PORT" in usage.stderr


@pytest.mark.slow
def test_two_node_cluster_from_the_scripts_runs_a_submitted_job(tmp_path):
    env = base_env()
    gcs_port, dash, client = free_ports(3)
    gcs = f"127.0.0.1:{gcs_port}"
    ray_tmp = tempfile.mkdtemp(prefix="t2mn", dir="/tmp")  # socket paths must stay under 108 bytes
    head_env = {**env, "RAY_PORT": str(gcs_port), "DASHBOARD_PORT": str(dash), "DASHBOARD_HOST": "127.0.0.1",
                "CLIENT_PORT": str(client), "NUM_CPUS": "3", "RAY_TEMP_DIR": ray_tmp}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "worker")}
    procs = []
    try:
        procs.append(subprocess.Popen(["bash", str(ROOT / "scripts" / "ray-head.sh"), "--block", *node_ports()],
                                      env=head_env, stdout=logs["head"], stderr=subprocess.STDOUT,
                                      start_new_session=True))
        alive_nodes(gcs, env, 1, 120)
        worker_env = {**env, "NUM_CPUS": "3", "RESOURCES": json.dumps({"loopback_node2": 1})}
        procs.append(subprocess.Popen(["bash", str(ROOT / "scripts" / "ray-worker.sh"), gcs, "--block", *node_ports()],
                                      env=worker_env, stdout=logs["worker"], stderr=subprocess.STDOUT,
                                      start_new_session=True))
        nodes = alive_nodes(gcs, env, 2, 120)
        assert len(nodes) == 2, nodes
        assert any("loopback_node2" in n["resources"] for n in nodes)

        run_dir = tmp_path / "run"
        # docs/cluster.md's line, with a tiny run: 2 sharded learner ranks packed together, actors spread over both nodes
        job = subprocess.run(
            ["ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
             "t2dist", "train", "--config", "configs/demo.yaml", "rl.steps=2", "rl.prompts_per_step=4",
             "rl.samples_per_prompt=4", "eval.limit=20", "train.eval_limit=20", "train.eval_every=2",
             "ray.placement=separate", "learner.shard_factors=true", f"run_dir={run_dir}",
             f"svf.cache_dir={tmp_path / 'factors'}", f"registry.url={tmp_path / 'registry'}", "--quiet"],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert "succeeded" in out
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 2 and 0.0 <= summary["final_accuracy"] <= 1.0
        placed = actor_nodes(gcs, env)
        used = set().union(*(placed.get(c, set()) for c in ("RolloutWorker", "LearnerWorker", "EvaluatorWorker")))
        assert used == {n["id"] for n in nodes}, placed  # the job really ran on both nodes
    finally:
        for proc in reversed(procs):
            stop(proc)
        for f in logs.values():
            f.close()


def test_placement_bundles_and_an_unplaceable_request():
    """One bundle per actor; a reservation the cluster cannot hold fails after ray.placement_timeout_s, naming keys."""
    import ray

    from actors.placement import make_placement, plan_bundles
    from t2dist.config import load_config
    from t2dist.errors import TrainingError

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["learner.gpus_per_rank=0.5", "rollout.cpus_per_actor=0"])
    plan = plan_bundles(cfg)
    assert plan["learner"] == [{"CPU": 1.0, "GPU": 0.5}] * 2
    assert plan["rollout"] == [{"CPU": 0.001}] * 2 and plan["evaluator"] == [{"CPU": 1.0}]
    assert make_placement(cfg).options("learner", 0) == {}  # ray.placement: none
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ok = make_placement(load_config(ROOT / "configs" / "demo.yaml", ["ray.placement=colocated",
                                                                           "rollout.cpus_per_actor=0"]))
        assert "scheduling_strategy" in ok.options("rollout", 1)
        ok.remove()
        bad = load_config(ROOT / "configs" / "demo.yaml", ["ray.placement=separate", "ray.placement_timeout_s=2",
                                                           "learner.cpus_per_rank=4"])
        with pytest.raises(TrainingError, match=r"ray\.placement='separate'.*ray\.placement_timeout_s=2"):
            make_placement(bad)
    finally:
        ray.shutdown()
