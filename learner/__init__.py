"""The DeepSpeed learner wrapping the t2dist core."""
