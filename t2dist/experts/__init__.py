"""Experts on disk (``z.safetensors`` + ``card.json``) and their export to other formats."""
