"""Typed state of one ``t2dist train`` run, the per-step record, and the numbers of its summary.

``RunState`` is what a checkpoint's ``state.json`` holds: the steps done, the position in the
shuffled train prompts, the best validation accuracy and its step, one record per step, the
validation evaluations, the base model's test result, the training seconds so far and the
RNG states. Its JSON keys are the ones the untyped dict of earlier versions wrote, so their
checkpoints resume unchanged (unknown keys are kept aside, not dropped).

The per-step record (``step_record``) is built once; the TensorBoard scalars derive from it
through one table (``TB_SCALARS``), and the card metrics and ``summary.json`` from one
``FinalResult``. Pure Python: no Ray, no DeepSpeed (the layers of docs/design.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from t2dist.rl.rollout import RolloutBatch
from t2dist.verifiers.audit import KINDS as AUDIT_KINDS


@dataclass
class Best:
    accuracy: float = -1.0  # below any accuracy: the first validation result becomes the best
    step: int = 0  # 0: no validation result yet


@dataclass
class RunState:
    step: int = 0
    position: int = 0
    best: Best = field(default_factory=Best)
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    base: dict | None = None
    wall_seconds: float = 0.0
    rng: dict | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know, written back as they were

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        if data["rng"] is None:
            del data["rng"]
        return {**extra, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in data.items() if k in known}
        kw["best"] = Best(**kw.get("best", {}))
        return cls(**kw, extra={k: v for k, v in data.items() if k not in known})


class BestTracker:
    """The best z by validation accuracy; a later evaluation replaces it only when strictly better."""

    def __init__(self, state: RunState, z: Mapping | None):
        self.state = state
        self.z = z

    def offer(self, step: int, accuracy: float, z: Mapping) -> bool:
        if accuracy <= self.state.best.accuracy:
            return False
        self.state.best = Best(accuracy=accuracy, step=step)
        self.z = z
        return True


# TensorBoard tag -> key of the step record (0.0 where a learner does not report the key)
TB_SCALARS = {
    "train/reward_mean": "reward", "train/reward_std": "reward_std", "train/accuracy": "accuracy",
    "train/loss": "loss", "train/entropy": "entropy", "train/grad_norm": "grad_norm", "train/lr": "lr",
    "train/response_length": "response_length", "time/rollout_s": "rollout_s", "time/sync_s": "sync_s",
    "time/generate_s": "generate_s", "time/scoring_s": "scoring_s", "time/learner_s": "learner_s",
    "time/step_s": "step_s", "time/tokens_per_s": "tokens_per_s", "sync/bytes_per_step": "sync_bytes",
}


@dataclass
class StepTimes:
    """Seconds of one step: z to the actors, generation+scoring (without the sync), learner update."""

    sync_s: float
    rollout_s: float
    learner_s: float


def step_record(step: int, batch: RolloutBatch, learner: Mapping[str, Any], times: StepTimes,
                sync_bytes: int) -> dict[str, float]:
    """The one record of a step: kept in ``RunState.history``, printed, and sent to TensorBoard."""
    return {
        "step": step,
        "reward": float(batch.rewards.mean()),
        "reward_std": float(batch.rewards.std()),
        "accuracy": float(batch.correct.float().mean()),
        "response_length": float(batch.lengths.float().mean()),
        "sync_s": times.sync_s,
        "rollout_s": times.rollout_s,
        "generate_s": batch.seconds.get("generate", 0.0),
        "scoring_s": batch.seconds.get("score", 0.0),
        "learner_s": times.learner_s,
        "sync_bytes": sync_bytes,
        "tokens_per_s": batch.num_tokens / max(times.sync_s + times.rollout_s, 1e-9),
        "step_s": times.sync_s + times.rollout_s + times.learner_s,
        **batch.integrity(),  # code tasks: passing programs that did more than define functions
        # the learner's "step" counts optimizer steps (rl.update_epochs per RL step): kept apart
        **{("optimizer_steps" if k == "step" else k): v for k, v in learner.items() if isinstance(v, (int, float))},
    }


# logged only when the learner reports them (behaviour/*: the batch carries the rollout engine's log-probs)
TB_OPTIONAL_SCALARS = {
    "train/kl": "kl",  # absent on the steps rl.kl_every skips
    "behaviour/abs_dlogp": "behaviour_abs_dlogp", "behaviour/kl": "behaviour_kl",
    "behaviour/tis_weight": "tis_weight", "behaviour/tis_capped_frac": "tis_capped_frac",
    # code tasks (t2dist.verifiers.audit): passing completions, and those whose program also did something else
    "integrity/passed": "integrity_passed", "integrity/passed_flagged": "integrity_passed_flagged",
    **{f"integrity/passed_{k}": f"integrity_passed_{k}" for k in AUDIT_KINDS},
}


def tb_scalars(rec: Mapping[str, float]) -> dict[str, float]:
    out = {tag: rec.get(key, 0.0) for tag, key in TB_SCALARS.items()}
    out.update({tag: rec[key] for tag, key in TB_OPTIONAL_SCALARS.items() if key in rec})
    return out


def format_step(rec: Mapping[str, float], steps: int) -> str:
    kl = f"{rec['kl']:.5f}" if "kl" in rec else "      -"  # rl.kl_every skipped this step's KL
    return (f"step {rec['step']:>4}/{steps}  reward {rec['reward']:+.3f}  acc {rec['accuracy']:.3f}  "
            f"kl {kl}  len {rec['response_length']:.1f}  {rec['step_s']:.2f}s")


@dataclass
class FinalResult:
    """The test results at the end of a run: the base model, the best z, the last z."""

    base: dict
    best: dict
    last: dict

    def card_metrics(self, state: RunState, val_limit: int | None) -> dict[str, Any]:
        return {"test_accuracy": self.best["accuracy"], "test_ci": [self.best["ci_low"], self.best["ci_high"]],
                "base_test_accuracy": self.base["accuracy"], "best_val_accuracy": state.best.accuracy,
                "best_step": state.best.step, "test_n": self.best["n"],
                "val_split": "validation", "val_limit": val_limit}

    def summary(self, state: RunState) -> dict[str, Any]:
        return {"base_accuracy": self.base["accuracy"], "base_ci": [self.base["ci_low"], self.base["ci_high"]],
                "final_accuracy": self.best["accuracy"], "final_ci": [self.best["ci_low"], self.best["ci_high"]],
                "last_accuracy": self.last["accuracy"], "gain": self.best["accuracy"] - self.base["accuracy"],
                "best_val_accuracy": state.best.accuracy, "best_step": state.best.step, "n_test": self.best["n"]}


def integrity_totals(history: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"integrity": {kind: count over the run}}`` from the steps' ``integrity_*`` counts (code tasks), with
    ``passed_flagged``: passing completions whose program did more than define functions; ``{}`` without them."""
    totals: dict[str, int] = {}
    for rec in history:
        for key, value in rec.items():
            if key.startswith("integrity_"):
                totals[key.removeprefix("integrity_")] = totals.get(key.removeprefix("integrity_"), 0) + int(value)
    return {"integrity": totals} if totals else {}


def training_curve(state: RunState, steps: int) -> dict[str, Any]:
    hist = state.history
    return {"steps": steps, "evals": state.evals,
            "reward_first": hist[0]["reward"] if hist else None, "reward_last": hist[-1]["reward"] if hist else None}
