"""Training: data, tokenizers, trainer, checkpoints, distributed (DESIGN.md section 5)."""
