"""Sparse attention on CPU: only the keys a pattern needs.

Shapes: B batch, H heads, T query length, S key length, K head dim. D/W/P: dilation, local window,
initial tokens. Reference: ``ratplus.ops.attention.reference.attention_reference``.

Two implementations:

``dilated_attention_cpu`` (the fast path, queries over a whole sequence, q_offset = 0).
  The key set splits into two disjoint parts that are computed separately and merged exactly with
  their log-sum-exp:

  * dilated keys p = (j + 1) D - 1 with P <= p < t - W. Writing t = W + m D + r (0 <= r < D), query t
    sees exactly the strided keys j < m. So if queries are regrouped by r (a (D, M) grid, M query
    chunks) every row r is *plain causal attention* over the strided keys, shifted by one chunk.
    PyTorch's CPU flash kernel skips the masked half of causal attention, so this costs about
    T * (T / 2D) key visits: the FLOP saving of the pattern is realised, not masked away.
  * local + initial keys: the query itself when W = P = 0 (a dot product per position), otherwise a
    blocked flash call over [initial | band of W + block keys] with an additive mask.

  The backward is written by hand: with the *merged* output O and log-sum-exp L, the flash backward
  of each part recomputes P_j = exp(s_j - L) (the probability under the joint softmax) and
  rowsum(dO * O), so each part returns the exact gradient of the joint softmax for its own keys.

``sparse_attention_blocked`` (general: any q_offset; simpler, slower).
  For each query block, one SDPA call over [fully visible prefix | band] with a boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratplus.config import AttentionPattern
from ratplus.ops.attention.masks import mask_mod_values

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def default_block_size(pattern: AttentionPattern) -> int:
    # Small blocks waste less of the band on masked keys; below ~64 the per-call overhead dominates.
    return 64 if pattern.local_size <= 64 else 128


# ---- general blocked path ------------------------------------------------------------------------


def sparse_attention_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    q_offset: int = 0,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """q: (B, H, T, K) at positions q_offset..q_offset+T-1; k, v: (B, H, S, K) at 0..S-1 with
    S >= q_offset + T. Returns (B, H, T, K). Differentiable (SDPA's backward).

    For a block of queries [s, e): the initial keys p < min(P, s - W) and the dilated keys
    P <= p < s - W are visible to every query of the block (p < s - W <= t - W), so they form an
    unmasked prefix; the band [s - W, e) gets the exact per-(query, key) predicate."""
    if pattern.is_topk:
        raise ValueError("sparse_attention_blocked handles dense/dilated/local patterns, not top-k")
    T, S = q.shape[-2], k.shape[-2]
    if q_offset + T > S:
        raise ValueError(f"keys cover {S} positions but queries reach position {q_offset + T - 1}")
    W, P, D = pattern.local_size, pattern.initial_size, pattern.dilation_size
    Qb = block_size or default_block_size(pattern)
    strided_k = strided_v = None
    if D is not None:
        strided_k = k[:, :, D - 1 :: D]  # (B, H, S // D, K): keys at positions D-1, 2D-1, ...
        strided_v = v[:, :, D - 1 :: D]
    outs = []
    for qs in range(0, T, Qb):
        qe = min(T, qs + Qb)
        s, e = q_offset + qs, q_offset + qe  # absolute query positions of this block
        band_lo = max(0, s - W)
        n_init = min(P, band_lo)
        keys, values = [k[:, :, :n_init]], [v[:, :, :n_init]]
        n_prefix = n_init
        if strided_k is not None:
            j_lo, j_hi = (P + D) // D - 1, band_lo // D  # P <= (j+1)D-1 < band_lo
            if j_hi > j_lo:
                keys.append(strided_k[:, :, j_lo:j_hi])
                values.append(strided_v[:, :, j_lo:j_hi])
                n_prefix += j_hi - j_lo
        keys.append(k[:, :, band_lo:e])
        values.append(v[:, :, band_lo:e])
        q_pos = torch.arange(s, e, device=q.device).unsqueeze(1)  # (Qb, 1)
        k_pos = torch.arange(band_lo, e, device=q.device).unsqueeze(0)  # (1, band)
        band_mask = mask_mod_values(pattern, q_pos, k_pos)  # (Qb, band)
        mask = torch.cat([band_mask.new_ones(qe - qs, n_prefix), band_mask], dim=1)
        kb = torch.cat(keys, dim=2)
        vb = torch.cat(values, dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], kb, vb, attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2)


# ---- fast path: dilated keys by query group + local part, merged by log-sum-exp -----------------

Ranges = tuple[tuple[int, int, int], ...]  # key positions as (start, stop, step) slices


class _Segment:
    """One flash call: query rows [qs, qe) against the keys at ``ranges``, with an optional
    additive mask (None = every key visible to every row)."""

    __slots__ = ("mask", "qe", "qs", "ranges")

    def __init__(self, qs: int, qe: int, ranges: Ranges, mask: torch.Tensor | None):
        self.qs, self.qe, self.ranges, self.mask = qs, qe, ranges, mask

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, :, a:b:c] for a, b, c in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def scatter_add(self, dx: torch.Tensor, g: torch.Tensor) -> None:
        off = 0
        for a, b, c in self.ranges:
            n = len(range(a, b, c))
            dx[:, :, a:b:c] += g[:, :, off : off + n]
            off += n


def _positions(ranges: Ranges, device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, c, device=device) for a, b, c in ranges])


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., T, K) x (..., T, K) -> (..., T) dot products; einsum avoids materialising a * b (5x faster)."""
    return torch.einsum("...k,...k->...", a, b)


def _additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def _plan_segments(
    T: int, pattern: AttentionPattern, local_block: int, group: int, dtype, device
) -> tuple[bool, list[_Segment]]:
    """Split S(t) for all t into disjoint segments. Returns (self_only, segments); when self_only the
    local part is just the query's own key and is handled without a flash call."""
    W, P, D = pattern.local_size, pattern.initial_size, pattern.dilation_size
    segs: list[_Segment] = []
    self_only = W == 0 and P == 0
    if not self_only:
        # local window + initial keys, by query block: keys [0, min(P, lo)) and the band [lo, qe)
        for qs in range(0, T, local_block):
            qe = min(T, qs + local_block)
            lo = max(0, qs - W)
            ranges = (((0, min(P, lo), 1),) if min(P, lo) else ()) + ((lo, qe, 1),)
            t = torch.arange(qs, qe, device=device).unsqueeze(1)
            p = _positions(ranges, device).unsqueeze(0)
            keep = (p <= t) & ((p >= t - W) | (p < P))
            segs.append(_Segment(qs, qe, ranges, _additive(keep, dtype)))
    if D is None:
        return self_only, segs
    j_lo = (P + D) // D - 1  # first strided key (position (j + 1) D - 1) at position >= P
    for qs in range(0, T, group):
        qe = min(T, qs + group)
        # every query of the block sees strided keys j < j_a; the last one sees j < j_b
        j_a = max(j_lo, (qs - W) // D) if qs - W > 0 else j_lo
        j_b = max(j_lo, (qe - 1 - W) // D) if qe - 1 - W > 0 else j_lo
        if j_a > j_lo:
            segs.append(_Segment(qs, qe, ((j_lo * D + D - 1, j_a * D + D - 1, D),), None))
        if j_b > j_a:
            first_q = max(qs, (j_a + 1) * D + W)  # earliest query that sees strided key j_a
            ranges = ((j_a * D + D - 1, j_b * D + D - 1, D),)
            t = torch.arange(first_q, qe, device=device).unsqueeze(1)
            p = _positions(ranges, device).unsqueeze(0)
            segs.append(_Segment(first_q, qe, ranges, _additive(p < t - W, dtype)))
    return self_only, segs


class _SegmentedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, self_only: bool, segments: list[_Segment], scale: float):
        out = torch.empty_like(q)
        # Segments come ordered so that the first one to touch a row covers a contiguous range
        # starting at `filled`; later ones only revisit rows below it. The first touch writes the
        # row (no zero-init pass over the whole output), later ones merge by log-sum-exp.
        filled = 0
        if self_only:
            lse = _rowdot(q, k) * scale  # (B, H, T): the own key is the only local key
            self_rows = segments[0].qs if segments else q.shape[2]  # rows with no dilated key at all
            out[:, :, :self_rows] = v[:, :, :self_rows]
            filled = self_rows
        else:
            lse = q.new_empty(q.shape[:3])
        for seg in segments:
            if seg.qs > filled or (seg.qs < filled < seg.qe):
                raise AssertionError("segment order broke the first-touch invariant")  # a planner bug
            o, l = _flash_fwd(
                q[:, :, seg.qs : seg.qe], seg.gather(k), seg.gather(v), 0.0, False, attn_mask=seg.mask, scale=scale
            )
            rows = slice(seg.qs, seg.qe)
            l_old, out_rows = lse[:, :, rows], out[:, :, rows]
            if seg.qs >= filled and not self_only:
                out_rows.copy_(o)
                l_old.copy_(l)
            else:
                l_new = torch.logaddexp(l_old, l)
                w_new = l.sub(l_new).exp_().unsqueeze(-1)
                w_old = l_old.sub_(l_new).exp_().unsqueeze(-1)
                # out <- out * exp(l_old - l_new) + o * exp(l - l_new); fresh rows start from v (own key)
                torch.mul(v[:, :, rows] if seg.qs >= filled else out_rows, w_old, out=out_rows)
                out_rows.addcmul_(o, w_new)
                l_old.copy_(l_new)
            if seg.qs >= filled:
                filled = seg.qe
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.self_only, ctx.segments, ctx.scale = self_only, segments, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        dout = dout.contiguous()
        if ctx.self_only:
            p_self = (_rowdot(q, k) * scale - lse).exp()  # (B, H, T): joint-softmax weight of own key
            ds = p_self * (_rowdot(dout, v) - _rowdot(dout, out))
            dq = (ds * scale).unsqueeze(-1) * k
            dk = (ds * scale).unsqueeze(-1) * q
            dv = p_self.unsqueeze(-1) * dout
        else:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for seg in ctx.segments:
            rows = slice(seg.qs, seg.qe)
            gq, gk, gv = _flash_bwd(
                dout[:, :, rows],
                q[:, :, rows],
                seg.gather(k),
                seg.gather(v),
                out[:, :, rows].contiguous(),
                lse[:, :, rows].contiguous(),
                0.0,
                False,
                attn_mask=seg.mask,
                scale=scale,
            )
            dq[:, :, rows] += gq
            seg.scatter_add(dk, gk)
            seg.scatter_add(dv, gv)
        return dq, dk, dv, None, None, None


def default_group_size(T: int) -> int:
    # Large groups keep the unmasked prefix calls efficient; the masked diagonal part grows with them.
    return max(128, min(1024, T // 8))


def dilated_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    scale: float | None = None,
    block_size: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Pattern attention over a whole sequence: q, k, v (B, H, T, K) at positions 0..T-1.

    float32/float64 on CPU. Returns (B, H, T, K) with exact gradients for q, k, v. Must match
    ``attention_reference``. ``block_size``: query block of the local part; ``group_size``: query
    group of the dilated part.

    The key set splits into disjoint segments, each one call of PyTorch's CPU flash kernel that
    also returns its log-sum-exp; the results are merged exactly. Per query group [s, e):
      * dilated keys every query of the group sees (position < s - W): one unmasked call;
      * the few dilated keys only later queries of the group see: one small masked call;
      * local window and initial keys: masked calls by small query blocks (or, when W = P = 0, the
        query's own key as a plain dot product).
    The backward calls the flash backward of each segment with the *merged* output and
    log-sum-exp, so P_j = exp(s_j - L) is the joint-softmax probability and rowsum(dO * O) the joint
    one: each segment gets the exact gradient of the joint softmax for its own keys.
    """
    if pattern.is_topk:
        raise ValueError("dilated_attention_cpu handles dilated/local patterns, not top-k")
    if not (q.shape == k.shape == v.shape):
        raise ValueError("dilated_attention_cpu needs q, k, v of one shape (B, H, T, K)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    T = q.shape[-2]
    self_only, segments = _plan_segments(
        T, pattern, block_size or default_block_size(pattern), group_size or default_group_size(T), q.dtype, q.device
    )
    return _SegmentedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), self_only, segments, float(scale))


__all__ = ["default_block_size", "dilated_attention_cpu", "sparse_attention_blocked"]
