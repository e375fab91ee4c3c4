"""Shared fixtures: a tiny byte-level BPE tokenizer trained in-process and a tiny random RAT+ model
saved as a model folder (config.json, model.safetensors, tokenizer.json, metadata.json)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ratplus.config import ModelConfig
from ratplus.eval.niah import NEEDLE, NOISE, TEMPLATE
from ratplus.io.folder import save_pretrained
from ratplus.model.rat import RATPlusLM

EOS = "<|endoftext|>"
TRAIN_TEXT = [
    NOISE,
    TEMPLATE,
    NEEDLE,
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer.",
    "Answer the question based on the given passages. Only give me the answer.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "0123456789 abcdef-0123-4567-89ab-cdef01234567",
]


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer)
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_model(tokenizer, max_seq_len: int = 512, seed: int = 0) -> RATPlusLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=max_seq_len,
        eos_token_id=tokenizer.token_to_id(EOS),
        name="eval-test",
    )
    return RATPlusLM(config).eval()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    """A model folder adapted (per its metadata) to D4-W16-P2."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-rat"
    save_pretrained(make_model(tokenizer), path, tokenizer=tokenizer, metadata={"adapted_pattern": "D4-W16-P2"})
    return path


def folder_digest(path: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file in a folder: evaluation must leave a checkpoint untouched."""
    import hashlib

    return {
        str(f.relative_to(path)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }
