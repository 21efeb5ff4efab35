"""Base models: the toy, offline GGUF models, local directories and hub names."""
