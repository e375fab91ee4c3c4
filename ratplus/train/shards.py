"""Token shards on disk, read side: the format (``meta.json``, ``shard_NNNNN.bin`` of raw
``uint16``/``uint32`` tokens, the ``tokenizer.json`` that produced them) and ``TokenDataset``, a
read-only ``np.memmap`` view of a shard folder as one token stream cut into windows. The write side
is ``ratplus.train.prepare``; an overview of the pipeline is ``ratplus.train.data``.

Shapes: B batch (sequences), T sequence length (tokens per window).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from ratplus.config import read_json
from ratplus.io.tokenizer import folder_tokenizer

IGNORE_INDEX = -100
META_FILE = "meta.json"
FORMAT = "ratplus-token-shards"
TOKEN_DTYPES: dict[str, Any] = {"uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab: int, dtype: str | None = None) -> str:
    """``uint16`` when every id fits (vocab <= 65536), else ``uint32``; a forced dtype too small for
    the vocabulary raises ValueError."""
    if dtype is None:
        return "uint16" if vocab <= 2**16 else "uint32"
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    limit = np.iinfo(TOKEN_DTYPES[dtype]).max + 1
    if vocab > limit:
        raise ValueError(f"a vocabulary of {vocab} tokens does not fit token dtype {dtype} (at most {limit} ids)")
    return dtype


class TokenDataset:
    """Read-only view of a shard folder as one token stream of ``num_tokens`` tokens."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no token shards at {self.path} (missing {META_FILE}); create them with `ratplus data prepare`"
            )
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a ratplus token-shard index")
        self.meta = meta
        self.dtype = token_dtype(int(meta["vocab_size"]), meta["dtype"])
        self.vocab_size = int(meta["vocab_size"])
        self.eos_id = int(meta["eos_id"])
        self._shards: list[np.ndarray] = []
        itemsize = np.dtype(TOKEN_DTYPES[self.dtype]).itemsize
        for s in meta["shards"]:
            f = self.path / s["file"]
            if not f.is_file():
                raise FileNotFoundError(f"token shard missing: {f}")
            if f.stat().st_size != s["num_tokens"] * itemsize:
                raise ValueError(
                    f"token shard {f} has {f.stat().st_size} bytes, expected {s['num_tokens'] * itemsize}: "
                    "it is truncated or was overwritten; prepare the data again"
                )
            self._shards.append(np.memmap(f, dtype=TOKEN_DTYPES[self.dtype], mode="r", shape=(s["num_tokens"],)))
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])  # shard i covers [off[i], off[i+1])
        self.num_tokens = int(self._offsets[-1])
        if self.num_tokens == 0:
            raise ValueError(f"the token shards at {self.path} are empty")

    def __len__(self) -> int:
        return self.num_tokens

    def tokenizer(self) -> Tokenizer | None:
        return folder_tokenizer(self.path)

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (crossing shard borders if needed)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream of {self.num_tokens}")
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        parts, pos, left = [], start, length
        while left > 0:
            lo = pos - int(self._offsets[i])
            take = min(left, len(self._shards[i]) - lo)
            parts.append(self._shards[i][lo : lo + take])
            pos, left, i = pos + take, left - take, i + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"the data at {self.path} has {self.num_tokens} tokens, too few for one window of "
                f"seq_len={seq_len} (needs seq_len + 1)"
            )

    def batch_at(self, starts: Sequence[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows beginning at ``starts``: input_ids (B, T) and labels (B, T), both int64.

        labels[b, t] = the token after input_ids[b, t], or -100 where input_ids[b, t] is EOS."""
        w = torch.from_numpy(np.stack([self.tokens(int(s), seq_len + 1) for s in starts]))  # (B, T + 1)
        x, y = w[:, :-1], w[:, 1:].clone()
        y[x == self.eos_id] = IGNORE_INDEX
        return x.contiguous(), y

    def random_windows(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of windows at uniform random offsets drawn from ``generator`` (one draw
        of ``batch_size`` offsets per batch, so the generator's state is the data position)."""
        self.check_seq_len(seq_len)
        high = self.num_tokens - seq_len  # a window needs seq_len + 1 tokens
        while True:
            starts = torch.randint(0, high, (batch_size,), generator=generator)
            yield self.batch_at(starts.tolist(), seq_len)

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of ``seq_len`` inputs (each needs one token more for its labels)."""
        return (self.num_tokens - 1) // seq_len

    def ordered_windows(
        self, batch_size: int, seq_len: int, start: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over non-overlapping windows in stream order: window i covers inputs
        [i T, (i + 1) T). Starts at window ``start``; the last batch may be smaller unless
        ``drop_last``."""
        self.check_seq_len(seq_len)
        n = self.num_windows(seq_len)
        for first in range(start, n, batch_size):
            idx = range(first, min(first + batch_size, n))
            if drop_last and len(idx) < batch_size:
                return
            yield self.batch_at([i * seq_len for i in idx], seq_len)
