"""Policy kinds: the declared contract (:mod:`t2dist.policy.base`), the registry of kinds
(:mod:`t2dist.policy.registry`) and the kinds that live here (:mod:`t2dist.policy.lora`;
SVF lives with its maths in :mod:`t2dist.svf`).

This package's ``__init__`` imports nothing, so that a kind's module may import
:mod:`t2dist.policy.base` without loading the registry (which imports every kind).
"""
