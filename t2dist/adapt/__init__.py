"""Two-pass self-adaptation: dispatch (prompt / classifier expert), few-shot CEM mixing.

Core package: torch and the t2dist core only (no Ray); the parallel CEM driver is
``t2dist.orchestration.adapt``.
"""
