"""Readable reference attention: materialise the exact key set, softmax, weighted sum.

Shapes: B batch, H heads, T query length, S key length, K head dim.
Reference for every backend in ``ratplus.ops.attention``; memory is O(T * S), so keep inputs small.
"""

from __future__ import annotations

import torch

from ratplus.config import AttentionPattern
from ratplus.ops.attention.masks import dilated_mask


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q: (B, H, T, K), k/v: (B, H, S, K), mask: (T, S) or broadcastable bool. Returns (B, H, T, K)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhtk,bhsk->bhts", q, k) * scale  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bhsk->bhtk", probs, v)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q over k/v restricted to the pattern's key sets S(t) (docs/DESIGN.md section 3)."""
    mask = dilated_mask(pattern, q.shape[-2], k.shape[-2], q_offset, device=q.device)
    return masked_attention_reference(q, k, v, mask, scale)
