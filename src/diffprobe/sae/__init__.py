"""Sparse autoencoders: a TopK SAE, its training, the SAELens / sparsify / openai layouts,
evaluation and steering helpers (docs/sae.md)."""
