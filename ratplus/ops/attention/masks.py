"""Exact key sets of the attention patterns as boolean masks (docs/DESIGN.md section 3).

Shapes: T query length, S key length. D/W/P are pattern sizes (dilation, local window, initial).

``pattern_mask(pattern, T, S, q_offset)`` is True where query t may see key p. Queries sit at
absolute positions q_offset .. q_offset + T - 1, keys at 0 .. S - 1. These functions are the
definition every attention backend is tested against, so they are written as the set formulas.
"""

from __future__ import annotations

import torch

from ratplus.config import AttentionPattern


def dilated_mask(
    pattern: AttentionPattern, T: int, S: int, q_offset: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """(T, S) bool mask for a dense/dilated/local pattern."""
    if pattern.is_topk:
        raise ValueError("top-k patterns depend on the data; use ratplus.ops.attention.topk")
    t = torch.arange(q_offset, q_offset + T, device=device).unsqueeze(1)  # (T, 1)
    p = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    causal = p <= t
    if pattern.is_dense:
        return causal
    W, P = pattern.local_size, pattern.initial_size
    local = (p >= t - W) & causal
    initial = (p < P) & causal
    mask = local | initial
    if pattern.dilation_size is not None:
        D = pattern.dilation_size
        mask = mask | (((p + 1) % D == 0) & (p >= P) & (p < t - W))
    return mask


def mask_mod_values(pattern: AttentionPattern, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """The same predicate written elementwise on index tensors (FlexAttention's mask_mod form)."""
    causal = kv_idx <= q_idx
    if pattern.is_dense:
        return causal
    W, P = pattern.local_size, pattern.initial_size
    keep = causal & ((kv_idx >= q_idx - W) | (kv_idx < P))
    if pattern.dilation_size is not None:
        D = pattern.dilation_size
        keep = keep | (((kv_idx + 1) % D == 0) & (kv_idx >= P) & (kv_idx < q_idx - W))
    return keep
