"""Ray actors wrapping the t2dist core: the rollout workers and the evaluator (rollout.py, evaluator.py),
the adaptation worker (adapt.py), and where they are placed (placement.py)."""
