"""Sparse attention on CPU: only the keys a pattern needs.

Shapes: B batch, H heads, T query length, S key length, K head dim. D/W/P: dilation, local window,
initial tokens. Reference: ``ratplus.ops.attention.reference.attention_reference``.

Two implementations:

``dilated_attention_cpu`` (the fast path, queries over a whole sequence, q_offset = 0).
  The key set splits into disjoint parts that are computed separately and merged exactly with
  their log-sum-exp:

  * dilated keys p = (j + 1) D - 1 with P <= p < t - W. Writing t = W + m D + r (0 <= r < D), query t
    sees exactly the strided keys j_lo <= j < m: a prefix of the strided keys that depends on the
    query's chunk m only. Queries are taken c chunks at a time (about 1024 rows): the keys every
    row of the group sees ("far", j < first chunk) go through one unmasked call of PyTorch's CPU
    flash kernel; the < c "near" keys that only later chunks see go through batched matmuls (few)
    or one masked flash call (many). Each row thus pays the kernel's fixed per-row cost about once,
    which at D = 64 is as large as the work on its ~T / 2D keys.
  * local + initial keys: the query itself when W = P = 0 (a dot product per position), otherwise a
    blocked flash call over [initial | band of W + block keys] with an additive mask.

  The parts of a row group are merged in one step (the weights from the log-sum-exps, then two
  passes over the group's fresh flash output and one write of the final rows).
  The backward is written by hand: with the *merged* output O and log-sum-exp L, the flash backward
  of each part recomputes P_j = exp(s_j - L) (the probability under the joint softmax) and
  rowsum(dO * O), so each part returns the exact gradient of the joint softmax for its own keys; the
  matmul part does the same in the open.

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


# ---- fast path: local part by query block, dilated part by chunk group, merged by log-sum-exp ----

Ranges = tuple[tuple[int, int, int], ...]  # key positions as (start, stop, step) slices


def _store(out: torch.Tensor, rows: slice, op, *args: torch.Tensor) -> None:
    """``op(*args, out=out[:, rows])``: the merged rows written in place, no temporary. While
    ``torch.compile`` traces, the op's result is copied in instead (Dynamo cannot trace ``out=`` into
    a strided view: a graph break per query group); the values are the same."""
    if torch.compiler.is_compiling():
        out[:, rows] = op(*args)
    else:
        op(*args, out=out[:, rows])


class _Segment:
    """One flash call of the local part: query rows [qs, qe) against the keys at ``ranges``, with
    an additive mask."""

    __slots__ = ("mask", "qe", "qs", "ranges")

    def __init__(self, qs: int, qe: int, ranges: Ranges, mask: torch.Tensor):
        self.qs, self.qe, self.ranges, self.mask = qs, qe, ranges, mask

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, T, K) -> (N, 1, S_seg, K)."""
        parts = [x[:, a:b:c] for a, b, c in self.ranges]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).unsqueeze(1)

    def scatter_add(self, dx: torch.Tensor, g: torch.Tensor) -> None:
        """dx: (N, T, K) += g: (N, 1, S_seg, K) at the segment's key positions."""
        off = 0
        for a, b, c in self.ranges:
            n = len(range(a, b, c))
            dx[:, a:b:c] += g[:, 0, off : off + n]
            off += n


class _Group:
    """The dilated keys of the query chunks m in [a, b) (rows ``rows``, see ``_Plan``):
    * far keys j in [j_lo, a), seen by every row: one unmasked flash call;
    * near keys j in [a, b - 1), each seen by the rows of the later chunks only (None when the
      group is a single chunk). A few are done with batched matmuls (``near_mask``: (n, R)
      additive, n = b - 1 - a); many with a masked flash call over the rows from chunk a + 1 on
      (``near_flash``, ``near_mask``: (R - D, n))."""

    __slots__ = ("a", "b", "near_flash", "near_mask", "rows")

    def __init__(self, a: int, b: int, rows: slice, near_mask: torch.Tensor | None, near_flash: bool):
        self.a, self.b, self.rows, self.near_mask, self.near_flash = a, b, rows, near_mask, near_flash


def _positions(ranges: Ranges, device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, c, device=device) for a, b, c in ranges])


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., T, K) x (..., T, K) -> (..., T) dot products; einsum avoids materialising a * b (5x faster)."""
    return torch.einsum("...k,...k->...", a, b)


def _additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


class _Plan:
    """Which calls cover S(t) for t in [0, T), split into disjoint key sets.

    Local part (window + initial keys): ``self_only`` when W = P = 0 (the query's own key, a dot
    product, no flash call); otherwise ``local`` segments by query block over [initial | band],
    which cover every row exactly once, in order.

    Dilated part: write u = t - W = m D + r with 0 <= r < D (chunk m, residue r). Query t sees
    exactly the strided keys j (position (j + 1) D - 1) with j_lo <= j < m, where j_lo is the first
    one at position >= P: a prefix of the strided keys that depends on the chunk only. Chunks
    m <= j_lo see no dilated key (rows below ``first_row``); ``groups`` cover the others, c chunks
    each (the last chunk may be partial): every row gets one unmasked flash call for the far keys
    of its group, plus its near keys (by matmuls, or by one masked flash call when there are many).
    """

    def __init__(self, T: int, pattern: AttentionPattern, local_block: int, group: int, dtype, device):
        W, P, D = pattern.local_size, pattern.initial_size, pattern.dilation_size
        self.D = D
        self.self_only = W == 0 and P == 0
        self.local: list[_Segment] = []
        if not self.self_only:
            # local window + initial keys, by query block: keys [0, min(P, lo)) and the band [lo, qe)
            for qs in range(0, T, local_block):
                qe = min(T, qs + local_block)
                lo = max(0, qs - W)
                ranges = (((0, min(P, lo), 1),) if min(P, lo) else ()) + ((lo, qe, 1),)
                t = torch.arange(qs, qe, device=device).unsqueeze(1)
                p = _positions(ranges, device).unsqueeze(0)
                keep = (p <= t) & ((p >= t - W) | (p < P))
                self.local.append(_Segment(qs, qe, ranges, _additive(keep, dtype)))
        self.groups: list[_Group] = []
        self.first_row = T
        if D is None or T <= W:
            return
        self.j_lo = j_lo = (P + D) // D - 1
        n_chunks = -(-(T - W) // D)  # the last one may be partial
        self.first_row = min(T, W + (j_lo + 1) * D)
        # c chunks per group: c * D rows share one flash call for their far keys (the kernel runs
        # faster per row on larger calls), and each row has up to c - 1 near keys.
        c = max(1, group // D)
        near_flash = c - 1 > _MAX_MATMUL_NEAR
        for a in range(j_lo + 1, n_chunks, c):
            b = min(n_chunks, a + c)
            rows = slice(W + a * D, min(T, W + b * D))
            near_mask = None
            if b - a > 1:
                m = (torch.arange(rows.start, rows.stop, device=device) - W).div(D, rounding_mode="floor")
                j = torch.arange(a, b - 1, device=device)
                if near_flash:  # (R - D, n): chunk a has no near key and stays out of the call
                    near_mask = _additive(j.unsqueeze(0) < m[D:].unsqueeze(1), dtype)
                else:
                    near_mask = _additive(j.unsqueeze(1) < m.unsqueeze(0), dtype)  # (n, R)
            self.groups.append(_Group(a, b, rows, near_mask, near_flash))

    def far(self, x: torch.Tensor, g: _Group) -> torch.Tensor:
        """(N, T, K) -> (N, a - j_lo, K) strided view: the far keys of the group, positions (j + 1) D - 1."""
        return x[:, self.D - 1 :: self.D][:, self.j_lo : g.a]

    def near(self, x: torch.Tensor, g: _Group) -> torch.Tensor:
        """(N, T, K) -> (N, b - 1 - a, K) strided view: the near keys of the group."""
        return x[:, self.D - 1 :: self.D][:, g.a : g.b - 1]


# Near keys per row up to which matmuls beat a second (masked) flash call; measured at T = 16K,
# K = 64: 15 near keys (D = 64) run faster as matmuls, 63 (D = 16) as a flash call.
_MAX_MATMUL_NEAR = 16


class _SegmentedAttention(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # records the (disabled) autocast state for backward
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        B, H, T, K = q.shape
        q3, k3, v3 = (x.view(B * H, T, K) for x in (q, k, v))  # (N, T, K), N = B * H
        out = torch.empty_like(q3)
        if plan.self_only:
            lse = _rowdot(q3, k3).mul_(scale)  # (N, T): the own key is the only local key
            first = slice(0, plan.first_row)
            out[:, first] = v3[:, first]  # rows with no dilated key
        else:
            lse = q3.new_empty(B * H, T)
            for seg in plan.local:  # disjoint, covering every row: the first touch writes
                rows = slice(seg.qs, seg.qe)
                qr, mask = q3[:, rows].unsqueeze(1), seg.mask
                o, l = _flash_fwd(qr, seg.gather(k3), seg.gather(v3), 0.0, False, attn_mask=mask, scale=scale)
                out[:, rows] = o.squeeze(1)
                lse[:, rows] = l.squeeze(1)
        base = v3 if plan.self_only else out  # the local part's output; its log-sum-exp is lse
        for g in plan.groups:
            rows = g.rows
            qr = q3[:, rows]  # (N, R, K)
            o, l = _flash_fwd(
                qr.unsqueeze(1), plan.far(k3, g).unsqueeze(1), plan.far(v3, g).unsqueeze(1), 0.0, False, scale=scale
            )
            o, l = o.squeeze(1), l.squeeze(1)  # (N, R, K), (N, R): fresh buffers, reused as scratch
            l_loc, b = lse[:, rows], base[:, rows]
            if g.near_mask is None:
                # two parts: out = base + w (o - base), w = exp(l - L), one pass
                new = torch.logaddexp(l_loc, l)
                _store(out, rows, torch.lerp, b, o, l.sub_(new).exp_().unsqueeze(-1))
            elif not g.near_flash:
                # three parts: far (o, l), local (b, l_loc) and the near keys, whose logits are
                # kept as (N, n, R) so that reductions run over rows, the contiguous dim
                s = torch.baddbmm(g.near_mask, plan.near(k3, g), qr.transpose(1, 2), alpha=scale)
                mx = torch.maximum(torch.maximum(l, l_loc), s.amax(1))  # (N, R), finite as l is
                p = s.sub_(mx.unsqueeze(1)).exp_()
                w_far, w_loc = l.sub_(mx).exp_(), (l_loc - mx).exp_()
                z = p.sum(1).add_(w_far).add_(w_loc)  # softmax denominator / exp(mx)
                new = z.log().add_(mx)
                z.reciprocal_()
                # out = w_far o + P_near V_near + w_loc b: two passes on o (fresh, in cache), one on out
                o.mul_(w_far.mul_(z).unsqueeze(-1)).baddbmm_(p.mul_(z.unsqueeze(1)).transpose(1, 2), plan.near(v3, g))
                _store(out, rows, torch.addcmul, o, b, w_loc.mul_(z).unsqueeze(-1))
            else:
                # three parts again, the near one from a masked flash call over the rows after chunk a
                D = plan.D
                o2, l2 = _flash_fwd(
                    qr[:, D:].unsqueeze(1), plan.near(k3, g).unsqueeze(1), plan.near(v3, g).unsqueeze(1), 0.0, False,
                    attn_mask=g.near_mask, scale=scale,
                )  # fmt: skip
                o2, l2 = o2.squeeze(1), l2.squeeze(1)  # (N, R - D, K), (N, R - D)
                mx = torch.maximum(l, l_loc)
                mx[:, D:] = torch.maximum(mx[:, D:], l2)
                w_far, w_loc, w_near = l.sub_(mx).exp_(), (l_loc - mx).exp_(), l2.sub_(mx[:, D:]).exp_()
                z = w_far + w_loc
                z[:, D:] += w_near
                new = z.log().add_(mx)
                z.reciprocal_()
                o.mul_(w_far.mul_(z).unsqueeze(-1))
                o[:, D:].addcmul_(o2, w_near.mul_(z[:, D:]).unsqueeze(-1))
                _store(out, rows, torch.addcmul, o, b, w_loc.mul_(z).unsqueeze(-1))
            lse[:, rows] = new
        ctx.save_for_backward(q3, k3, v3, out, lse)
        ctx.plan, ctx.scale, ctx.shape = plan, scale, (B, H, T, K)
        return out.view(B, H, T, K)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dout):
        q3, k3, v3, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        dout = dout.contiguous().view(q3.shape)
        delta = _rowdot(dout, out)  # (N, T): rowsum(dO * O) of the joint softmax
        if plan.self_only:
            p_self = (_rowdot(q3, k3) * scale - lse).exp()  # (N, T): joint-softmax weight of own key
            ds = p_self * (_rowdot(dout, v3) - delta)
            dq = (ds * scale).unsqueeze(-1) * k3
            dk = (ds * scale).unsqueeze(-1) * q3
            dv = p_self.unsqueeze(-1) * dout
        else:
            dq, dk, dv = torch.zeros_like(q3), torch.zeros_like(k3), torch.zeros_like(v3)
        for seg in plan.local:
            rows = slice(seg.qs, seg.qe)
            gq, gk, gv = _flash_bwd(
                dout[:, rows].unsqueeze(1), q3[:, rows].unsqueeze(1), seg.gather(k3), seg.gather(v3),
                out[:, rows].unsqueeze(1), lse[:, rows].unsqueeze(1), 0.0, False, attn_mask=seg.mask, scale=scale,
            )  # fmt: skip
            dq[:, rows] += gq.squeeze(1)
            seg.scatter_add(dk, gk)
            seg.scatter_add(dv, gv)
        for g in plan.groups:
            rows = g.rows
            qr, dor = q3[:, rows], dout[:, rows]
            # far keys: the flash backward with the merged O and L gives the joint-softmax gradient
            gq, gk, gv = _flash_bwd(
                dor.unsqueeze(1), qr.unsqueeze(1), plan.far(k3, g).unsqueeze(1), plan.far(v3, g).unsqueeze(1),
                out[:, rows].unsqueeze(1), lse[:, rows].unsqueeze(1), 0.0, False, scale=scale,
            )  # fmt: skip
            dq[:, rows] += gq.squeeze(1)
            plan.far(dk, g).add_(gk.squeeze(1))
            plan.far(dv, g).add_(gv.squeeze(1))
            if g.near_mask is None:
                continue
            if g.near_flash:
                sub = slice(rows.start + plan.D, rows.stop)
                gq, gk, gv = _flash_bwd(
                    dout[:, sub].unsqueeze(1), q3[:, sub].unsqueeze(1), plan.near(k3, g).unsqueeze(1),
                    plan.near(v3, g).unsqueeze(1), out[:, sub].unsqueeze(1), lse[:, sub].unsqueeze(1), 0.0, False,
                    attn_mask=g.near_mask, scale=scale,
                )  # fmt: skip
                dq[:, sub] += gq.squeeze(1)
                plan.near(dk, g).add_(gk.squeeze(1))
                plan.near(dv, g).add_(gv.squeeze(1))
                continue
            # near keys by matmuls, logits as (N, n, R): P = exp(s - L), dS = P (V dO^T - delta)
            kn, vn = plan.near(k3, g), plan.near(v3, g)
            p = torch.baddbmm(g.near_mask, kn, qr.transpose(1, 2), alpha=scale).sub_(lse[:, rows].unsqueeze(1)).exp_()
            ds = torch.bmm(vn, dor.transpose(1, 2)).sub_(delta[:, rows].unsqueeze(1)).mul_(p)
            dq[:, rows].baddbmm_(ds.transpose(1, 2), kn, alpha=scale)
            plan.near(dk, g).baddbmm_(ds, qr, alpha=scale)
            plan.near(dv, g).baddbmm_(p, dor)
        B, H, T, K = ctx.shape
        return dq.view(B, H, T, K), dk.view(B, H, T, K), dv.view(B, H, T, K), None, None


def default_group_size(T: int) -> int:
    # Query rows per group of the dilated part: the flash kernel runs fastest per row from 768 rows
    # on (its query block grows from 64 to 256), while the near keys per row grow with the group.
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
    rows per call of the dilated part.
    """
    if pattern.is_topk:
        raise ValueError("dilated_attention_cpu handles dilated/local patterns, not top-k")
    if not (q.shape == k.shape == v.shape):
        raise ValueError("dilated_attention_cpu needs q, k, v of one shape (B, H, T, K)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.is_autocast_enabled(q.device.type):
        # Under CPU autocast this op runs in float32, as autocast runs its float32-policy ops: the layer
        # hands over q, k~ after RoPE in float32 and v in bf16, the log-sum-exp merges need float32, and
        # on these CPUs bf16 matmuls are far slower than float32 ones. The output is float32.
        q, k, v = q.float(), k.float(), v.float()
    T = q.shape[-2]
    plan = _Plan(
        T, pattern, block_size or default_block_size(pattern), group_size or default_group_size(T), q.dtype, q.device
    )
    # Autocast stays off inside: it would recast the flash op's q, k, v but not the plan's additive masks.
    with torch.autocast(q.device.type, enabled=False):
        return _SegmentedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, float(scale))


__all__ = ["default_block_size", "dilated_attention_cpu", "sparse_attention_blocked"]
