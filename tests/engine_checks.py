"""Checks shared by the vLLM engine tests (toy and SmolLM2)."""
import torch


def random_z(policy, spread: float, seed: int) -> dict[str, torch.Tensor]:
    """Neutral z scaled by ``1 + spread · N(0, 1)``, seeded: every target moves."""
    g = torch.Generator().manual_seed(seed)
    return {k: v * (1 + spread * torch.randn(v.shape, generator=g)) for k, v in policy.neutral_z().items()}


def worker_vs_merge(engine, z, version: str = "a") -> tuple[float, float]:
    """Set ``z`` in the engine; ``(max |W'_worker − W'_merge_|, min over targets of max |W'_merge_ − W|)``.

    Also asserts that only z crossed into the worker (float32 bytes per z value)."""
    policy = engine.policy
    assert engine.set_z(z, version=version) == 4 * policy.num_z
    got = engine.weights(policy.targets)
    policy.merge_(z, version)
    try:
        worst = max(float((got[n] - policy.model.get_submodule(n).weight).abs().max()) for n in policy.targets)
        moved = min(float((policy.model.get_submodule(n).weight - policy._base[n]).abs().max()) for n in policy.targets)
    finally:
        policy.unmerge_()
    return worst, moved
