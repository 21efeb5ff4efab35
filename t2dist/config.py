"""The one typed run configuration, loaded from YAML with ``key.sub=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key (for
example ``rl.lr_rate: extra inputs are not permitted``) before any model is loaded.

The tree is assembled from the registries (torchtitan style: components own their settings).
:class:`Config` holds the sections of the pipeline itself (model, task, rl, rollout, learner...);
:func:`config_class` adds one section per registered policy kind that declares settings (its
``Config``: ``svf:`` from :class:`t2dist.svf.model.SVFModel`, ``lora:`` from
:class:`t2dist.policy.lora.LoRAModel`) and, under ``rollout``, one per engine registered with
settings (``rollout.vllm``: :mod:`t2dist.engines.vllm_config`).  A new kind with its own section
needs no line here (tests/test_configs.py registers one).  Load a config with :func:`load_config`
(YAML + overrides) or :func:`config_from_dict` (a dumped config: ``config.json``, an actor's copy).

The registries this module imports (tasks, engines, policy kinds, losses) never import it; their
sections subclass :class:`t2dist.config_section.Section`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from t2dist.adapt.dispatch import DispatchError, check_template
from t2dist.config_section import Section, one_of
from t2dist.engines import ENGINE_SETTINGS, ENGINES
from t2dist.errors import ConfigError
from t2dist.policy.registry import POLICIES, policy_settings
from t2dist.rl.losses import ADVANTAGES, KL_ESTIMATORS
from t2dist.rl.schedule import LrSchedule
from t2dist.tasks import TASKS

__all__ = ["Config", "ConfigError", "Section", "config_class", "config_from_dict", "dump_config", "load_config",
           "apply_overrides", "parse_override"]


class ModelConfig(Section):
    path: str = Field("toy", description="HF model directory, hub name, 'smollm2' or 'toy' (see t2dist/models/loading.py)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' or 'auto'")
    cache_dir: str | None = Field(None, description="where converted models (smollm2) live; null: $T2DIST_CACHE/models")


class PolicyConfig(Section):
    kind: str = Field("svf", description="what is trained: a policy kind of t2dist.policy.registry (svf: z vectors, "
                                         "svf: section; lora: a LoRA adapter, lora: section)")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return one_of(v, sorted(POLICIES), "policy kind", "known kinds")


class TaskConfig(Section):
    name: str = "math"
    max_new_tokens: int | None = Field(None, ge=1, description="null: the task's own default")
    option_order: Literal["given", "balanced"] = Field(
        "given", description="multiple-choice training prompts: the options in the data set's order, or rotated "
                             "so the right letters of each step's prompts cycle A, B, C, D, ... (t2dist/rl/data.py: "
                             "balance_answers); evaluation always keeps the data set's order")

    @field_validator("name")
    @classmethod
    def _known_task(cls, v: str) -> str:
        return one_of(v, sorted(TASKS), "task", "known tasks")

    @model_validator(mode="after")
    def _options_to_order(self) -> "TaskConfig":
        if self.option_order == "balanced" and not TASKS[self.name].multiple_choice:
            known = ", ".join(n for n, t in sorted(TASKS.items()) if t.multiple_choice)
            raise ValueError(f"task.option_order=balanced needs a multiple-choice task with its options in the "
                             f"prompt; task {self.name!r} has none (such tasks: {known})")
        return self


class RLConfig(Section):
    steps: int = Field(80, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    samples_per_prompt: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    lr: float = Field(1e-2, gt=0.0)
    lr_schedule: LrSchedule = Field(
        "constant", description="lr over the run's rl.steps (t2dist/rl/schedule.py): constant, or decayed to 0 "
                                "linearly or on a half cosine, as Hugging Face's/TRL's schedules without warm-up")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient against the neutral model")
    kl_estimator: str = "k3"
    kl_every: int = Field(1, ge=0, description="with rl.beta 0 the KL to the neutral model is only logged: compute "
                          "it (one more forward, without grad) every k steps; 0: never. Every step when beta > 0")
    advantage: str = "group_mean"
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    clip_grad: float | None = Field(1.0, gt=0.0)
    update_epochs: int = Field(1, ge=1, description="optimizer updates per rollout batch (>1: PPO-style ratio clipping)")
    clip_eps: float = Field(0.2, gt=0.0, description="PPO ratio clip, used when rl.update_epochs > 1")
    off_policy_steps: int = Field(0, ge=0, le=1, description="1: the actors sample step t+1's batch with z_(t-1) "
                                  "while the learner computes z_t (overlap; no importance correction); 0: on-policy")
    seed: int = 0
    shared_prefix: bool = Field(
        True, description="learner forward: each distinct prompt once, its KV cache shared by its samples "
                          "(t2dist/rl/logprobs.py; same numbers as one packed forward, ~2.8x fewer token positions "
                          "on SmolLM2 arith); false: prompt + completion of every sample in one forward")
    behaviour_correction: Literal["none", "tis"] = Field(
        "none", description="tis: weight each token's policy gradient by the truncated importance ratio "
                            "min(π_learner/π_engine, rl.tis_cap) of the rollout engine's sampling log-probs")
    tis_cap: float = Field(2.0, ge=1.0, description="cap of the truncated importance weight (rl.behaviour_correction=tis)")

    @field_validator("kl_estimator")
    @classmethod
    def _known_kl(cls, v: str) -> str:
        return one_of(v, KL_ESTIMATORS, "KL estimator")

    @field_validator("advantage")
    @classmethod
    def _known_adv(cls, v: str) -> str:
        return one_of(v, ADVANTAGES, "advantage estimator")


class SandboxConfig(Section):
    memory_mb: int = Field(512, ge=16)
    cpu_seconds: int = Field(5, ge=1)
    wall_seconds: float = Field(10.0, gt=0)
    max_processes: int = Field(32, ge=1)
    workers: int | None = Field(None, ge=1)
    allow_rlimits_only: bool = Field(False, description="run code without bubblewrap (weaker isolation)")
    seccomp: bool = Field(True, description="deny the system calls untrusted Python never needs (libseccomp "
                                            "filter, bubblewrap mode); false only where libseccomp is missing")


class RolloutConfig(Section):
    actors: int = Field(2, ge=1, description="number of rollout actors")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    threads_per_actor: int | None = Field(None, ge=1, description="torch threads inside each actor; default: "
                                                                  "cpus_per_actor (at least 1)")
    batch_size: int = Field(128, ge=1, description="sequences per generate call")
    engine: str = Field("hf", description="inference engine that samples: hf (in-process, shared-prefix) or vllm "
                                          "(z-only weight updates in vLLM's worker; SVF policies; t2dist/engines/)")
    # + one section per engine registered with settings (rollout.vllm), added by config_class()

    @model_validator(mode="after")
    def _threads(self) -> "RolloutConfig":
        if self.threads_per_actor is None:
            object.__setattr__(self, "threads_per_actor", threads_for(self.cpus_per_actor))
        return self

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        return one_of(v, ENGINES, "rollout engine", "known engines")


class LearnerConfig(Section):
    ranks: int = Field(2, ge=1, description="data-parallel learner ranks (one torch.distributed group)")
    cpus_per_rank: float = Field(1.0, ge=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    threads_per_rank: int | None = Field(None, ge=1, description="torch threads per rank; default: cpus_per_rank "
                                                                "(at least 1)")
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(1, ge=1, description="micro-batches per rank per update")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    shard_factors: bool = Field(
        False, description="partition U, V and the target weights over the ranks (learner/sharding.py): for "
                           "models whose factors do not fit one device; costs activation exchanges per layer")
    factor_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the sharded factors; auto: bfloat16 on a GPU, float32 on CPU (z stays float32)")

    @model_validator(mode="after")
    def _threads(self) -> "LearnerConfig":
        if self.threads_per_rank is None:
            object.__setattr__(self, "threads_per_rank", threads_for(self.cpus_per_rank))
        return self


def threads_for(cpus: float) -> int:
    """Torch threads of a process given ``cpus`` Ray CPUs: as many (at least 1), so none sits idle."""
    return max(1, int(cpus))


class TrainConfig(Section):
    eval_every: int = Field(10, ge=1, description="evaluate z on the validation split every k steps")
    eval_limit: int | None = Field(None, ge=1, description="validation examples per evaluation (null: all)")
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    evaluator_cpus: float = Field(1.0, ge=0)
    evaluator_gpus: float = Field(0.0, ge=0)
    max_actor_restarts: int = Field(3, ge=0)
    background_evals: bool = Field(
        True, description="evaluate (the base on test, z on validation) on the evaluator while training goes on; "
                          "false: wait for each evaluation before the next step (where the actors and learners "
                          "already fill every core, overlapping slows both: 2 CPU cores)")


class RayConfig(Section):
    address: str | None = Field(
        None, description="null: $RAY_ADDRESS when set (as under `ray job submit`), else start a local cluster; "
                          "'auto': join a cluster running on this machine or start a local one; 'local'; or host:port")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local cluster (null: what the run needs)")
    placement: Literal["none", "colocated", "separate"] = Field(
        "none", description="Ray placement groups: none; colocated (one PACK group: actors beside learner ranks); "
                            "separate (learner ranks PACKed in one group, actors+evaluator SPREAD in another)")
    placement_timeout_s: float = Field(120.0, gt=0, description="wait this long for the placement groups")


class RegistryConfig(Section):
    """Where ``t2dist train`` publishes its best expert (every node must see the same URL)."""

    url: str | None = Field(None, description="local directory or fsspec URL (s3://bucket/prefix); null: do not publish")
    name: str | None = Field(None, description="expert name in the registry (null: the task name)")
    alias: str | None = Field("champion", description="alias moved to the new version when it beats the current one "
                                                      "on the same validation set (null: never)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. endpoint_url")


class EvalConfig(Section):
    split: Literal["train", "validation", "test"] = "test"
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    engine: str | None = Field(None, description="engine of the evaluator actor (hf | vllm); null: rollout.engine")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str | None) -> str | None:
        return v if v is None else one_of(v, ENGINES, "rollout engine", "known engines")


class CEMConfig(Section):
    """Few-shot CEM over mixing weights (t2dist/adapt/cem.py); population/elites/iterations as in the paper."""

    population: int = Field(32, ge=2, description="candidates per iteration")
    elite_frac: float = Field(0.2, gt=0.0, le=1.0, description="share of candidates the next distribution is fit to")
    iterations: int = Field(100, ge=1, description="at most this many iterations (early stop: cem.patience)")
    shots: int = Field(50, ge=1, description="examples of the new task scored per candidate (10 overfit on the toy base)")
    shots_split: Literal["train", "validation", "test"] = Field("train", description="where the shots come from")
    init_std: float = Field(0.5, gt=0.0, description="initial spread of alpha (mean 1/K per expert)")
    per_matrix: bool = Field(False, description="one alpha per expert and target matrix instead of per expert")
    seed_experts: bool = Field(True, description="put the single experts (one-hot alpha) into the first population")
    patience: int = Field(5, ge=1, description="stop after this many iterations without a better candidate")
    seed: int = 0


class AdaptConfig(Section):
    """Two-pass self-adaptation (t2dist/adapt/): dispatch template, strategy, experts, CEM."""

    template: str | None = Field(None, description="first-pass prompt; must contain {prompt} (null: the dispatch "
                                 "task's own: \"Which task?\\n{prompt}\\nKind:\" for dispatch)")
    dispatch_task: str = Field("dispatch", description="the first pass's task: its template and chat mode ask the "
                               "question, its test split scores the answers (dispatch: the toy suite; dispatch_real: "
                               "SmolLM2's arith / ARC-Easy / alphabetical)")
    strategy: Literal["prompt", "cls", "fewshot"] = "prompt"
    experts: list[str] = Field(default_factory=lambda: ["math", "code", "reasoning"],
                               description="registry references (NAME, NAME@V, NAME:ALIAS) or expert directories")
    cls_expert: str | None = Field("dispatch", description="the classifier expert of strategy cls")
    actors: int = Field(0, ge=0, description="score CEM candidates on this many Ray rollout actors (0: in process)")
    batch_size: int = Field(64, ge=1, description="sequences per generate call")
    cem: CEMConfig = CEMConfig()

    @field_validator("template")
    @classmethod
    def _has_prompt_field(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return check_template(v)
        except DispatchError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("dispatch_task")
    @classmethod
    def _dispatch_task(cls, v: str) -> str:
        ok = sorted(n for n, t in TASKS.items() if t.skill == "dispatch")
        return one_of(v, ok, "adapt.dispatch_task", "dispatch tasks")


class ServeConfig(Section):
    """``t2dist serve``: the OpenAI-compatible endpoint on Ray Serve (t2dist/serve/, docs/serving.md)."""

    host: str = Field("127.0.0.1", description="address the HTTP server binds (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1, description="engine replicas (each one engine holding the base + every expert's z)")
    cpus_per_replica: float = Field(1.0, ge=0, description="Ray CPUs each engine replica takes")
    gpus_per_replica: float = Field(0.0, ge=0, description="Ray GPUs each engine replica takes")
    threads_per_replica: int | None = Field(None, ge=1, description="torch threads of an HF engine replica "
                                            "(null: torch's default, every core)")
    autoscaling: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config of the engine "
                                               "deployment (min_replicas, max_replicas, target_ongoing_requests...); "
                                               "set: serve.replicas is ignored")
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="hf (shared-prefix sampler), vllm, or auto: measured once per machine, model and vLLM "
                            "version on a short fixed workload (cached; t2dist/serve/engine_choice.py)")
    mode: Literal["exact", "lora"] = Field("exact", description="exact: z-only switches of W' (every engine); lora: "
                                           "vLLM multi-LoRA with each expert exported as an adapter")
    batch_window_ms: float = Field(10.0, ge=0, description="how long a replica gathers requests before a batch")
    max_batch_size: int = Field(32, ge=1, description="requests (x n samples) in one engine call")
    max_queue: int = Field(256, ge=1, description="waiting requests per replica beyond which the server answers 429")
    strategy: Literal["prompt", "cls"] = Field("prompt", description="model=auto's first pass: the base names the kind "
                                               "(prompt) or the classifier expert serve.cls_expert does (cls)")
    cls_expert: str = Field("dispatch", description="the classifier expert of strategy cls (a registry reference)")
    experts: list[str] | None = Field(None, description="registry references served by name; null: every expert in "
                                      "registry.url trained on this base model (new names appear within resolve_ttl_s)")
    resolve_ttl_s: float = Field(5.0, ge=0, description="how long a name, alias or version-less reference stays "
                                 "resolved: a newly published version or moved alias is served within this time")
    dispatch_prompt_tokens: int | None = Field(64, ge=1, description="tokens of the prompt the first pass reads "
                                               "(null: all of it)")
    dispatch_replicas: int = Field(1, ge=0, description="replicas of the dispatch deployment (an engine pinned to the "
                                   "first pass's weights: no switches); 0: the first pass runs on the engine replicas")
    max_tokens: int = Field(256, ge=1, description="max_tokens of a request that names none")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still unanswered after this is a 504")
    max_models_per_replica: int | None = Field(
        None, ge=1, description="Ray Serve multiplexing: experts' z a replica keeps loaded (null: every served "
                                "expert, so no replica drops one; smaller values make replicas specialise)")
    lora_rank: int | None = Field(None, ge=1, description="serve.mode=lora: adapter rank (null: exact, up to 512)")


class Config(Section):
    """The pipeline's own sections; :func:`config_class` adds the registered components' (``svf``, ``lora``,
    ``rollout.vllm``).  Build configs with :func:`load_config` / :func:`config_from_dict`, not this class."""

    name: str = "run"
    run_dir: str | None = Field(None, description="run directory (null: runs/<name>-<time>); relative: under output_root")
    output_root: str | None = Field(None, description="absolute directory that relative output paths (run_dir, "
                                    "registry.url, svf.cache_dir, model.cache_dir) resolve under; null: $T2DIST_HOME, "
                                    "else the current directory (refused inside a `ray job submit` working-dir copy)")
    model: ModelConfig = ModelConfig()
    policy: PolicyConfig = PolicyConfig()  # + one section per registered policy kind with settings (svf, lora)
    task: TaskConfig = TaskConfig()
    rl: RLConfig = RLConfig()
    sandbox: SandboxConfig = SandboxConfig()
    eval: EvalConfig = EvalConfig()
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    registry: RegistryConfig = RegistryConfig()
    adapt: AdaptConfig = AdaptConfig()
    serve: ServeConfig = ServeConfig()

    def __reduce__(self):  # an assembled class is not importable by name: pickle the data, rebuild it
        return config_from_dict, (self.model_dump(),)


_ASSEMBLED: dict[tuple, type[Config]] = {}


def _registered() -> tuple[tuple[tuple[str, type], ...], tuple[tuple[str, type], ...]]:
    """The registries' sections now: ``((kind, section), ...)``, ``((engine, section), ...)``."""
    return tuple(sorted(policy_settings().items())), tuple(sorted(ENGINE_SETTINGS.items()))


def config_class() -> type[Config]:
    """The config class of the registries as they are now: :class:`Config` plus one section per policy kind
    with settings, and under ``rollout`` one per engine with settings.  Built once per registry state (a kind
    or engine registered or removed later gives a new class on the next call)."""
    key = _registered()
    if key not in _ASSEMBLED:
        _ASSEMBLED.clear()
        _ASSEMBLED[key] = _assemble(*key)
    return _ASSEMBLED[key]


def _assemble(policies, engines) -> type[Config]:
    clash = [k for k, _ in policies if k in Config.model_fields]
    clash += [f"rollout.{k}" for k, _ in engines if k in RolloutConfig.model_fields]
    if clash:
        raise ConfigError(f"registered settings {clash} would replace sections of the config itself; rename them")
    rollout = create_model("RolloutConfig", __base__=RolloutConfig, __module__=__name__,
                           **{k: (cls, Field(default_factory=cls)) for k, cls in engines})
    return create_model("Config", __base__=Config, __module__=__name__,
                        rollout=(rollout, Field(default_factory=rollout)),
                        **{k: (cls, Field(default_factory=cls)) for k, cls in policies})


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        source = str(p)
    return config_from_dict(apply_overrides(data, list(overrides or [])), source)


def config_from_dict(data: dict, source: str = "config") -> Config:
    """A config from its dumped form (``config.json``, a dict an actor gets); an error names each bad key."""
    try:
        return config_class().model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def dump_config(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")
