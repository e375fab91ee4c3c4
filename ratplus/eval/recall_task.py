"""The MQAR recall probe's task (``ratplus.eval.recall``): the sequences, their seed streams and how
an answer is scored.

Shapes: B batch (sequences), T sequence length, V vocab (filler + key + value tokens).

A body of filler tokens holds ``pairs`` key-value pairs written as two adjacent tokens ``k v``, at most
one per chunk of ``spread`` tokens and at a random offset inside it; then every key is queried once, in
random order, each followed by its value; only those answers are targets (the probe's docstring says
why it is built so). Train and test come from separate seed streams.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ratplus.config import check_ints
from ratplus.model.rat import RATPlusLM
from ratplus.train.data import IGNORE_INDEX

SPLITS = {"train": 0, "test": 1}  # separate seed streams: a test sequence is never a training one


# ---- the task ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallTask:
    """One MQAR setting. Token ids: filler [0, F), keys [F, F + K), values [F + K, F + K + V)."""

    pairs: int = 6
    spread: int = 16
    seq_len: int = 128
    filler_vocab: int = 16
    key_vocab: int = 64
    value_vocab: int = 64
    packed: bool = False

    def __post_init__(self) -> None:
        check_ints(self, ("pairs", "spread", "seq_len", "filler_vocab", "key_vocab", "value_vocab"), 1)
        if self.spread < 2:
            raise ValueError(f"spread must be >= 2 (a pair takes two tokens of its chunk), got {self.spread}")
        if self.key_vocab < self.pairs:
            raise ValueError(f"key_vocab={self.key_vocab} is too small for {self.pairs} distinct keys (pairs)")
        if self.value_vocab < self.pairs:
            raise ValueError(f"value_vocab={self.value_vocab} is too small for {self.pairs} distinct values (pairs)")
        if self.body_len < 2 * self.pairs:
            raise ValueError(
                f"seq_len={self.seq_len} is too short: {self.pairs} pairs need {2 * self.pairs} body tokens plus "
                f"{2 * self.pairs} query tokens"
            )
        if not self.packed and self.num_chunks < self.pairs:
            raise ValueError(
                f"pairs={self.pairs} is more than the {self.num_chunks} chunks of spread={self.spread} tokens "
                f"in the {self.body_len}-token body (seq_len={self.seq_len}); at most one pair per chunk"
            )

    @property
    def vocab_size(self) -> int:
        return self.filler_vocab + self.key_vocab + self.value_vocab

    @property
    def body_len(self) -> int:
        """Tokens before the queries; the queries take the last 2 * pairs tokens."""
        return self.seq_len - 2 * self.pairs

    @property
    def num_chunks(self) -> int:
        return self.body_len // self.spread

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RecallBatch:
    """input_ids (B, T) int64; labels (B, T) int64, -100 except where the next token is a queried value;
    ``pair_pos`` (B, pairs) body position of each pair's key (its value follows); ``query_pos`` (B, pairs)
    position of each queried key (its value, the answer, follows)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pair_pos: torch.Tensor
    query_pos: torch.Tensor


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], index])


def make_batch(task: RecallTask, batch_size: int, seed: int = 0, split: str = "train", index: int = 0) -> RecallBatch:
    """Batch ``index`` of the ``split`` stream of ``seed``: the same arguments give the same batch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rng = _rng(seed, split, index)
    n, T, F = task.pairs, task.seq_len, task.filler_vocab
    tokens = rng.integers(0, F, size=(batch_size, T))
    pair_pos = np.zeros((batch_size, n), dtype=np.int64)
    query_pos = np.zeros((batch_size, n), dtype=np.int64)
    labels = np.full((batch_size, T), IGNORE_INDEX, dtype=np.int64)
    for b in range(batch_size):
        keys = F + rng.choice(task.key_vocab, size=n, replace=False)
        values = F + task.key_vocab + rng.choice(task.value_vocab, size=n, replace=False)
        if task.packed:
            start = rng.integers(0, task.body_len - 2 * n + 1)
            pos = start + 2 * np.arange(n)
        else:
            chunks = np.sort(rng.choice(task.num_chunks, size=n, replace=False))
            # any offset that keeps both tokens inside the chunk: a value lands on the chunk end 1/(spread-1)
            pos = chunks * task.spread + rng.integers(0, task.spread - 1, size=n)
        tokens[b, pos], tokens[b, pos + 1] = keys, values
        order = rng.permutation(n)
        q = task.body_len + 2 * np.arange(n)
        tokens[b, q], tokens[b, q + 1] = keys[order], values[order]
        labels[b, q] = values[order]  # labels[t] is the token after input t: the answer follows its key
        pair_pos[b], query_pos[b] = pos, q
    return RecallBatch(
        torch.from_numpy(tokens).long(),
        torch.from_numpy(labels),
        torch.from_numpy(pair_pos),
        torch.from_numpy(query_pos),
    )


def batches(task: RecallTask, batch_size: int, seed: int, split: str, start: int = 0) -> Iterator[RecallBatch]:
    """The endless ``split`` stream of ``seed`` from batch ``start``."""
    i = start
    while True:
        yield make_batch(task, batch_size, seed, split, i)
        i += 1


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) greedy answers: argmax of logits (B, T, V) against labels (B, T) where labels != -100."""
    mask = labels != IGNORE_INDEX
    total = int(mask.sum())
    correct = int((logits.argmax(-1)[mask] == labels[mask]).sum())
    return correct, total


@torch.no_grad()
def answer_matrix(model: RATPlusLM, test: list[RecallBatch], pattern: str) -> torch.Tensor:
    """(N, pairs) bool: is the j-th query's greedy answer right, for every test sequence, under ``pattern``."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for b in test:
        pred = model(b.input_ids.to(device), pattern=pattern).argmax(-1)  # (B, T)
        qp = b.query_pos.to(device)
        out.append(pred.gather(1, qp) == b.labels.to(device).gather(1, qp))
    return torch.cat(out).cpu()


def evaluate_accuracy(model: RATPlusLM, test: list[RecallBatch], pattern: str) -> float:
    """Fraction of query answers right under ``pattern`` over the test batches."""
    return float(answer_matrix(model, test, pattern).float().mean())


def elimination_floor(pairs: int) -> list[float]:
    """Accuracy per query index of a model that binds nothing but rules out the values already answered.

    The answers are teacher-forced, so before the j-th query j of the ``pairs`` values are known; a model
    that only knows which values the body holds picks among the other ``pairs - j``: 1 / (pairs - j), a
    mean of about 41% at 6 pairs with the last answer always right. Only the first query (1 / pairs)
    measures retrieval cleanly; ``first_query`` in the probe's rows."""
    return [1 / (pairs - j) for j in range(pairs)]


def default_patterns(seq_len: int, local: int = 16) -> list[str]:
    """dense, D4..D32 (and D64 from T=512), D16 with a small window and initial tokens, a local-only
    control, top-k Quest and MoBA with about as many keys as D16 sees."""
    dils = [4, 8, 16, 32] + ([64] if seq_len >= 512 else [])
    block = max(4, seq_len // 32)
    top_k = max(1, seq_len // (16 * block))
    topk = f"topk-B{block}-K{top_k}-W{block}-P0"
    return ["dense", *(f"D{d}" for d in dils), "D16-W8-P4", f"local-W{local}-P0", f"{topk}-quest", f"{topk}-moba"]
