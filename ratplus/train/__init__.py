"""Training: data, tokenizers, trainer, checkpoints, distributed (docs/DESIGN.md section 5)."""
