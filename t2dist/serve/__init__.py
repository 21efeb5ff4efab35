"""``t2dist serve``: a self-adaptive, OpenAI-compatible endpoint on Ray Serve.

Every request gets its expert, exactly: ``model`` names the base, an expert (``arith``,
``arith@3``, ``arith:champion``) or ``auto`` (the two-pass: a cheap first pass labels the prompt,
the label's expert answers).  Each engine replica holds one engine (HF shared-prefix or vLLM) with
the base and the z of every served expert, and switches experts with z-only updates of ``W'``;
a scheduler groups waiting requests by expert so a switch is paid once per group.

Modules, the core first (no Ray):

* :mod:`~t2dist.serve.protocol` — OpenAI request/response shapes; :mod:`~t2dist.serve.errors` — their errors;
* :mod:`~t2dist.serve.plan` — what is served (base, experts, routes), decided at start;
* :mod:`~t2dist.serve.resolver` — model name -> expert version, with a short registry cache;
* :mod:`~t2dist.serve.dispatch` — the first pass of ``auto``: truncated prompt, stop when the label is decided;
* :mod:`~t2dist.serve.scheduler` — the batching scheduler of a replica; :mod:`~t2dist.serve.replica` — a replica;
* :mod:`~t2dist.serve.frontend` and :mod:`~t2dist.serve.app` — the ingress: its logic and its FastAPI app;
* :mod:`~t2dist.serve.metrics` — Prometheus metrics of the whole app;
* :mod:`~t2dist.serve.local` — the same app in one process (tests, debugging);
* :mod:`~t2dist.serve.ray_app` — the Ray Serve deployments (the one module here that imports Ray);
* :mod:`~t2dist.serve.engine_choice` — ``serve.engine: auto``, decided by a short measurement.

docs/serving.md is the walk-through.
"""
