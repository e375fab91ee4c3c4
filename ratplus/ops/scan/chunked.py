"""Chunked gated scan with an exact hand-written backward (fast path on CPU, works on any device).

Shapes: B batch, H heads, T time, K head dim. Reference: ``ratplus.ops.scan.reference.gated_scan_reference``.

Forward solves the linear recurrence h_t = a_t h_{t-1} + b_t with a = g and b = (1 - g) x.
Time is cut into N chunks of L steps. Pass 1 runs the recurrence inside every chunk at once from a
zero state (L vectorised steps) while tracking the running product of gates; pass 2 carries the
true state across chunk boundaries (N small steps); pass 3 adds carry * product. That is about
2 sqrt(T) Python-level steps instead of T, and it only multiplies gates (no exp/log of cumulative
sums), so tiny gates underflow harmlessly to zero instead of overflowing.

Backward is the same recurrence run in reverse (DESIGN.md section 2 notes): with u_t = dL/dh_t,
    c_t = u_t + g_{t+1} c_{t+1}          (from the end)
    dL/dx_t = (1 - g_t) c_t,  dL/dg_t = (h_{t-1} - x_t) c_t,  dL/dh0 = g_0 c_0.
Autograd through the loops would store every intermediate; this stores only g, x and h.
"""

from __future__ import annotations

import math

import torch


def _chunk_len(T: int) -> int:
    return max(1, math.isqrt(T))


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t over dim -2 of (..., T, K) tensors; h0: (..., K) or None. No autograd."""
    *lead, T, K = b.shape
    L = _chunk_len(T)
    N = -(-T // L)
    pad = N * L - T
    if pad:
        # Padding at the end never feeds back into real steps.
        a = torch.cat([a, a.new_ones(*lead, pad, K)], dim=-2)
        b = torch.cat([b, b.new_zeros(*lead, pad, K)], dim=-2)
    a = a.reshape(*lead, N, L, K)  # (..., N, L, K)
    b = b.reshape(*lead, N, L, K)
    local = torch.empty_like(b)  # scan within each chunk from a zero state
    prod = torch.empty_like(a)  # running product of gates within each chunk
    local[..., 0, :] = b[..., 0, :]
    prod[..., 0, :] = a[..., 0, :]
    for i in range(1, L):
        torch.addcmul(b[..., i, :], a[..., i, :], local[..., i - 1, :], out=local[..., i, :])
        torch.mul(prod[..., i - 1, :], a[..., i, :], out=prod[..., i, :])
    # carry[n] = true state just before chunk n
    carry = torch.empty_like(b[..., :, 0, :])  # (..., N, K)
    state = torch.zeros_like(b[..., 0, 0, :]) if h0 is None else h0.to(b.dtype)
    for n in range(N):
        carry[..., n, :] = state
        state = torch.addcmul(local[..., n, L - 1, :], prod[..., n, L - 1, :], state)
    h = torch.addcmul(local, prod, carry.unsqueeze(-2))
    return h.reshape(*lead, N * L, K)[..., :T, :]


class _GatedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        h = linear_scan(g, (1 - g) * x, h0)
        ctx.save_for_backward(g, x, h, h0 if h0 is not None else torch.empty(0))
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        g, x, h, h0 = ctx.saved_tensors
        # c_t = u_t + g_{t+1} c_{t+1}: a forward scan on time-reversed tensors, gate shifted by one.
        g_next = torch.cat([g[..., 1:, :], torch.zeros_like(g[..., :1, :])], dim=-2)
        c = linear_scan(g_next.flip(-2), grad_h.flip(-2), None).flip(-2)
        h_prev = torch.cat(
            [(h0.unsqueeze(-2) if ctx.has_h0 else torch.zeros_like(h[..., :1, :])), h[..., :-1, :]], dim=-2
        )
        grad_x = (1 - g) * c if ctx.needs_input_grad[1] else None
        grad_g = (h_prev - x) * c if ctx.needs_input_grad[0] else None
        grad_h0 = g[..., 0, :] * c[..., 0, :] if (ctx.has_h0 and ctx.needs_input_grad[2]) else None
        return grad_g, grad_x, grad_h0


def gated_scan_chunked(g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """g, x: (B, H, T, K) same dtype; h0: (B, H, K) or None. Returns h (B, H, T, K).

    Must match ``gated_scan_reference`` on outputs and gradients."""
    return _GatedScan.apply(g, x, h0)
