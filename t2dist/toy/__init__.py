"""The toy base model: a character tokenizer, a pretraining corpus and the build script."""
