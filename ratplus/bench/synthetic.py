"""Benchmark-only cache filling (``ratplus bench decode``): a decode step timed at a long context
without running the prefill. Shapes: B batch, H heads, S cached keys, K head dim."""

from __future__ import annotations

import torch

from ratplus.model.cache import RATPlusCache
from ratplus.ops.attention.topk import block_summaries


def fill_synthetic_(cache: RATPlusCache, seq_len: int, generator: torch.Generator | None = None) -> None:
    """Make an empty ``cache`` look as if ``seq_len`` tokens were seen, with random keys, values,
    block summaries and states: per-token decode cost does not depend on the values, and a real
    prefill of a long context would take longer than the measurement."""
    if any(cache.lengths):
        raise ValueError("fill_synthetic_ needs an empty cache")
    if not 0 < seq_len < cache.max_len:
        raise ValueError(f"seq_len must be in [1, max_len={cache.max_len}), got {seq_len}")
    for layer in cache.layers:
        for g in layer.groups:
            S = g.num_valid(seq_len)
            for buf in (g.k, g.v):
                # tile one random block (a prime length, so blocks do not repeat in step): drawing
                # gigabytes of normals would take longer than the benchmark itself
                tile = torch.randn(*buf.shape[:2], min(S, 1021), buf.shape[-1], generator=generator).to(buf)
                for s in range(0, S, tile.shape[2]):
                    e = min(S, s + tile.shape[2])
                    buf[:, :, s:e] = tile[:, :, : e - s]
            if g.summaries:
                P, Bs = g.pattern.initial_size, g.pattern.block_size
                nb = min(max(0, seq_len - P) // Bs, g.summaries[0].shape[-2])
                for dst, src in zip(g.summaries, block_summaries(g.k[:, :, P : P + nb * Bs], g.pattern)):
                    dst[:, :, :nb] = src
        if layer.state is not None:
            layer.state.normal_(generator=generator)
    cache.lengths = [seq_len] * cache.batch_size
    cache.seq_len = seq_len
