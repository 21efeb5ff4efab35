"""SVF experts exported as PEFT LoRA adapters (t2dist/experts/lora.py) load in peft with the right numbers.

On the toy base (MLP matrices 384 × 128: full rank 128, one of vLLM's max_lora_rank values):

* at full rank, ``peft.PeftModel.from_pretrained(base, DIR)`` gives the merged export's logits to
  float32 round-off (x·Wᵀ + (x·Aᵀ)·Bᵀ against x·(W + BA)ᵀ);
* at a truncated rank it gives ``W + B_K A_K`` with ``B_K A_K`` computed independently (the top K
  triplets of ``torch.linalg.svd`` of the dense ΔW, not the exporter's sort of δ), and the reported
  error equals ``‖ΔW − BA‖_F / ‖ΔW‖_F`` computed from the written tensors;
* partial target sets (some layers, irregular regexes), LoRA-kind experts and mixtures;
* bad input fails in one line before any model loads.

vLLM's answers are compared in tests/test_lora_export_vllm.py (slow).
"""
from __future__ import annotations

import json

import pytest
import torch

from t2dist.cli.main import main
from t2dist.config import load_config
from t2dist.experts.expert import make_card, read_expert, save_expert
from t2dist.experts.lora import LoRAExportError, export_lora, read_adapter
from t2dist.models.loading import load_model
from t2dist.policy.load import load_policy

PROBE = ["Q: 12+30=\nA:", "Q: 7*6=\nA:", "Q: 99-45=\nA:", "Q: 3+4*2=\nA:"]
ATOL = 1e-4  # float32 round-off on the toy's logits (|logit| < 30): measured ~1e-5


@pytest.fixture(scope="module")
def factor_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("factors")


@pytest.fixture(scope="module")
def toy_svf(factor_cache):
    return load_policy(load_config(None, [f"svf.cache_dir={factor_cache}"]))


def spread_z(policy, spread: float = 0.35, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + spread * torch.randn(v.shape, generator=g) for k, v in policy.neutral_z().items()}


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory, toy_svf):
    svf, _ = toy_svf
    path = tmp_path_factory.mktemp("expert") / "math"
    save_expert(path, spread_z(svf), make_card(svf, name="math", task="math", base_model="toy"))
    return path


def logits(model, tok, prompts=PROBE) -> torch.Tensor:
    ids = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def peft_model(adapter_dir):
    from peft import PeftModel

    base, _ = load_model("toy")
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_full_rank_adapter_in_peft_gives_the_merged_exports_logits(tmp_path, expert_dir, factor_cache, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = f"svf.cache_dir={factor_cache}"
    assert main(["export", "--expert", str(expert_dir), "--out", str(tmp_path / "merged"), cache]) == 0
    assert main(["export", "--expert", str(expert_dir), "--format", "lora", "--out", str(tmp_path / "lora"),
                 cache]) == 0
    printed = capsys.readouterr().out
    assert "K=128" in printed and "exact" in printed and "max_lora_rank=128" in printed
    config, tensors = read_adapter(tmp_path / "lora")
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"], config["bias"],
            config["task_type"]) == ("LORA", 128, 128, False, "none", "CAUSAL_LM")
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert config["layers_to_transform"] is None
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_"
    assert tensors[key + "A.weight"].shape == (128, 384) and tensors[key + "B.weight"].shape == (128, 128)
    assert len(tensors) == 2 * 12  # 4 layers × gate/up/down
    card = json.loads((tmp_path / "lora" / "t2dist_expert.json").read_text())
    assert card["name"] == "math" and card["lora_export"]["rank"] == 128 and card["lora_export"]["exact"]
    assert card["lora_export"]["overall_error"] == 0.0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "lora")  # the tokenizer travels with the adapter
    want, got = logits(merged, tok), logits(peft_model(tmp_path / "lora"), tok)
    base = logits(load_model("toy")[0], tok)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert float((want - base).abs().max()) > 1000 * ATOL  # the expert really moves the logits


def dense_truncation(policy, z, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{target: (ΔW, best rank-k ΔW)}`` in float64 from ``torch.linalg.svd`` of the dense ΔW."""
    out = {}
    for name in policy.targets:
        dw = policy.delta(name, z).double()
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        out[name] = (dw, (U[:, :k] * S[:k]) @ Vh[:k])
    return out


def test_truncated_adapter_is_w_plus_bk_ak_and_reports_its_error(tmp_path, toy_svf, expert_dir):
    import copy

    svf, tok = toy_svf
    expert = read_expert(expert_dir)
    k = 16
    out, report = export_lora(svf, tok, expert.z, expert.card, tmp_path / "r16", rank=k)
    assert report.rank == k and not report.exact
    config, tensors = read_adapter(out)
    assert config["r"] == config["lora_alpha"] == k
    truth = dense_truncation(svf, expert.z, k)

    # the model with W + B_K A_K (independent SVD) written into it, against peft's
    model = copy.deepcopy(svf.model)
    with torch.no_grad():
        for name, (_, best) in truth.items():
            w = model.get_submodule(name).weight
            w += best.to(w.dtype)
    torch.testing.assert_close(logits(peft_model(out), tok), logits(model, tok), rtol=0, atol=ATOL)

    # the reported errors, against ‖ΔW − BA‖ / ‖ΔW‖ from the written tensors
    dropped = total = 0.0
    for name, (dw, best) in truth.items():
        prefix = f"base_model.model.{name}.lora_"
        ba = tensors[prefix + "B.weight"].double() @ tensors[prefix + "A.weight"].double()
        err2 = float(((dw - ba) ** 2).sum())
        assert report.errors[name] == pytest.approx((err2 / float((dw ** 2).sum())) ** 0.5, rel=1e-4), name
        torch.testing.assert_close(ba, best, rtol=0, atol=1e-5)
        dropped, total = dropped + err2, total + float((dw ** 2).sum())
    assert report.overall_error == pytest.approx((dropped / total) ** 0.5, rel=1e-4)
    assert 0.1 < report.overall_error < 1 and report.worst_error >= report.overall_error
    assert any("not one of vLLM" in n for n in report.notes) is False  # 16 is an allowed max_lora_rank


def test_rank_notes_and_padding(tmp_path, toy_svf, expert_dir):
    """K = 100 (not a vLLM rank) warns; a neutral target and a target with 40 changed values are zero-padded."""
    svf, tok = toy_svf
    expert = read_expert(expert_dir)
    z = dict(expert.z)
    first, second = svf.targets[:2]
    z[first] = svf.neutral_z()[first].clone()
    z[second] = svf.neutral_z()[second].clone()
    z[second][:40] = 1.5
    out, report = export_lora(svf, tok, z, expert.card, tmp_path / "r100", rank=100)
    assert any("max_lora_rank=128" in n for n in report.notes) and report.vllm_max_lora_rank == 128
    assert report.errors[first] == 0.0 and report.errors[second] == 0.0 and report.nonzero[second] == 40
    _, tensors = read_adapter(out)
    for name, nonzero in ((first, 0), (second, 40)):
        A, B = (tensors[f"base_model.model.{name}.lora_{p}.weight"] for p in "AB")
        assert A.shape[0] == B.shape[1] == 100
        assert int((A.abs().sum(1) > 0).sum()) == nonzero and int((B.abs().sum(0) > 0).sum()) == nonzero
    _, big = export_lora(svf, tok, expert.z, expert.card, tmp_path / "r999", rank=999)
    assert big.rank == 128 and big.exact and any("exceeds the expert's full rank 128" in n for n in big.notes)


@pytest.mark.parametrize("spec, layers, zeros", [
    (r"layers\.[23]\.mlp\.(gate|down)_proj$", [2, 3], 0),  # some layers: layers_to_transform
    (r"layers\.1\.mlp\.down_proj$|layers\.2\.mlp\.up_proj$", [1, 2], 2),  # irregular: 2 zero adapters
])
def test_partial_target_sets_load_exactly_in_peft(tmp_path, factor_cache, spec, layers, zeros):
    svf, tok = load_policy(load_config(None, [f"svf.cache_dir={factor_cache}", f"svf.targets={spec}"]))
    z = spread_z(svf, seed=3)
    out, report = export_lora(svf, tok, z, make_card(svf, name="p", task="math", base_model="toy"), tmp_path / "a")
    config, tensors = read_adapter(out)
    assert config["layers_to_transform"] == layers and len(report.zero_modules) == zeros
    assert len(tensors) == 2 * (len(svf.targets) + zeros)
    adapted = peft_model(out)
    wrapped = [n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if hasattr(m, "lora_A")
               and not n.endswith(("lora_A", "lora_B"))]
    assert sorted(wrapped) == sorted(svf.targets + report.zero_modules)
    svf.merge_(z)
    try:
        want = logits(svf.model, tok)
    finally:
        svf.unmerge_()
    torch.testing.assert_close(logits(adapted, tok), want, rtol=0, atol=ATOL)


def test_a_lora_expert_exports_its_own_adapter(tmp_path):
    lora, tok = load_policy(load_config(None, ["policy.kind=lora", "lora.r=4", "lora.alpha=8"]))
    g = torch.Generator().manual_seed(1)
    z = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in lora.init_z().items()}
    card = make_card(lora, name="math-lora", task="math", base_model="toy")
    with pytest.raises(LoRAExportError, match="own rank r=4"):
        export_lora(lora, tok, z, card, tmp_path / "r8", rank=8)
    out, report = export_lora(lora, tok, z, card, tmp_path / "a")
    config, tensors = read_adapter(out)
    assert (config["r"], config["lora_alpha"], report.exact) == (4, 8, True)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    for t in lora.targets:
        for part in ("lora_A", "lora_B"):
            assert torch.equal(tensors[f"base_model.model.{t}.{part}.weight"], z[f"{t}.{part}.default.weight"])
    lora.merge_(z)
    try:
        want = logits(lora.model, tok)
    finally:
        lora.unmerge_()
    torch.testing.assert_close(logits(peft_model(out), tok), want, rtol=0, atol=ATOL)


def test_a_published_mixture_exports_its_mixed_z(tmp_path, toy_svf, factor_cache):
    from t2dist.registry import Registry
    from t2dist.svf.model import mix_z

    svf, _ = toy_svf
    zs = [spread_z(svf, seed=s) for s in (4, 5)]
    mixed = mix_z(zs, [0.6, 0.5])
    card = make_card(svf, name="mix-math", task="math", base_model="toy",
                     mixture={"experts": ["a@1", "b@1"], "alpha": [0.6, 0.5]})
    url = str(tmp_path / "reg")
    ref = Registry(url, create=True).publish(mixed, card)
    assert main(["export", "--expert", ref, "--registry", url, "--format", "lora", "--rank", "32",
                 "--out", str(tmp_path / "a"), f"svf.cache_dir={factor_cache}"]) == 0
    _, tensors = read_adapter(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "t2dist_expert.json").read_text())
    assert saved["mixture"]["alpha"] == [0.6, 0.5] and saved["lora_export"]["rank"] == 32
    for name, (_, best) in dense_truncation(svf, mixed, 32).items():
        ba = tensors[f"base_model.model.{name}.lora_B.weight"].double() @ \
            tensors[f"base_model.model.{name}.lora_A.weight"].double()
        torch.testing.assert_close(ba, best, rtol=0, atol=1e-5)


def test_bad_input_fails_in_one_line_before_a_model_loads(tmp_path, expert_dir, monkeypatch, capsys):
    import t2dist.policy.load as policy_load

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(policy_load, "load_from_config", no_model)
    lora = ["export", "--expert", str(expert_dir), "--format", "lora"]
    for argv, message in [
        ([*lora, "--rank", "0", "--out", str(tmp_path / "a")], "--rank must be a positive integer"),
        (["export", "--expert", str(expert_dir), "--rank", "8", "--out", str(tmp_path / "a")], "--rank is for --format lora"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main([*lora, "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: an unknown format
        main(["export", "--expert", str(expert_dir), "--format", "onnx", "--out", str(tmp_path / "a")])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err

    other = read_expert(expert_dir)
    other.card["targets"] = [*other.card["targets"], "model.layers.9.mlp.down_proj"]  # the toy has 4 layers
    save_expert(tmp_path / "other", other.z, other.card)
    assert main(["export", "--expert", str(tmp_path / "other"), "--format", "lora", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "'model.layers.9.mlp.down_proj', which base model toy does not have" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("fn", ["bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"])
def test_grouped_vllm_lora_ops_equal_a_per_token_loop_and_skip_requests_without_lora(fn):
    """t2dist/engines/vllm_lora_ops.py against ``out[t] = W[idx[t]] · x[t]`` (0 where idx[t] = -1), no engine."""
    from t2dist.engines import vllm_lora_ops as ops

    g = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 1, 6, 5, generator=g)  # 3 adapter slots of (out 6 × in 5), vLLM's stacked layout
    x = torch.randn(7, 5, generator=g)
    idx = torch.tensor([0, -1, 2, 2, -1, 0, 1])
    want = torch.stack([weights[i, 0] @ x[t] if i >= 0 else torch.zeros(6) for t, i in enumerate(idx.tolist())])
    start = torch.randn(7, 9, generator=g)
    out = start.clone()
    if fn == "bgmv_shrink":
        ops.bgmv_shrink(x, weights, out, idx, 0.5)
        torch.testing.assert_close(out[:, :6], 0.5 * want)
        torch.testing.assert_close(out[:, 6:], start[:, 6:])
    elif fn == "bgmv_expand":
        ops.bgmv_expand(x, weights, out, idx, add_inputs=True)
        torch.testing.assert_close(out[:, :6], start[:, :6] + want)
    else:
        ops.bgmv_expand_slice(x, weights, out, idx, 2, 6, add_inputs=True)
        torch.testing.assert_close(out[:, 2:8], start[:, 2:8] + want)
        torch.testing.assert_close(out[:, :2], start[:, :2])
    one = torch.zeros(7, 6)
    ops.bgmv_expand(x, weights, one, torch.full((7,), 1), add_inputs=False)  # one adapter: the fast path
    torch.testing.assert_close(one, x @ weights[1, 0].T)


def test_a_cache_keeps_what_is_there(tmp_path, toy_svf, expert_dir):
    """exists='keep' (the server's cache): a finished adapter is returned with its card's report, not rewritten."""
    svf, tok = toy_svf
    expert = read_expert(expert_dir)
    (tmp_path / "c").mkdir()  # an empty directory is filled
    out, first = export_lora(svf, tok, expert.z, expert.card, tmp_path / "c", rank=32, exists="keep")
    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    again = export_lora(svf, None, svf.neutral_z(), expert.card, out, rank=32, exists="keep")[1]
    assert again == first and (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert first.rank == 32 and not first.exact
    with pytest.raises(LoRAExportError, match="for --rank 32, not 64"):
        export_lora(svf, tok, expert.z, expert.card, out, rank=64, exists="keep")
    with pytest.raises(FileExistsError, match="not empty"):
        export_lora(svf, tok, expert.z, expert.card, out, rank=32)
