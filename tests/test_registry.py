"""The expert registry on a local directory and on a real S3-compatible server (moto on loopback),
the evaluator's champion rule, the registry CLI and the merged Hugging Face export."""
import json
import multiprocessing as mp
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from t2dist.cli.main import main
from t2dist.experts.expert import ExpertError, check_compatible, make_card, save_expert
from t2dist.registry import ExpertRef, Registry, RegistryError, load_expert_ref, read_expert_ref


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def factor_cache(tmp_path_factory):
    """One factor cache for the module: every model built here uses the same U, S, V."""
    return tmp_path_factory.mktemp("factors")


@pytest.fixture(scope="module")
def svf(factor_cache):
    from t2dist.config import load_config
    from t2dist.policy.load import load_policy

    model, _tok = load_policy(load_config(None, [f"svf.cache_dir={factor_cache}"]))
    return model


def fake_card(name="math", fingerprint="f" * 16, **extra):
    """A card with every required field (for registry tests that need no model)."""
    return {"name": name, "task": "math", "parametrization": {"kind": "linear", "max_mult": 2.0, "rescale": False},
            "targets": ["a"], "rank": None, "base_fingerprint": fingerprint, "metrics": {"test_accuracy": 0.5},
            "config": {}, "code_version": "test", "created": "2026-11-28T00:00:00+00:00", **extra}


def z_of(value: float, n: int = 8) -> dict[str, torch.Tensor]:
    return {"a": torch.full((n,), float(value))}


# -- local registry ------------------------------------------------------------------------------
def test_publish_resolve_alias_delete(tmp_path):
    reg = Registry(tmp_path / "reg", create=True)
    assert reg.publish(z_of(1.0), fake_card()) == "math@1"
    assert reg.publish(z_of(2.0), fake_card()) == "math@2"
    assert reg.publish(z_of(3.0), fake_card(name="code")) == "code@1"
    assert reg.names() == ["code", "math"]
    assert reg.versions("math") == [1, 2]
    assert reg.resolve("math") == ("math", 2)  # bare name: the latest version
    assert torch.equal(reg.load("math@1").z["a"], z_of(1.0)["a"])
    reg.set_alias("math", "champion", 1)
    assert reg.resolve("math:champion") == ("math", 1)
    assert reg.load("math:champion").card["version"] == 1
    rows = reg.list("math")
    assert [(r["version"], r["aliases"]) for r in rows] == [(1, ["champion"]), (2, [])]

    with pytest.raises(RegistryError, match="aliased as champion"):
        reg.delete("math@1")
    assert reg.delete("math@2") == "math@2"
    assert reg.versions("math") == [1]
    assert reg.publish(z_of(4.0), fake_card()) == "math@3"  # a deleted number is never reused
    assert reg.delete("math@1", force=True) == "math@1"
    assert reg.aliases("math") == {}


def test_versions_are_immutable_and_publish_is_atomic(tmp_path):
    reg = Registry(tmp_path / "reg", create=True)
    reg.publish(z_of(1.0), fake_card())
    before = (tmp_path / "reg/experts/math/1/card.json").read_bytes()
    reg.publish(z_of(5.0), fake_card())
    assert (tmp_path / "reg/experts/math/1/card.json").read_bytes() == before
    # a claimed version whose card was never written (publisher died) is invisible
    (tmp_path / "reg/experts/math/3").mkdir()
    (tmp_path / "reg/experts/math/3/.claim").write_text("{}")
    (tmp_path / "reg/experts/math/3/z.safetensors").write_bytes(b"partial")
    assert reg.versions("math") == [1, 2]
    assert reg.resolve("math") == ("math", 2)
    assert reg.publish(z_of(6.0), fake_card()) == "math@4"


def _publish_many(url: str, worker: int, count: int) -> list[str]:
    reg = Registry(url, create=True)
    return [reg.publish(z_of(worker * 1000 + i), fake_card(publisher=[worker, i])) for i in range(count)]


def _check_concurrent(reg: Registry, refs: list[str], workers: int, count: int) -> None:
    assert len(refs) == len(set(refs)) == workers * count  # nobody got the same version
    assert reg.versions("math") == list(range(1, workers * count + 1))
    seen = set()
    for v in reg.versions("math"):
        expert = reg.load(f"math@{v}")  # sha256-verified
        worker, i = expert.card["publisher"]
        assert torch.equal(expert.z["a"], z_of(worker * 1000 + i)["a"])  # the card and z of one publish
        seen.add((worker, i))
    assert seen == {(w, i) for w in range(workers) for i in range(count)}
    assert all(r["ok"] for r in reg.verify())


def test_eight_concurrent_publishers_lose_nothing(tmp_path):
    url = str(tmp_path / "reg")
    ctx = mp.get_context("fork")
    with ctx.Pool(8) as pool:
        results = pool.starmap(_publish_many, [(url, w, 10) for w in range(8)])
    _check_concurrent(Registry(url), [r for rs in results for r in rs], 8, 10)


def test_tampered_or_truncated_z_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg", create=True)
    reg.publish(z_of(1.0), fake_card())
    reg.publish(z_of(2.0), fake_card())
    z1 = tmp_path / "reg/experts/math/1/z.safetensors"
    data = bytearray(z1.read_bytes())
    data[-1] ^= 0x01  # same size, one bit flipped
    z1.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="sha256"):
        reg.load("math@1")
    z2 = tmp_path / "reg/experts/math/2/z.safetensors"
    z2.write_bytes(z2.read_bytes()[:-7])
    with pytest.raises(RegistryError, match="truncated"):
        reg.load("math@2")
    assert [r["ok"] for r in reg.verify()] == [False, False]


def test_expert_for_another_base_is_refused(tmp_path, svf):
    reg = Registry(tmp_path / "reg", create=True)
    good = make_card(svf, name="math", task="math")
    reg.publish(svf.neutral_z(), good)
    reg.publish(svf.neutral_z(), {**good, "base_fingerprint": "0123456789abcdef"})
    assert load_expert_ref("math@1", svf, registry=reg).card["version"] == 1
    with pytest.raises(ExpertError, match="0123456789abcdef"):
        load_expert_ref("math@2", svf, registry=reg)


@pytest.mark.parametrize("ref,needle", [
    ("nosuch", "unknown expert 'nosuch'"),
    ("math@9", "no version 9"),
    ("math:gold", "no alias 'gold'"),
    ("math@x", "positive integer"),
    ("bad/name", "bad expert reference"),
])
def test_bad_references(tmp_path, ref, needle):
    reg = Registry(tmp_path / "reg", create=True)
    reg.publish(z_of(1.0), fake_card())
    with pytest.raises(RegistryError, match=needle):
        reg.load(ref)


def test_bad_registry_and_card_change_nothing(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        Registry(tmp_path / "missing")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RegistryError, match="cannot be written"):
        Registry(blocker / "reg", create=True)
    reg = Registry(tmp_path / "reg", create=True)
    reg.publish(z_of(1.0), fake_card())
    snapshot = sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*"))
    card = fake_card()
    del card["base_fingerprint"]
    with pytest.raises(RegistryError, match="missing fields: base_fingerprint"):
        reg.publish(z_of(2.0), card)
    with pytest.raises(RegistryError, match="bad alias"):
        reg.set_alias("math", "no/slash", 1)
    with pytest.raises(RegistryError, match="versions \\[1\\]"):
        reg.set_alias("math", "champion", 7)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*")) == snapshot


def test_ref_parsing():
    assert ExpertRef.parse("math") == ExpertRef("math")
    assert ExpertRef.parse("math@12") == ExpertRef("math", 12)
    assert ExpertRef.parse("cls-expert.v2:champion") == ExpertRef("cls-expert.v2", None, "champion")
    assert str(ExpertRef.parse("a@3")) == "a@3"


# -- S3 (moto server on loopback, real HTTP through s3fs) --------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import boto3

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # moto checks If-Match/If-None-Match and then writes, without a lock, in the server's request
    # threads; S3 makes a conditional PUT atomic.  Serialise PUTs so the fake keeps S3's contract.
    from moto.s3.responses import S3Response

    put, lock = S3Response.put_object, threading.Lock()

    def atomic_put(self, *a, **k):
        with lock:
            return put(self, *a, **k)

    S3Response.put_object = atomic_put
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="experts")
    yield endpoint
    server.stop()
    S3Response.put_object = put


def s3_options(endpoint: str) -> dict:
    return {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def _publish_many_s3(endpoint: str, worker: int, count: int) -> list[str]:
    reg = Registry("s3://experts/concurrent", s3_options(endpoint), create=True)
    return [reg.publish(z_of(worker * 1000 + i), fake_card(publisher=[worker, i])) for i in range(count)]


def test_s3_registry(s3_endpoint, tmp_path):
    opts = s3_options(s3_endpoint)
    with pytest.raises(RegistryError, match="does not exist"):
        Registry("s3://experts/empty-prefix", opts)
    with pytest.raises(RegistryError, match="cannot be written"):
        Registry("s3://no-such-bucket/reg", opts, create=True)
    reg = Registry("s3://experts/team", opts, create=True)
    assert reg.publish(z_of(1.0), fake_card()) == "math@1"
    assert reg.publish(z_of(2.0), fake_card()) == "math@2"
    reg.set_alias("math", "champion", 2)
    again = Registry("s3://experts/team", opts)  # another client sees the same registry
    assert again.resolve("math:champion") == ("math", 2)
    assert torch.equal(again.load("math:champion").z["a"], z_of(2.0)["a"])
    assert [r["version"] for r in again.list()] == [1, 2]
    # tamper with the object directly
    again.fs.pipe_file("experts/team/experts/math/1/z.safetensors", b"not the published bytes")
    with pytest.raises(RegistryError, match="truncated|sha256"):
        again.load("math@1")
    assert reg.delete("math@1") == "math@1"
    assert again.versions("math") == [2]


def test_s3_concurrent_publishers_use_conditional_puts(s3_endpoint):
    ctx = mp.get_context("spawn")  # fresh processes: no event loop inherited from the parent
    with ctx.Pool(4) as pool:
        results = pool.starmap(_publish_many_s3, [(s3_endpoint, w, 5) for w in range(4)])
    reg = Registry("s3://experts/concurrent", s3_options(s3_endpoint))
    _check_concurrent(reg, [r for rs in results for r in rs], 4, 5)


# -- the champion rule: compare-and-set under a race -----------------------------------------------
RACERS = 8


def _promote_racer(url: str, opts: dict | None, alias: str, score: float, barrier, delay: float) -> bool:
    """One run: publish a candidate with validation score ``score``, then promote it at the same moment
    as the others.  ``score_of`` reads a version's score from its card and takes ``delay`` (a re-scoring)."""
    from t2dist.registry.champion import promote_if_better

    reg = Registry(url, opts, create=True)
    ref = reg.publish(z_of(score), fake_card(metrics={"val": score}))
    version = int(ref.rsplit("@", 1)[1])

    def score_of(v: int) -> float:
        time.sleep(delay)  # the champion is re-scored: the window in which another run can move the alias
        return reg.card(f"math@{v}")["metrics"]["val"]

    barrier.wait()
    return promote_if_better(reg, "math", version, score, score_of, alias=alias).promoted


def _racer_main(*args) -> None:
    import os

    os._exit(0 if _promote_racer(*args) else 3)


def _race(url: str, opts: dict | None, ctx, rounds: int = 3) -> None:
    import random

    rng = random.Random(17)
    reg = Registry(url, opts, create=True)
    for r in range(rounds):
        alias = f"champ{r}"
        scores = [round(rng.uniform(0.1, 0.9), 4) for _ in range(RACERS)]
        assert len(set(scores)) == RACERS
        barrier = ctx.Barrier(RACERS)
        procs = [ctx.Process(target=_racer_main, args=(url, opts, alias, sc, barrier, 0.05)) for sc in scores]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode in (0, 3) for p in procs] == [True] * RACERS, [p.exitcode for p in procs]
        versions = {reg.card(f"math@{v}")["metrics"]["val"]: v for v in reg.versions("math")}
        champion = reg.aliases("math")[alias]
        assert champion == versions[max(scores)], (r, scores, champion)  # the best one, every time
        assert procs[scores.index(max(scores))].exitcode == 0  # ... and its run says it was promoted


def test_champion_race_local(tmp_path):
    _race(str(tmp_path / "reg"), None, mp.get_context("fork"))


def test_champion_race_s3(s3_endpoint):
    # spawn: fresh processes, no event loop inherited from the parent
    _race("s3://experts/race", s3_options(s3_endpoint), mp.get_context("spawn"), rounds=2)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_alias_compare_and_set(where, tmp_path, request):
    if where == "s3":
        reg = Registry("s3://experts/cas", s3_options(request.getfixturevalue("s3_endpoint")), create=True)
    else:
        reg = Registry(tmp_path / "reg", create=True)
    for i in range(3):
        reg.publish(z_of(i), fake_card())
    assert reg.read_alias("math", "champion") == (None, None)
    assert reg.set_alias_if("math", "champion", 1, None)
    assert not reg.set_alias_if("math", "champion", 2, None)  # exists already
    v, token = reg.read_alias("math", "champion")
    assert v == 1 and token
    reg.set_alias("math", "champion", 1)  # rewritten (same version): the token is stale now
    assert not reg.set_alias_if("math", "champion", 3, token)
    v, token = reg.read_alias("math", "champion")
    assert reg.set_alias_if("math", "champion", 3, token)
    assert not reg.set_alias_if("math", "champion", 2, token)  # token of the previous state
    assert reg.aliases("math") == {"champion": 3}
    with pytest.raises(RegistryError, match="versions"):
        reg.set_alias_if("math", "champion", 9, None)


def test_champion_rule_not_comparable_leaves_alias(tmp_path):
    from t2dist.registry.champion import NotComparable, promote_if_better

    reg = Registry(tmp_path / "reg", create=True)
    for i in range(2):
        reg.publish(z_of(i), fake_card())
    assert promote_if_better(reg, "math", 1, 0.5, lambda v: 0.0).promoted  # no champion yet

    def other_base(v):
        raise NotComparable("another base model")

    d = promote_if_better(reg, "math", 2, 0.9, other_base)
    assert not d.promoted and "not comparable" in d.reason and reg.aliases("math") == {"champion": 1}
    d = promote_if_better(reg, "math", 2, 0.5, lambda v: (0.5, {"n": 10}))
    assert not d.promoted and d.champion == 1 and d.details == {"n": 10}  # ties do not move it


# -- evaluator: the champion rule ---------------------------------------------------------------
def test_champion_moves_only_when_beaten_on_the_same_validation_set(tmp_path):
    from actors.evaluator import EvaluatorWorker
    from t2dist.config import load_config

    cfg = load_config(None, ["svf.cache_dir=null", "eval.batch_size=64"])
    ev = EvaluatorWorker(cfg, index=-1, threads=1)
    url = str(tmp_path / "reg")
    neutral = ev.policy.neutral_z()
    base_val = ev.evaluate(neutral, "validation", 60)["accuracy"]
    card = ev.card("math", {}, {})
    first = ev.publish(neutral, card, url=url, name="math", val_accuracy=base_val, val_limit=60)
    assert first["ref"] == "math@1" and first["promoted"]
    worse = ev.publish(neutral, card, url=url, name="math", val_accuracy=base_val - 0.05, val_limit=60)
    assert worse["ref"] == "math@2" and not worse["promoted"]
    assert worse["champion"]["val_accuracy"] == pytest.approx(base_val)  # re-scored on this validation set
    assert worse["champion"]["n"] == 60
    better = ev.publish(neutral, card, url=url, name="math", val_accuracy=base_val + 0.05, val_limit=60)
    assert better["promoted"]
    assert Registry(url).aliases("math") == {"champion": 3}


# -- CLI and export --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_expert(tmp_path_factory, svf):
    """A non-neutral expert of the toy base (random scales; enough to change greedy outputs)."""
    gen = torch.Generator().manual_seed(0)
    z = {k: 1.0 + 0.35 * torch.randn(v.shape, generator=gen) for k, v in svf.neutral_z().items()}
    path = tmp_path_factory.mktemp("expert") / "math-expert"
    save_expert(path, z, make_card(svf, name="math", task="math", base_model="toy", metrics={"test_accuracy": 0.9}))
    return path


def test_registry_cli(tmp_path, trained_expert, capsys):
    url = str(tmp_path / "reg")
    assert main(["registry", "publish", str(trained_expert), "--registry", url, "--alias", "champion"]) == 0
    assert main(["registry", "publish", str(trained_expert), "--registry", url, "--name", "math-b"]) == 0
    long = "math-with-a-name-longer-than-the-old-column"
    assert main(["registry", "publish", str(trained_expert), "--registry", url, "--name", long]) == 0
    assert main(["registry", "ls", "--registry", url]) == 0
    out = capsys.readouterr().out
    assert "math@1" in out and "champion" in out and "math-b@1" in out and "0.900" in out
    table = out.splitlines()
    head, *lines = table[next(i for i, line in enumerate(table) if line.startswith("expert")):]
    # columns line up under their heads, however long a name
    assert all(line.index("0.900") + len("0.900") == head.index("test acc") + len("test acc") for line in lines)
    assert main(["registry", "show", "math:champion", "--registry", url]) == 0
    assert json.loads(capsys.readouterr().out)["z_sha256"]
    assert main(["registry", "promote", "math-b@1", "--alias", "stable", "--registry", url]) == 0
    assert Registry(url).aliases("math-b") == {"stable": 1}
    assert main(["registry", "verify", "--registry", url]) == 0
    assert "3/3 versions verified" in capsys.readouterr().out
    z = Path(url) / "experts/math-b/1/z.safetensors"
    z.write_bytes(z.read_bytes()[:-4])
    assert main(["registry", "verify", "--registry", url]) == 1
    assert "BAD math-b@1" in capsys.readouterr().out
    assert main(["registry", "rm", "math-b@1", "--registry", url]) == 2  # aliased
    assert "aliased as stable" in capsys.readouterr().err
    assert main(["registry", "rm", "math-b@1", "--force", "--registry", url]) == 0
    assert main(["registry", "ls", "nosuch", "--registry", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_by_registry_reference_matches_the_directory(tmp_path, trained_expert):
    url = str(tmp_path / "reg")
    Registry(url, create=True).publish_dir(trained_expert)
    Registry(url).set_alias("math", "champion", 1)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--task", "math", "--split", "test", "--limit", "60", "svf.cache_dir=null"]
    assert main(["eval", "--expert", "math:champion", "--registry", url, "--json", str(a), *common]) == 0
    assert main(["eval", "--expert", str(trained_expert), "--json", str(b), *common]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["accuracy"] == rb["accuracy"] and ra["n"] == 60
    assert ra["expert_version"] == 1 and ra["ci_low"] <= ra["accuracy"] <= ra["ci_high"]
    assert main(["eval", "--expert", "math:gold", "--registry", url, *common]) == 2


def test_export_greedy_outputs_equal_the_adapted_model(tmp_path, svf, factor_cache, trained_expert):
    """The export writes exactly ``merge_``'s W' (same factors, same code): weights and logits are equal.

    Both sides read the module's factor cache, so W' = W + U diag(S(f(z) - 1)) Vᵀ is computed
    from identical U, S, V by the same function; the merged checkpoint is float32 like the model.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2dist.experts.expert import read_expert
    from t2dist.engines.generation import generate
    from t2dist.tasks import get_task

    url = str(tmp_path / "reg")
    Registry(url, create=True).publish_dir(trained_expert)
    out = tmp_path / "merged"
    cache = f"svf.cache_dir={factor_cache}"
    assert main(["export", "--expert", "math@1", "--registry", url, "--out", str(out), cache]) == 0
    assert main(["export", "--expert", "math@1", "--registry", url, "--out", str(out), cache]) == 2
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "t2dist_expert.json").read_text())["version"] == 1
    exported = load_file(str(out / "model.safetensors"))

    expert = read_expert(trained_expert)
    check_compatible(expert, svf)
    task = get_task("math")
    prompts = [task.format_prompt(e) for e in task.examples("test")[:48]]
    ids = tok(prompts[:4], return_tensors="pt", padding=True)
    svf.merge_(expert.z)
    try:
        for name in svf.targets:
            assert torch.equal(exported[f"{name}.weight"], svf.model.get_submodule(name).weight), name
        adapted_out = generate(svf.model, tok, prompts, max_new_tokens=12, temperature=0.0)
        with torch.no_grad():
            ref_logits = svf.model(**ids).logits
    finally:
        svf.unmerge_()
    merged_out = generate(merged, tok, prompts, max_new_tokens=12, temperature=0.0)
    base_out = generate(svf.model, tok, prompts, max_new_tokens=12, temperature=0.0)
    with torch.no_grad():
        got_logits = merged(**ids).logits
    assert torch.equal(got_logits, ref_logits)
    assert [c.text for c in merged_out] == [c.text for c in adapted_out]
    assert [c.text for c in merged_out] != [c.text for c in base_out]  # the expert really changes outputs


def test_export_of_a_lora_expert_is_a_plain_checkpoint(tmp_path):
    """LoRA experts go through the same export: W + alpha/r·BA baked in, no peft layers left."""
    from transformers import AutoModelForCausalLM

    from t2dist.config import load_config
    from t2dist.experts.export import export_merged
    from t2dist.policy.load import load_policy

    lora, tok = load_policy(load_config(None, ["policy.kind=lora", "lora.r=4", "lora.alpha=8"]))
    gen = torch.Generator().manual_seed(1)
    z = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in lora.init_z().items()}
    out = export_merged(lora, tok, z, make_card(lora, name="math-lora", task="math"), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids = tok(["Q: 12+30=\nA:", "Q: 7*6=\nA:"], return_tensors="pt", padding=True)
    lora.merge_(z)
    try:
        with torch.no_grad():
            want = lora.model(**ids).logits
    finally:
        lora.unmerge_()
    with torch.no_grad():
        got = merged(**ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(lora_base_dir()).eval()(**ids).logits,
                              atol=1e-3)


def lora_base_dir():
    from t2dist.models.loading import toy_base_dir

    return toy_base_dir()
