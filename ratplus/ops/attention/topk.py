"""Top-k block attention, an inference-time pattern (docs/DESIGN.md section 3).

Shapes: B batch, H heads, T query length, S key length, K head dim, N number of blocks.
Pattern sizes: block size ``Bs = pattern.block_size``, ``top_k``, W local window, P initial tokens.

Key set of the query at position t (keys at positions 0..S-1):

* initial  { p : p < P, p <= t }                                  always on
* local    { p : t - W <= p <= t }                                always on
* blocks   the keys of the ``top_k`` best-scoring *candidate blocks*

Blocks tile the keys from position P on: block b holds positions [P + b Bs, P + (b + 1) Bs).
Block b is a candidate for query t when it is complete and entirely older than the local window,
P + (b + 1) Bs <= t - W. So the three parts never overlap, and the few keys between the last
complete candidate block and the window (fewer than Bs) are not attended (the recurrence carries
them). With fewer than ``top_k`` candidates, every candidate is taken.

Block scores, from per-block summaries of the (post-RoPE) keys:

* ``quest``: score(q, b) = sum_i max(q_i kmax_i, q_i kmin_i), kmax/kmin the per-channel max/min of
  the block's keys (an upper bound of q . k over the block, as in Quest).
* ``moba``:  score(q, b) = q . mean(k over the block)  (as in MoBA).

Ties are broken by ``torch.topk``. Since max(q kmax, q kmin) = relu(q) kmax + min(q, 0) kmin for
kmax >= kmin, the fast paths compute Quest scores with two matmuls; the reference uses the
elementwise formula.

Three implementations, which must agree:

* ``topk_attention_reference``: readable; materialises the (T, S) mask per batch row and head.
* ``topk_attention``: prefill (any q_offset); the same selection by chunks of queries, each chunk
  one SDPA call with a boolean mask over the keys it can reach (memory O(chunk * S), compute like
  dense attention: top-k saves work at decode time, not at prefill).
* ``topk_decode_attention``: one query per row against a cache that holds every key plus the block
  summaries; gathers only initial + selected blocks + local keys (cost ~ S / Bs + top_k Bs + W + P).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratplus.config import AttentionPattern
from ratplus.ops.attention.reference import masked_attention_reference

# ---- block summaries and scores --------------------------------------------------------------------


def block_summaries(keys: torch.Tensor, pattern: AttentionPattern) -> tuple[torch.Tensor, ...]:
    """Summaries of consecutive complete blocks of ``keys`` (..., N * Bs, K).

    Returns ``(kmax, kmin)`` for Quest or ``(mean,)`` for MoBA, each (..., N, K) in the keys' dtype.
    """
    *lead, n, K = keys.shape
    Bs = pattern.block_size
    if n % Bs:
        raise ValueError(f"block_summaries needs whole blocks: {n} keys is not a multiple of block_size={Bs}")
    blocks = keys.reshape(*lead, n // Bs, Bs, K)  # (..., N, Bs, K)
    if pattern.scoring == "quest":
        return blocks.amax(dim=-2), blocks.amin(dim=-2)
    return (blocks.mean(dim=-2),)


def block_scores(q: torch.Tensor, summaries: tuple[torch.Tensor, ...], pattern: AttentionPattern) -> torch.Tensor:
    """Scores of every block for every query: q (..., T, K), summaries (..., N, K) -> (..., T, N)."""
    if pattern.scoring == "quest":
        kmax, kmin = summaries
        # max(q kmax, q kmin) per channel = relu(q) kmax + min(q, 0) kmin, since kmax >= kmin
        return q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)
    (mean,) = summaries
    return q @ mean.transpose(-1, -2)


def num_candidate_blocks(t: int, pattern: AttentionPattern) -> int:
    """Number of candidate blocks of the query at position t: blocks with P + (b + 1) Bs <= t - W."""
    return max(0, t - pattern.local_size - pattern.initial_size) // pattern.block_size


def _select(scores: torch.Tensor, t_pos: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """Boolean (..., T, N): block b chosen for query t. scores (..., T, N); t_pos (T,) absolute positions."""
    N = scores.shape[-1]
    n_cand = (t_pos - pattern.local_size - pattern.initial_size).clamp(min=0) // pattern.block_size  # (T,)
    candidate = torch.arange(N, device=scores.device) < n_cand.unsqueeze(-1)  # (T, N)
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    kk = min(pattern.top_k, N)
    if kk == 0:
        return chosen
    masked = scores.masked_fill(~candidate, float("-inf"))
    top = masked.topk(kk, dim=-1)
    # a query with fewer than top_k candidates also "selects" -inf blocks: drop those
    chosen.scatter_(-1, top.indices, top.values > float("-inf"))
    return chosen & candidate


def _always_on(pattern: AttentionPattern, t_pos: torch.Tensor, S: int) -> torch.Tensor:
    """(T, S) boolean: causal local window and initial keys."""
    p = torch.arange(S, device=t_pos.device)
    t = t_pos.unsqueeze(-1)
    return (p <= t) & ((p >= t - pattern.local_size) | (p < pattern.initial_size))


def _block_mask_to_keys(chosen: torch.Tensor, pattern: AttentionPattern, S: int) -> torch.Tensor:
    """Expand a (..., T, N) block choice to a (..., T, S) key mask (blocks start at position P)."""
    P, Bs = pattern.initial_size, pattern.block_size
    N = chosen.shape[-1]
    keys = chosen.repeat_interleave(Bs, dim=-1)  # (..., T, N * Bs): positions P .. P + N Bs - 1
    before = keys.new_zeros(*keys.shape[:-1], min(P, S))  # N = 0 when S <= P
    after = keys.new_zeros(*keys.shape[:-1], S - min(P, S) - N * Bs)
    return torch.cat([before, keys, after], dim=-1)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, q_offset: int) -> None:
    if not pattern.is_topk:
        raise ValueError(f"top-k attention needs a top-k pattern, got {pattern}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B,H,T,K), k, v (B,H,S,K); got {tuple(q.shape)}, {tuple(k.shape)}")
    if q_offset < 0 or q_offset + q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"queries at {q_offset}..{q_offset + q.shape[-2] - 1} need keys up to there, got {k.shape[-2]}"
        )


# ---- readable reference ------------------------------------------------------------------------------


def topk_mask_reference(q: torch.Tensor, k: torch.Tensor, pattern: AttentionPattern, q_offset: int = 0) -> torch.Tensor:
    """(B, H, T, S) bool: the key set of every query, written out from the module docstring with
    per-block slicing and the elementwise Quest formula. q (B, H, T, K), k (B, H, S, K)."""
    B, H, T, _ = q.shape
    S = k.shape[-2]
    P, W, Bs = pattern.initial_size, pattern.local_size, pattern.block_size
    N = max(0, S - P) // Bs  # complete blocks among the keys
    per_block = []  # score of block b for every query: (B, H, T)
    for b in range(N):
        block = k[:, :, P + b * Bs : P + (b + 1) * Bs]  # (B, H, Bs, K)
        if pattern.scoring == "quest":
            kmax, kmin = block.amax(dim=2, keepdim=True), block.amin(dim=2, keepdim=True)  # (B, H, 1, K)
            per_block.append(torch.maximum(q * kmax, q * kmin).sum(-1))
        else:
            per_block.append((q * block.mean(dim=2, keepdim=True)).sum(-1))
    mask = torch.zeros(B, H, T, S, dtype=torch.bool, device=q.device)
    for i in range(T):
        t = q_offset + i
        mask[:, :, i, : t + 1] = torch.tensor([p >= t - W or p < P for p in range(t + 1)])  # window, initial
        candidates = [b for b in range(N) if P + (b + 1) * Bs <= t - W]  # complete, older than the window
        kk = min(pattern.top_k, len(candidates))
        if kk == 0:
            continue
        scores = torch.stack([per_block[b][:, :, i] for b in candidates], dim=-1)  # (B, H, n_cand)
        chosen = scores.topk(kk, dim=-1).indices  # (B, H, kk), candidates are blocks 0..n_cand-1
        for off in range(Bs):
            mask[:, :, i].scatter_(-1, P + chosen * Bs + off, True)
    return mask


def topk_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, H, T, K) at positions q_offset.., k, v (B, H, S, K) at 0..S-1 -> (B, H, T, K):
    softmax over the keys of ``topk_mask_reference``."""
    _check(q, k, v, pattern, q_offset)
    return masked_attention_reference(q, k, v, topk_mask_reference(q, k, pattern, q_offset), scale)


# ---- prefill (any number of queries) -----------------------------------------------------------------


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    q_offset: int = 0,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Top-k block attention of q (B, H, T, K) at positions q_offset.. over k, v (B, H, S, K).

    Returns (B, H, T, K). Must match ``topk_attention_reference``. Queries are processed in chunks
    (``chunk_size``, default: about 4M mask entries per chunk), each chunk one masked SDPA call over
    the keys [0, last query of the chunk]."""
    _check(q, k, v, pattern, q_offset)
    B, H, T, _ = q.shape
    S = k.shape[-2]
    P, Bs = pattern.initial_size, pattern.block_size
    N = max(0, S - P) // Bs
    summaries = block_summaries(k[:, :, P : P + N * Bs], pattern)  # (B, H, N, K) each
    if chunk_size is None:
        chunk_size = max(1, (1 << 22) // max(1, B * H * S))
    outs = []
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        S_e = q_offset + e  # keys a query of this chunk can reach
        t_pos = torch.arange(q_offset + s, q_offset + e, device=q.device)
        qc = q[:, :, s:e]
        chosen = _select(block_scores(qc, summaries, pattern), t_pos, pattern)  # (B, H, Tc, N)
        mask = _block_mask_to_keys(chosen, pattern, S)[..., :S_e] | _always_on(pattern, t_pos, S_e)
        outs.append(F.scaled_dot_product_attention(qc, k[:, :, :S_e], v[:, :, :S_e], attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2)


# ---- decode (one query per row, keys in a cache) -----------------------------------------------------


def topk_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: tuple[torch.Tensor, ...],
    t: int,
    pattern: AttentionPattern,
    scale: float | None = None,
) -> torch.Tensor:
    """One query per row at position t: q (B, H, 1, K); k_cache, v_cache (B, H, >= t + 1, K) hold the
    keys of positions 0..t at their positions; ``summaries`` (B, H, >= n_cand, K) as
    ``block_summaries`` for the complete blocks. Returns (B, H, 1, K), equal to ``topk_attention``
    for that query. Reads only the summaries and the keys it attends to."""
    P, W, Bs = pattern.initial_size, pattern.local_size, pattern.block_size
    B, H, _, K = q.shape
    lo = max(0, t - W)  # local window [lo, t]
    n_init = min(P, lo)  # initial keys not inside the window
    n_cand = num_candidate_blocks(t, pattern)
    kk = min(pattern.top_k, n_cand)
    n_always = n_init + t + 1 - lo
    if kk == n_cand:  # every candidate is chosen (or none exists): contiguous slices, no scoring
        keys = torch.cat([k_cache[:, :, :n_init], k_cache[:, :, P : P + kk * Bs], k_cache[:, :, lo : t + 1]], dim=2)
        values = torch.cat([v_cache[:, :, :n_init], v_cache[:, :, P : P + kk * Bs], v_cache[:, :, lo : t + 1]], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale)
    scores = block_scores(q, tuple(s[:, :, :n_cand] for s in summaries), pattern)  # (B, H, 1, n_cand)
    blocks = scores.squeeze(-2).topk(kk, dim=-1).indices  # (B, H, kk)
    # one buffer [initial | local | chosen blocks]; whole blocks are copied as rows of Bs * K values
    # with index_select (several times faster than an element-wise gather)
    keys = k_cache.new_empty(B, H, n_always + kk * Bs, K)
    values = torch.empty_like(keys)
    chosen = blocks.flatten(0, 1).unbind(0)  # B * H index vectors (kk,)
    for buf, cache in ((keys, k_cache), (values, v_cache)):
        buf[:, :, :n_init] = cache[:, :, :n_init]
        buf[:, :, n_init:n_always] = cache[:, :, lo : t + 1]
        sources = cache[:, :, P : P + n_cand * Bs].flatten(0, 1).unbind(0)  # B * H (n_cand * Bs, K)
        targets = buf[:, :, n_always:].flatten(0, 1).unbind(0)  # B * H (kk * Bs, K)
        for src, idx, dst in zip(sources, chosen, targets):
            torch.index_select(src.reshape(n_cand, Bs * K), 0, idx, out=dst.view(kk, Bs * K))
    return F.scaled_dot_product_attention(q, keys, values, scale=scale)


__all__ = [
    "block_scores",
    "block_summaries",
    "num_candidate_blocks",
    "topk_attention",
    "topk_attention_reference",
    "topk_decode_attention",
    "topk_mask_reference",
]
