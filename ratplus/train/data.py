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
``val/`` shard folders side by side.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ratplus.config import read_json
from ratplus.io.corpus import jsonl_objects
from ratplus.io.folder import replace_dir
from ratplus.io.tokenizer import TOKENIZER_FILE, eos_id, folder_tokenizer, vocab_size
from ratplus.runtime import writing

IGNORE_INDEX = -100
META_FILE = "meta.json"
FORMAT = "ratplus-token-shards"
#: Plays of the bundled corpus held out for validation (about 6% of the text).
VAL_PLAYS = ("the-tempest", "julius-caesar", "twelfth-night")
#: File suffixes a directory is read for (anything else in it is skipped).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".parquet")
TOKEN_DTYPES: dict[str, Any] = {"uint16": np.uint16, "uint32": np.uint32}


# ---- shards ----------------------------------------------------------------------------------------


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


def prepare_shards(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    shard_tokens: int = 2**26,
    dtype: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    desc: str = "tokenizing",
) -> Path:
    """Tokenize ``documents`` once into memory-mapped shards under ``out_dir`` (see module docstring).

    Each document is followed by the tokenizer's EOS token. Shards hold ``shard_tokens`` tokens
    (the last one fewer). The folder is built under a temporary name and renamed when complete, so
    an interrupted run never leaves a folder that looks finished. Returns ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not any(d.strip() for d in documents):
        raise ValueError("the corpus is empty (no non-blank document)")
    vocab, eos = vocab_size(tokenizer), eos_id(tokenizer)
    dtype = token_dtype(vocab, dtype)
    np_dtype = TOKEN_DTYPES[dtype]
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    # A full disk or another write error removes the temporary folder; an older ``out`` stays.
    needed = sum(len(d) for d in documents) // 2 * np.dtype(np_dtype).itemsize  # rough: 2 chars per token
    with writing(out, partial=[tmp], needed=needed):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        shards: list[dict[str, Any]] = []
        pending: list[np.ndarray] = []
        pending_len = 0

        def flush(final: bool) -> None:
            nonlocal pending, pending_len
            while pending_len >= shard_tokens or (final and pending_len):
                flat = np.concatenate(pending)
                n = min(shard_tokens, len(flat))
                name = f"shard_{len(shards):05d}.bin"
                with open(tmp / name, "wb") as f:
                    flat[:n].tofile(f)
                    f.flush()
                    os.fsync(f.fileno())
                shards.append({"file": name, "num_tokens": int(n)})
                pending, pending_len = ([flat[n:]] if n < len(flat) else []), len(flat) - n

        batch = 256  # documents per encode_batch call (the Rust side parallelises within a call)
        num_docs = 0
        with tqdm(total=len(documents), desc=desc, unit="doc", disable=not show_progress) as bar:
            for i in range(0, len(documents), batch):
                chunk = [d for d in documents[i : i + batch] if d.strip()]
                for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
                    ids = np.asarray([*enc.ids, eos], dtype=np.int64)
                    if ids.max() >= vocab:  # a tokenizer whose ids exceed its own vocab size
                        raise ValueError(f"token id {int(ids.max())} >= the tokenizer's vocab size {vocab}")
                    pending.append(ids.astype(np_dtype))
                    pending_len += len(ids)
                    num_docs += 1
                flush(final=False)
                bar.update(min(batch, len(documents) - i))
        flush(final=True)
        meta = {
            "format": FORMAT,
            "version": 1,
            "dtype": dtype,
            "vocab_size": vocab,
            "eos_id": eos,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": num_docs,
            "shards": shards,
        }
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_str())
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
    return out


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


# ---- SFT: prompt / answer records ------------------------------------------------------------------


def read_sft_records(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a JSON-lines file with records {"prompt": ..., "answer": ...}."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SFT data not found: {p}")
    records = []
    for where, r in jsonl_objects(p, ("prompt", "answer")):
        if not r["answer"]:
            raise ValueError(f"{where}: the answer is empty (there would be nothing to learn)")
        records.append((r["prompt"], r["answer"]))
    if not records:
        raise ValueError(f"the SFT file {p} holds no records")
    return records


class SFTDataset:
    """Tokenized prompt/answer pairs for answers-only training.

    A sequence is prompt + answer + EOS; labels are the next tokens with -100 wherever the target
    is a prompt token, so the loss covers the answer and the EOS that ends it. Batches are padded
    on the right (input EOS, label -100).
    """

    def __init__(self, records: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_len: int):
        self.eos_id = eos_id(tokenizer)
        self.examples: list[tuple[list[int], int]] = []  # (full token list, prompt length)
        prompts = tokenizer.encode_batch([p for p, _ in records], add_special_tokens=False)
        answers = tokenizer.encode_batch([a for _, a in records], add_special_tokens=False)
        for n, (p, a) in enumerate(zip(prompts, answers)):
            full = [*p.ids, *a.ids, self.eos_id]
            if len(full) - 1 > max_len:
                raise ValueError(
                    f"SFT record {n + 1} has {len(full) - 1} tokens (prompt {len(p.ids)} + answer {len(a.ids)} "
                    f"+ EOS, minus one) but the maximum sequence length is {max_len}"
                )
            self.examples.append((full, len(p.ids)))

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, labels (B, T) int64 for the given examples, T = the longest in the batch."""
        T = max(len(self.examples[i][0]) - 1 for i in indices)
        x = torch.full((len(indices), T), self.eos_id, dtype=torch.int64)
        y = torch.full((len(indices), T), IGNORE_INDEX, dtype=torch.int64)
        for b, i in enumerate(indices):
            full, n_prompt = self.examples[i]
            ids = torch.tensor(full, dtype=torch.int64)
            x[b, : len(full) - 1] = ids[:-1]
            y[b, : len(full) - 1] = ids[1:]
            y[b, : max(n_prompt - 1, 0)] = IGNORE_INDEX  # targets that are prompt tokens
        return x, y

    def batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batch(self, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of the endless shuffled stream: epoch e = index // batches_per_epoch uses
        the permutation seeded by ``seed + e``; the epoch's last batch is filled up with the first
        examples of the same permutation so every batch has ``batch_size`` rows."""
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, i = divmod(index, per_epoch)
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        picked = [perm[(i * batch_size + j) % len(self)] for j in range(batch_size)]
        return self.collate(picked)


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
