"""SnapKV key selection (Li et al. 2024): which prompt keys a decoding cache keeps per KV head.

Shapes: B batch, H query heads, Hkv KV heads (G = H / Hkv query heads share one), T prompt length,
O observation window (the last O prompt queries), K head dim, C cache_size (keys kept besides the window).

After the prompt, the last O queries vote for the older keys: their softmax attention weights (each
window query over its causal keys) summed over the window queries and over the G query heads of a
KV head, then max-pooled over ``kernel`` neighbouring positions so a chosen key brings its
neighbours. The C keys with the most votes are kept, in position order, plus the O window keys;
among equal votes (max pooling makes plateaus) the earlier position wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def snapkv_votes(q_window: torch.Tensor, k: torch.Tensor, kernel: int, scale: float | None = None) -> torch.Tensor:
    """Pooled votes of the window queries for the keys older than the window.

    q_window (B, H, O, K): the last O prompt queries (after RoPE); k (B, Hkv, T, K): every prompt key
    (after RoPE), T > O. Returns (B, Hkv, T - O) float32."""
    B, H, O, K = q_window.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = K**-0.5 if scale is None else scale
    # query head h reads KV head h // G: view the query heads as (Hkv, G) and score per KV head
    qg = q_window.float().reshape(B, Hkv, G * O, K)  # (B, Hkv, G*O, K)
    scores = torch.einsum("bjqk,bjsk->bjqs", qg, k.float()) * scale  # (B, Hkv, G*O, T)
    q_pos = (T - O + torch.arange(O, device=k.device)).repeat(G)  # (G*O,) absolute position of each row
    causal = torch.arange(T, device=k.device) <= q_pos.unsqueeze(1)  # (G*O, T)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    votes = probs[..., : T - O].sum(dim=2)  # (B, Hkv, T - O)
    return F.max_pool1d(votes, kernel, stride=1, padding=kernel // 2)[..., : T - O]


def snapkv_select(
    q_window: torch.Tensor, k: torch.Tensor, cache_size: int, kernel: int, scale: float | None = None
) -> torch.Tensor:
    """Positions kept per KV head: (B, Hkv, min(T, C + O)) int64, ascending.

    q_window (B, H, O, K), k (B, Hkv, T, K) as in ``snapkv_votes``. A prompt of at most C + O
    tokens is kept whole."""
    B, Hkv, T = k.shape[:3]
    O = q_window.shape[2]
    if cache_size + O >= T:
        return torch.arange(T, device=k.device).expand(B, Hkv, T)
    votes = snapkv_votes(q_window, k, kernel, scale)
    # a stable sort: among equal votes (max pooling makes plateaus) the earlier position wins
    order = votes.sort(dim=-1, descending=True, stable=True).indices
    chosen = order[..., :cache_size].sort(dim=-1).values  # (B, Hkv, C)
    window = torch.arange(T - O, T, device=k.device).expand(B, Hkv, O)
    return torch.cat([chosen, window], dim=-1)
