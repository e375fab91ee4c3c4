"""Every on-disk format: the model folder (``folder``), its metadata (``metadata``), tokenizers
(``tokenizer``) and text corpora (``corpus``). Knows the model, nothing above it."""
