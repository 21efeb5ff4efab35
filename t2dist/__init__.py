"""t2dist: Transformer² (self-adaptive LLMs via Singular Value Fine-tuning) as a distributed RL framework."""
__version__ = "0.1.0"
