"""Admission by memory: the KV-cache bytes of one request, from the cache's own slot arithmetic.

A request of ``prompt + max_tokens`` tokens under a pattern needs, per layer and head group,
``SlotLayout.for_pattern(pattern, L).capacity`` slots (P + W + 1 + floor((L - 1) / D), the
``AttentionPattern.kv_slots`` formula with the clamps the cache applies to short sequences) of
2 (k, v) x h_kv x K elements, plus RAT+'s recurrent state (Hkv x 2K, at least float32) per layer:
``ratplus.model.cache.cache_nbytes``, exactly what ``RATPlusCache(config, pattern, 1, L).nbytes()``
allocates (tests/serve and tests/model check it), computed without allocating anything.

``KVBudget`` is the ledger the engine keeps: bytes reserved by the admitted requests (this formula)
against ``--kv-memory``. Admission itself goes by the bytes the pools really allocate (rows share
one cache length, rows may be spare), which are never fewer: ``ratplus.serve.pool`` and
``Engine._make_room`` keep the allocated bytes within the budget at every moment.
"""

from __future__ import annotations

import re
import threading

import torch

from ratplus.config import ModelConfig, PatternSpec
from ratplus.model.cache import cache_nbytes

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20}
_UNITS |= {"g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int, what: str = "--kv-memory") -> int:
    """``"4GiB"``, ``"512MB"``, ``"1e9"``, ``1000`` -> bytes (GiB = 2**30, GB = 10**9); ValueError naming ``what``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{what} must be a size such as 4GiB, 512MiB or 1000000 (bytes), got {text!r}")
        size = float(m.group(1)) * _UNITS[unit]
        if size >= 2**63:  # "1e999" is inf: no int, and no memory, holds it
            raise ValueError(f"{what} must be below 8 EiB (2**63 bytes), got {text!r}")
        value = int(size)
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return value


def kv_bytes(config: ModelConfig, pattern: PatternSpec, length: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the decode cache of one sequence of ``length`` tokens (prompt + max_tokens):
    ``ratplus.model.cache.cache_nbytes`` for a batch of one, slot patterns only."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    for layer in config.resolve_pattern(pattern):
        for p, _ in layer.groups:
            if p.inference_only:
                raise ValueError(f"pattern {p} has no fixed slot layout; the server decodes slot patterns only")
    return cache_nbytes(config, pattern, 1, length, dtype)


class KVBudget:
    """Bytes reserved by admitted requests against a fixed budget (thread-safe)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.in_use = 0
        self._lock = threading.Lock()

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.in_use + nbytes > self.budget:
                return False
            self.in_use += nbytes
            return True

    def reserve(self, nbytes: int) -> None:
        """Count an admitted request (the engine admits by the bytes its pools really allocate,
        which are never fewer: ``ratplus.serve.pool``)."""
        with self._lock:
            self.in_use += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.in_use -= nbytes


__all__ = ["KVBudget", "kv_bytes", "parse_bytes"]
