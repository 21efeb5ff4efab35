"""SVF core: target selection, factors, both execution paths, parametrizations, cache, mixing."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from t2dist.svf import (FactorCacheError, Parametrization, SVFModel, TargetSpecError, fingerprint, get_factors,
                        load_factors, mix_z, select_targets)
from t2dist.svf.factors import cache_key
from tiny_models import tiny_model

IDS = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))


def random_z(svf, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: v + spread * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in svf.neutral_z().items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("kind", ["linear", "sigmoid"])
def test_neutral_reproduces_base_logits(arch, rank, kind):
    model = tiny_model(arch)
    base = model(input_ids=IDS).logits
    svf, _ = SVFModel.from_pretrained_model(model, rank=rank, parametrization=Parametrization(kind, rescale=True))
    neutral = svf.neutral_z()
    assert (svf(neutral, input_ids=IDS).logits - base).abs().max() <= 1e-4
    svf.merge_(neutral)
    assert (model(input_ids=IDS).logits - base).abs().max() <= 1e-4


def test_neutral_on_toy_base(toy_base):
    model, _ = toy_base
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    base = model(input_ids=ids).logits
    for rank in (None, 16):
        svf, _ = SVFModel.from_pretrained_model(model, rank=rank)
        assert (svf(svf.neutral_z(), input_ids=ids).logits - base).abs().max() <= 1e-4


@pytest.mark.parametrize("arch,spec,per_layer", [
    ("llama", "mlp", 3), ("mistral", "mlp", 3), ("qwen2", "mlp", 3),
    ("llama", "attention", 4), ("qwen2", "attention", 4), ("mistral", "all-linear", 7),
    ("llama", r"\.(up|down)_proj$", 2),
])
def test_target_selection(arch, spec, per_layer):
    model = tiny_model(arch)
    names = select_targets(model, spec)
    assert len(names) == per_layer * model.config.num_hidden_layers
    assert not any("lm_head" in n for n in names)


@pytest.mark.parametrize("spec,words", [("mpl", ["'mpl'", "matched no linear layer", "mlp", "gate_proj"]),
                                        ("up_proj(", ["nor a valid regular expression"])])
def test_bad_target_spec_names_the_problem(spec, words):
    with pytest.raises(TargetSpecError) as err:
        select_targets(tiny_model(), spec)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("rescale", [False, True])
def test_adapted_weight_matches_independent_computation(rescale):
    """W' from the merge path against a float64 NumPy SVD of the original W."""
    model = tiny_model()
    name = "model.layers.1.mlp.down_proj"
    W = model.get_submodule(name).weight.detach().double().numpy().copy()
    svf, _ = SVFModel.from_pretrained_model(model, parametrization=Parametrization("linear", rescale=rescale))
    z = random_z(svf)
    svf.merge_(z)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    s = S * z[name].double().numpy()
    if rescale:
        s = s * S.sum() / s.sum()
    expected = W + U @ np.diag(s - S) @ Vt
    got = model.get_submodule(name).weight.detach().double().numpy()
    assert np.abs(got - expected).max() < 1e-5


def test_truncated_rank_leaves_the_residual():
    model = tiny_model()
    name = "model.layers.0.mlp.up_proj"
    W = model.get_submodule(name).weight.detach().double().numpy().copy()
    svf, _ = SVFModel.from_pretrained_model(model, rank=4)
    z = {n: torch.zeros_like(v) for n, v in svf.neutral_z().items()}  # zero the top-4 directions
    svf.merge_(z)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    expected = U[:, 4:] @ np.diag(S[4:]) @ Vt[4:]
    assert np.abs(model.get_submodule(name).weight.detach().double().numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("kind", ["linear", "sigmoid"])
def test_two_paths_agree_and_unmerge_restores(kind):
    model = tiny_model("qwen2")
    base = model(input_ids=IDS).logits
    svf, _ = SVFModel.from_pretrained_model(model, rank=6, parametrization=Parametrization(kind))
    z = random_z(svf, 0.5)
    functional = svf(z, input_ids=IDS).logits
    svf.merge_(z)
    merged = model(input_ids=IDS).logits
    assert (functional - merged).abs().max() <= 1e-5
    assert (merged - base).abs().max() > 1e-3  # z really changes the model
    # the learning path uses the original W even while W' is merged
    assert (svf(z, input_ids=IDS).logits - merged).abs().max() <= 1e-5
    svf.unmerge_()
    assert torch.equal(model(input_ids=IDS).logits, base)


def test_only_z_is_trainable():
    model = tiny_model()
    svf, _ = SVFModel.from_pretrained_model(model)
    z = {n: v.clone().requires_grad_(True) for n, v in random_z(svf).items()}
    svf(z, input_ids=IDS).logits.square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in z.values())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not t.requires_grad for f in svf.factors.values() for t in (f.U, f.S, f.V))


@pytest.mark.parametrize("kind,rescale", [("linear", False), ("sigmoid", True)])
def test_z_gradient_matches_finite_differences(kind, rescale):
    """Autograd's dL/dz against central differences (float64 model; HF norms compute in
    float32 internally, so the step is 1e-2 and the tolerance 1e-3 relative)."""
    model = tiny_model(layers=1, dtype=torch.float64)
    svf, _ = SVFModel.from_pretrained_model(model, rank=3, parametrization=Parametrization(kind, rescale=rescale))
    z0 = random_z(svf, 0.2)
    ids = IDS[:2, :6]

    def loss(z):
        return svf(z, input_ids=ids).logits.sin().sum()

    z = {n: v.clone().requires_grad_(True) for n, v in z0.items()}
    loss(z).backward()
    eps = 1e-2
    for n in svf.targets:
        for i in range(z0[n].numel()):
            plus = {k: v.clone() for k, v in z0.items()}
            minus = {k: v.clone() for k, v in z0.items()}
            plus[n][i] += eps
            minus[n][i] -= eps
            numeric = (loss(plus) - loss(minus)).item() / (2 * eps)
            assert abs(z[n].grad[i].item() - numeric) <= 1e-3 * max(1.0, abs(numeric)), (n, i)


def test_sigmoid_parametrization_neutral_and_init():
    p = Parametrization("sigmoid", max_mult=3.0)
    raw = p.raw_for_scale(1.0)
    assert abs(float(p.scale(torch.tensor(raw))) - 1.0) < 1e-6
    assert abs(float(p.scale(torch.tensor(p.raw_for_scale(2.5)))) - 2.5) < 1e-6
    with pytest.raises(ValueError, match="out of reach"):
        p.raw_for_scale(3.0)


def test_rescale_keeps_the_sum_of_singular_values():
    p = Parametrization("linear", rescale=True)
    S = torch.tensor([5.0, 2.0, 1.0])
    s = p.singular_values(S, torch.tensor([2.0, 0.5, 1.0]))
    assert abs(float(s.sum() - S.sum())) < 1e-6 and not torch.allclose(s, S)


def test_factor_cache_hit_and_refusals(tmp_path):
    model = tiny_model()
    targets = select_targets(model, "mlp")
    f1, hit1 = get_factors(model, targets, 4, tmp_path)
    f2, hit2 = get_factors(model, targets, 4, tmp_path)
    assert (hit1, hit2) == (False, True)
    for n in targets:
        assert torch.equal(f1[n].S, f2[n].S) and torch.equal(f1[n].U, f2[n].U)
    fp = fingerprint(model)
    path = tmp_path / cache_key(fp, targets, 4)
    other = tiny_model(seed=1)
    assert fingerprint(other) != fp
    with pytest.raises(FactorCacheError, match="fingerprint"):
        load_factors(path, model_fingerprint=fingerprint(other), targets=targets, rank=4)
    with pytest.raises(FactorCacheError, match="targets differ"):
        load_factors(path, model_fingerprint=fp, targets=targets[:2], rank=4)
    with pytest.raises(FactorCacheError, match="rank"):
        load_factors(path, model_fingerprint=fp, targets=targets, rank=None)
    # another model gets its own cache entry instead of the first one's
    _, hit_other = get_factors(other, targets, 4, tmp_path)
    assert not hit_other
    # a shard: only the named targets are read
    part = load_factors(path, model_fingerprint=fp, targets=targets, rank=4, names=targets[:1])
    assert list(part) == targets[:1]


def test_mixing_global_and_per_matrix():
    model = tiny_model()
    svf, _ = SVFModel.from_pretrained_model(model, rank=3)
    za, zb = random_z(svf, seed=1), random_z(svf, seed=2)
    mixed = mix_z([za, zb], [0.25, 0.75])
    for n in svf.targets:
        assert torch.allclose(mixed[n], 0.25 * za[n] + 0.75 * zb[n])
    alpha = torch.rand(2, len(svf.targets), generator=torch.Generator().manual_seed(3))
    mixed = mix_z([za, zb], alpha)
    for t, n in enumerate(svf.targets):
        assert torch.allclose(mixed[n], alpha[0, t] * za[n] + alpha[1, t] * zb[n])
    with pytest.raises(ValueError, match="shape"):
        mix_z([za, zb], [1.0])


def test_bf16_delta_is_close_to_float64_svd_and_neutral_stays_exact():
    """``svf.delta_dtype=bfloat16``: U, V and the change in bf16, W' = W + change in float32.  The change is
    within bf16's rounding of the float64 one; at neutral z it is exactly zero, so the base stays bit-exact."""
    model = tiny_model()
    base = model(input_ids=IDS).logits
    name = "model.layers.1.mlp.down_proj"
    W = model.get_submodule(name).weight.detach().double().numpy().copy()
    svf, _ = SVFModel.from_pretrained_model(model, delta_dtype=torch.bfloat16)
    assert svf.factors[name].U.dtype == torch.bfloat16 and svf.factors[name].S.dtype == torch.float32
    assert torch.equal(svf(svf.neutral_z(), input_ids=IDS).logits, base)
    z = random_z(svf)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    change = U @ np.diag(S * z[name].double().numpy() - S) @ Vt
    got = svf.delta(name, z)
    assert got.dtype == torch.float32
    err = np.abs(got.double().numpy() - change).max() / np.abs(change).max()
    assert 1e-6 < err < 2e-2  # bf16 rounding (8 bits of mantissa), not float32's
    svf.merge_(z)
    assert (model(input_ids=IDS).logits - svf(z, input_ids=IDS).logits).abs().max() <= 1e-5
    svf.unmerge_()
    assert torch.equal(model(input_ids=IDS).logits, base)


def test_delta_dtype_config_key():
    from t2dist.config import ConfigError, load_config
    from t2dist.svf.model import resolve_delta_dtype

    model = tiny_model()
    assert resolve_delta_dtype("float32", model) is None  # the compute dtype
    assert resolve_delta_dtype("bfloat16", model) is torch.bfloat16
    assert load_config(None).svf.delta_dtype == "float32"  # bf16 only where a config asks for it (auto)
    with pytest.raises(ConfigError, match="svf.delta_dtype"):
        load_config(None, ["svf.delta_dtype=float8"])


@pytest.mark.parametrize("avx512_bf16,amx,want,why", [
    (True, False, torch.bfloat16, "AVX512-BF16"),
    (False, True, torch.bfloat16, "AMX"),
    (False, False, None, "neither AVX512-BF16 nor AMX"),
])
def test_auto_delta_dtype_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, capsys, avx512_bf16, amx, want, why):
    """``svf.delta_dtype=auto`` asks the CPU once (t2dist/hardware.py) and says what it chose and why."""
    import t2dist.svf.model as svf_model
    from t2dist.hardware import bf16_matmul

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    bf16_matmul.cache_clear()
    svf_model._say_once.cache_clear()
    try:
        model = tiny_model()
        assert svf_model.resolve_delta_dtype("auto", model) is want
        assert svf_model.resolve_delta_dtype("auto", model) is want
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1 and why in out[0]  # decided and logged once
        assert out[0].startswith(f"[t2dist] svf.delta_dtype=auto: {'bfloat16' if want else 'float32'} on cpu")
        svf, _ = SVFModel.from_pretrained_model(model, delta_dtype=svf_model.resolve_delta_dtype("auto", model))
        assert svf.delta_dtype == (want or torch.float32)
    finally:  # the real machine's answer again for whoever asks next
        bf16_matmul.cache_clear()
        svf_model._say_once.cache_clear()


def test_auto_delta_dtype_is_float32_where_torch_runs_the_cpu_below_avx512():
    """``ATEN_CPU_CAPABILITY=avx2`` (how an AVX512 machine stands in for an AVX2-only EPYC): auto picks float32."""
    code = ("from t2dist.hardware import bf16_matmul; import torch; "
            "print(torch.backends.cpu.get_cpu_capability(), bf16_matmul('cpu'))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("AVX2 (False, 'torch runs the CPU at AVX2"), out
