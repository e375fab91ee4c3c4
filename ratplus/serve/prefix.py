"""Prefix snapshots: a prompt prefix shared by many requests (a system prompt, few-shot examples) is
prefilled once.

Shapes: h_kv KV heads of a head group, S_m filled slots after m tokens, K head dim, Hkv all KV heads.

Why this is cheap for RAT+: after m tokens the decode cache of one sequence is small and exact:
per head group the filled slots ``[0, num_valid(m))`` (the P initial tokens, the W + 1 window, the
dilated tokens: ``SlotLayout``) and per layer the recurrent state (k~, v~ of token m - 1). Those
tensors *are* the state after the prefix: restoring them into a fresh row and prefilling the rest
of the prompt gives the same cache as prefilling the whole prompt.

Exactness: the server prefills in chunks of ``--prefill-chunk`` tokens. Snapshots are taken only at
chunk boundaries (m a multiple of the chunk), so a request that restores m tokens then prefills its
remaining chunks at exactly the boundaries a cold prefill uses: bit for bit the same cache and the
same tokens (tests/serve/test_prefix_cache.py). The slots of a token depend only on its position and
P, W, D (``ratplus.serve.pool``), so a snapshot taken in a pool of one length restores into a pool
of another.

Keys: per pattern, a chain of blake2b digests over the prompt's blocks of ``block`` token ids, so a
lookup walks the prompt once and finds the longest stored prefix shorter than the prompt (at least
one token is left to prefill: its logits give the first token). Bytes: the snapshots' tensors,
bounded by ``--prefix-cache-memory`` (separate from ``--kv-memory``), least recently used evicted
first.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ratplus.model.cache import RATPlusCache


@dataclass
class _Snapshot:
    tokens: int
    tensors: list[torch.Tensor]  # per head group k, v (1, h_kv, S_m, K), then per layer the state (1, Hkv, 2K)
    nbytes: int


def _digests(ids: list[int], block: int, upto: int) -> list[bytes]:
    """Digest of ids[: (j + 1) * block] for each whole block j below ``upto`` tokens (a chain)."""
    out, h = [], b""
    for j in range(upto // block):
        block_bytes = torch.tensor(ids[j * block : (j + 1) * block], dtype=torch.int64).numpy().tobytes()
        h = hashlib.blake2b(h + block_bytes, digest_size=16).digest()
        out.append(h)
    return out


class PrefixCache:
    """Snapshots of one-row caches after m prompt tokens (module docstring); thread-safe counters.
    ``budget`` bytes (0: off), snapshots every ``block`` tokens (the prefill chunk)."""

    def __init__(self, budget: int, block: int):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"--prefix-cache-memory must be a size >= 0 (0 = off), got {budget!r}")
        self.budget, self.block = budget, block
        self._entries: collections.OrderedDict[tuple[str, bytes], _Snapshot] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.lookups = self.evictions = 0
        self.tokens_reused = self.tokens_prompt = 0

    def restore(self, pattern: str, prompt: list[int], view: RATPlusCache) -> int:
        """Copy the longest stored prefix of ``prompt`` (shorter than it) into the fresh one-row cache
        ``view``; returns its length in tokens (0: none)."""
        if not self.budget:
            return 0
        keys = _digests(prompt, self.block, len(prompt) - 1)
        with self._lock:
            self.lookups += 1
            found = None
            for key in reversed(keys):
                found = self._entries.get((pattern, key))
                if found is not None:
                    self._entries.move_to_end((pattern, key))
                    break
            if found is None:
                return 0
            self.hits += 1
        dst = _row_tensors(view)
        if any(s.shape[2] > d.shape[2] for s, d in zip(found.tensors, dst) if s.dim() == 4):
            return 0  # cannot happen while the row holds the whole prompt (module docstring); stay exact
        for s, d in zip(found.tensors, dst, strict=True):
            if s.dim() == 4:
                d[:, :, : s.shape[2]] = s
            else:
                d.copy_(s)
        return found.tokens

    def store(self, pattern: str, prefix: list[int], view: RATPlusCache) -> None:
        """Keep a snapshot of ``view`` (one row holding exactly ``prefix``) when ``len(prefix)`` is a
        whole number of blocks and none is stored for it; evicts the least recently used to fit."""
        m = len(prefix)
        if not self.budget or m == 0 or m % self.block:
            return
        key = (pattern, _digests(prefix, self.block, m)[-1])
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        views = []
        for layer in view.layers:
            for g in layer.groups:
                n = g.layout.num_valid(m)
                views += [g.k[:, :, :n], g.v[:, :, :n]]
        views += [layer.state for layer in view.layers if layer.state is not None]
        nbytes = sum(t.nbytes for t in views)
        if nbytes > self.budget:
            return
        with self._lock:  # room first, then the copy: the snapshots never pass their budget
            while self.nbytes + nbytes > self.budget:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
            self._entries[key] = _Snapshot(m, [t.clone() for t in views], nbytes)
            self.nbytes += nbytes

    def count(self, reused: int, prompt: int) -> None:
        with self._lock:
            self.tokens_reused += reused
            self.tokens_prompt += prompt

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget": self.budget,
                "bytes": self.nbytes,
                "entries": len(self._entries),
                "lookups": self.lookups,
                "hits": self.hits,
                "evictions": self.evictions,
                "tokens_reused": self.tokens_reused,
                "tokens_prompt": self.tokens_prompt,
            }


def _row_tensors(view: RATPlusCache) -> list[torch.Tensor]:
    """The one-row cache's tensors in snapshot order."""
    out = [t for layer in view.layers for g in layer.groups for t in (g.k, g.v)]
    return out + [layer.state for layer in view.layers if layer.state is not None]


__all__ = ["PrefixCache"]
