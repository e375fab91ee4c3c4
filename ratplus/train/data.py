"""Training data: memory-mapped token shards and window loaders (documents come from ``ratplus.io.corpus``).

Shapes: B batch (sequences), T sequence length (tokens per window).

Pipeline (docs/DESIGN.md section 5): documents -> tokenizer -> one stream with an EOS token after every
document -> shards of raw ``uint16``/``uint32`` tokens on disk (``prepare_shards``) -> windows of
T + 1 tokens read through ``np.memmap`` (``TokenDataset``). Input is the first T tokens of a window,
labels are the next tokens, with -100 (ignored) wherever the *input* token is EOS: predicting the
first token of a new document from the previous document's end carries no signal. Documents are
not separated inside a window (no attention reset), as in the paper.

A shard folder holds ``meta.json`` (dtype, vocab size, EOS id, token counts), ``shard_00000.bin``,
... and the ``tokenizer.json`` that produced it. ``ratplus data prepare`` writes ``train/`` and
``val/`` shard folders side by side in one streamed, resumable pass (``prepare_splits``): memory
does not grow with the corpus, the bytes do not depend on the worker count, and a killed run
continues from its last resume point when started again.

The parts: ``shards`` (the format, ``TokenDataset``), ``prepare`` (``prepare_splits``, the writer),
``sft`` (prompt/answer records), and here the streams whose position a checkpoint saves. Every name
of those modules is importable from here too.
"""

from __future__ import annotations

from typing import Any

import torch

from ratplus.train.prepare import (  # noqa: F401  (re-exported: ratplus.train.data is the import path)
    CHECKPOINT_SECONDS,
    CHUNK_CHARS,
    CHUNK_DOCS,
    PROGRESS_FILE,
    DamagedShardError,
    Document,
    PrepareSummary,
    prepare_shards,
    prepare_splits,
    text_prefix,
    val_route,
)
from ratplus.train.sft import SFT_BATCH, SFTDataset, read_sft_records  # noqa: F401
from ratplus.train.shards import (  # noqa: F401
    FORMAT,
    IGNORE_INDEX,
    META_FILE,
    TOKEN_DTYPES,
    TokenDataset,
    token_dtype,
)

# ---- streams (the data position a checkpoint saves) ------------------------------------------------


class WindowStream:
    """Global batches of windows from the training shards, random or in order (the data position)."""

    def __init__(self, ds: TokenDataset, batch_size: int, seq_len: int, sampling: str, seed: int):
        self.ds, self.batch_size, self.seq_len, self.sampling = ds, batch_size, seq_len, sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # batches drawn (random) or windows consumed (ordered)
        self._random = ds.random_windows(batch_size, seq_len, self.generator) if sampling == "random" else None
        if sampling == "ordered":
            self.num_windows = ds.num_windows(seq_len)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._random is not None:
            self.position += 1
            return next(self._random)
        # wrap around at the end of the stream: the next epoch starts over in the same order
        idx = [(self.position + j) % self.num_windows for j in range(self.batch_size)]
        self.position += self.batch_size
        return self.ds.batch_at([i * self.seq_len for i in idx], self.seq_len)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": self.sampling, "position": self.position}, {"data/generator": self.generator.get_state()}

    def load_state_dict(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if js["kind"] != self.sampling:
            raise ValueError(f"the checkpoint drew {js['kind']} windows but this run asks for {self.sampling}")
        self.position = int(js["position"])
        self.generator.set_state(tensors["data/generator"])


class SFTStream:
    """Global batches of prompt/answer examples, reshuffled every epoch (position = batch index)."""

    def __init__(self, ds: SFTDataset, batch_size: int, seed: int):
        self.ds, self.batch_size, self.seed, self.position = ds, batch_size, seed, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.ds.batch(self.position, self.batch_size, self.seed)
        self.position += 1
        return batch

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": "sft", "position": self.position}, {}

    def load_state_dict(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if js["kind"] != "sft":
            raise ValueError(f"the checkpoint is from a {js['kind']}-window run, not an SFT run")
        self.position = int(js["position"])
