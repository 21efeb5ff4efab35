"""Ray actors (rollout, evaluator, verifier pool) wrapping the t2dist core."""
