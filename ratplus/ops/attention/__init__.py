"""Attention over the RAT+ patterns (docs/DESIGN.md section 3).

Shapes: B batch, H heads, T query length, S key length, K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratplus.config import AttentionPattern, HeadGroups
from ratplus.ops.attention.masks import dilated_mask, mask_mod_values
from ratplus.ops.attention.reference import attention_reference, masked_attention_reference
from ratplus.ops.attention.sparse import dilated_attention_cpu, sparse_attention_blocked
from ratplus.ops.dispatch import ATTENTION_BACKENDS, announce, choose_attention_backend


def _covers_all_keys(pattern: AttentionPattern, S: int) -> bool:
    """True when the pattern sees every causal key at this length (then plain causal SDPA is exact)."""
    return pattern.is_dense or (not pattern.is_topk and pattern.local_size >= S - 1)


def _single(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    backend: str,
    q_offset: int,
    scale: float | None,
) -> torch.Tensor:
    T, S = q.shape[-2], k.shape[-2]
    if pattern.is_snapkv:  # SnapKV only evicts from the decoding cache: over a whole sequence it is dense
        pattern = AttentionPattern()
    if backend == "auto":
        backend = "sdpa" if _covers_all_keys(pattern, S) else choose_attention_backend(pattern, q.device)
        announce("attention", backend, q.device)
    if backend == "reference":
        if pattern.is_topk:
            from ratplus.ops.attention.topk import topk_attention_reference

            return topk_attention_reference(q, k, v, pattern, q_offset, scale)
        return attention_reference(q, k, v, pattern, q_offset, scale)
    if backend == "sdpa":
        if _covers_all_keys(pattern, S):
            if q_offset == 0 and T == S:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            mask = dilated_mask(AttentionPattern(), T, S, q_offset, device=q.device)
        else:
            mask = dilated_mask(pattern, T, S, q_offset, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if backend == "sparse":
        if q_offset == 0 and T == S and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
            return dilated_attention_cpu(q, k, v, pattern, scale)
        return sparse_attention_blocked(q, k, v, pattern, q_offset, scale)
    if backend == "flex":
        from ratplus.ops.attention.flex import flex_attention_pattern

        return flex_attention_pattern(q, k, v, pattern, q_offset, scale)
    if backend == "topk":
        from ratplus.ops.attention.topk import topk_attention

        return topk_attention(q, k, v, pattern, q_offset, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


def repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """Grouped-query attention's key/value heads for every query head: (B, Hkv, S, K) ->
    (B, Hkv x group, S, K), KV head j serving query heads j*group .. (j+1)*group - 1."""
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern | HeadGroups | str | None = None,
    backend: str = "auto",
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q (B, H, T, K) over k, v (B, H, S, K) restricted to the pattern's key sets.

    Queries sit at absolute positions q_offset .. q_offset + T - 1 (0 for a full sequence), keys at
    0 .. S - 1. ``pattern`` may be one pattern for all heads, a ``HeadGroups`` mix over consecutive
    heads, a pattern string, or None (dense causal). Scale defaults to K^-0.5.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention expects q (B,H,T,K) and k, v (B,H,S,K); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q_offset + q.shape[-2] > k.shape[-2]:
        raise ValueError(f"queries reach position {q_offset + q.shape[-2] - 1} but only {k.shape[-2]} keys given")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    H = q.shape[1]
    if pattern is None:
        pattern = AttentionPattern()
    if isinstance(pattern, str):
        pattern = HeadGroups.parse(pattern, H)
    if isinstance(pattern, AttentionPattern):
        return _single(q, k, v, pattern, backend, q_offset, scale)
    if pattern.num_heads != H:
        raise ValueError(f"pattern {pattern} covers {pattern.num_heads} heads but the input has {H}")
    if len(pattern.groups) == 1:
        return _single(q, k, v, pattern.groups[0][0], backend, q_offset, scale)
    outs, h0 = [], 0
    for sub, n in pattern.groups:
        sl = slice(h0, h0 + n)
        outs.append(_single(q[:, sl], k[:, sl], v[:, sl], sub, backend, q_offset, scale))
        h0 += n
    return torch.cat(outs, dim=1)


__all__ = [
    "ATTENTION_BACKENDS",
    "attention",
    "attention_reference",
    "dilated_attention_cpu",
    "dilated_mask",
    "mask_mod_values",
    "masked_attention_reference",
    "repeat_kv",
    "sparse_attention_blocked",
]
