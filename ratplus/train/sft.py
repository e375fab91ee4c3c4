"""SFT data: prompt/answer records (JSON lines) tokenized for answers-only training.

Shapes: B batch (records), T the longest record of the batch (tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ratplus.io.corpus import jsonl_objects
from ratplus.io.tokenizer import eos_id
from ratplus.train.shards import IGNORE_INDEX

#: Records per tokenizer call of ``SFTDataset``.
SFT_BATCH = 256


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
        # A record too long for max_len whatever its tokens is refused before any tokenizer call (one
        # call holds about 100 bytes per character): no token covers more characters than the longest
        # token string of the vocabulary (twice that, for normalizers that drop characters).
        per_token = 2 * max(len(t) for t in tokenizer.get_vocab(with_added_tokens=True))
        for n, (p, a) in enumerate(records):
            if len(p) + len(a) > (max_len + 1) * per_token:
                raise ValueError(
                    f"SFT record {n + 1} has {len(p) + len(a):,} characters (prompt {len(p):,} + answer {len(a):,}): "
                    f"more than the maximum sequence length of {max_len} tokens can hold with this tokenizer "
                    f"(at most {per_token // 2} characters per token)"
                )
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        for first in range(0, len(records), SFT_BATCH):  # ids kept, the tokenizer's encodings dropped per batch
            batch = records[first : first + SFT_BATCH]
            prompts = encode([p for p, _ in batch], add_special_tokens=False)
            answers = encode([a for _, a in batch], add_special_tokens=False)
            for n, (p, a) in enumerate(zip(prompts, answers), first):
                full = [*p.ids, *a.ids, self.eos_id]
                if len(full) - 1 > max_len:
                    raise ValueError(
                        f"SFT record {n + 1} has {len(full) - 1} tokens (prompt {len(p.ids)} + answer "
                        f"{len(a.ids)} + EOS, minus one) but the maximum sequence length is {max_len}"
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
