"""Chunked gated scan with an exact hand-written backward (fast path on CPU, works on any device).

Shapes: B batch, H heads, T time, K head dim. Reference: ``ratplus.ops.scan.reference.gated_scan_reference``.

Forward solves the linear recurrence h_t = a_t h_{t-1} + b_t with a = g and b = (1 - g) x.
Time is cut into N chunks of L steps. Pass 1 runs the recurrence inside every chunk at once from a
zero state (L vectorised steps) while tracking the running product of gates; pass 2 carries the
true state across chunk boundaries (N small steps); pass 3 adds carry * product. That is about
2 sqrt(T) Python-level steps instead of T, and it only multiplies gates (no exp/log of cumulative
sums), so tiny gates underflow harmlessly to zero instead of overflowing.

Backward is the same recurrence run in reverse (docs/DESIGN.md section 2 notes): with u_t = dL/dh_t,
    c_t = u_t + g_{t+1} c_{t+1}          (from the end)
    dL/dx_t = (1 - g_t) c_t,  dL/dg_t = (h_{t-1} - x_t) c_t,  dL/dh0 = g_0 c_0.
Autograd through the loops would store every intermediate; this stores only g, x and h.
"""

from __future__ import annotations

import math

import torch


def _chunk_len(T: int) -> int:
    return max(1, math.isqrt(T))


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool = False) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t over dim -2 of (..., T, K) tensors; h0: (..., K) or None. No autograd.

    ``reverse=True`` runs from the end instead: h_t = a_t h_{t+1} + b_t with h_T = h0.
    Inputs may be strided views (e.g. heads transposed out of a (B, T, C) projection): splitting T
    into (N, L) is still a view, so nothing is copied on the way in."""
    *lead, T, K = b.shape
    L = _chunk_len(T)
    N = -(-T // L)
    pad = N * L - T
    if pad:
        # Padding at the end: b = 0 and a zero state keep it from touching real steps either way.
        a = torch.cat([a, a.new_ones(*lead, pad, K)], dim=-2)
        b = torch.cat([b, b.new_zeros(*lead, pad, K)], dim=-2)
    a = a.reshape(*lead, N, L, K)  # (..., N, L, K)
    b = b.reshape(*lead, N, L, K)
    steps = range(L - 2, -1, -1) if reverse else range(1, L)
    edge, exit_ = (L - 1, 0) if reverse else (0, L - 1)
    if torch.compiler.is_compiling():
        local, prod = _in_chunk_functional(a, b, steps, edge, reverse)
    else:
        local = torch.empty(*lead, N, L, K, dtype=b.dtype, device=b.device)  # in-chunk scan from a zero state
        prod = torch.empty_like(local)  # product of the gates between a step and its chunk's entry edge
        local[..., edge, :] = b[..., edge, :]
        prod[..., edge, :] = a[..., edge, :]
        for i in steps:
            j = i + 1 if reverse else i - 1  # the step before i in scan order
            torch.addcmul(b[..., i, :], a[..., i, :], local[..., j, :], out=local[..., i, :])
            torch.mul(prod[..., j, :], a[..., i, :], out=prod[..., i, :])
    # carry[n] = true state entering chunk n (from the left, or from the right when reverse)
    carry = torch.empty_like(local[..., :, 0, :])  # (..., N, K)
    state = torch.zeros_like(carry[..., 0, :]) if h0 is None else h0.to(b.dtype)
    for n in range(N - 1, -1, -1) if reverse else range(N):
        carry[..., n, :] = state
        state = torch.addcmul(local[..., n, exit_, :], prod[..., n, exit_, :], state)
    h = torch.addcmul(local, prod, carry.unsqueeze(-2))
    return h.reshape(*lead, N * L, K)[..., :T, :]


def _in_chunk_functional(
    a: torch.Tensor, b: torch.Tensor, steps: range, edge: int, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of ``linear_scan`` without ``out=``: the same ops, each step a new tensor, stacked at
    the end. Used while ``torch.compile`` traces: Dynamo cannot trace ``out=`` into a strided view (a
    graph break per call), and Inductor fuses the steps anyway. a, b (..., N, L, K) -> local, prod."""
    local, prod = [b[..., edge, :]], [a[..., edge, :]]  # each (..., N, K), in scan order
    for i in steps:
        local.append(torch.addcmul(b[..., i, :], a[..., i, :], local[-1]))
        prod.append(prod[-1] * a[..., i, :])
    if reverse:  # scan order runs from the end: put the steps back in time order
        local, prod = local[::-1], prod[::-1]
    return torch.stack(local, dim=-2), torch.stack(prod, dim=-2)


class _GatedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        h = linear_scan(g, torch.addcmul(x, g, x, value=-1), h0)  # b = (1 - g) x in one pass
        ctx.save_for_backward(g, x, h, h0 if h0 is not None else torch.empty(0))
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        g, x, h, h0 = ctx.saved_tensors
        # c_t = u_t + g_{t+1} c_{t+1}: a reverse scan whose gate is g shifted by one step.
        g_next = torch.empty_like(g)
        g_next[..., :-1, :] = g[..., 1:, :]
        g_next[..., -1, :] = 0
        c = linear_scan(g_next, grad_h, None, reverse=True)
        grad_x = torch.addcmul(c, g, c, value=-1) if ctx.needs_input_grad[1] else None  # (1 - g) c
        grad_g = None
        if ctx.needs_input_grad[0]:
            # (h_{t-1} - x_t) c_t, with h_{-1} = h0 (or 0); no out= into a view, so Dynamo traces it too
            first = (h0 - x[..., 0, :]) if ctx.has_h0 else -x[..., 0, :]
            grad_g = torch.cat([first.unsqueeze(-2), h[..., :-1, :] - x[..., 1:, :]], dim=-2).mul_(c)
        grad_h0 = g[..., 0, :] * c[..., 0, :] if (ctx.has_h0 and ctx.needs_input_grad[2]) else None
        return grad_g, grad_x, grad_h0


def gated_scan_chunked(g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """g, x: (B, H, T, K) same dtype; h0: (B, H, K) or None. Returns h (B, H, T, K).

    Must match ``gated_scan_reference`` on outputs and gradients."""
    return _GatedScan.apply(g, x, h0)
