"""Held-out evaluation: greedy accuracy through an engine, and log-likelihood ranking."""
