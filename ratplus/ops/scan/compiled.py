"""Compiled associative scan (the CUDA path; also runs on CPU compiled, for testing).

Shapes: B batch, H heads, T time, K head dim. Reference: ``ratplus.ops.scan.reference.gated_scan_reference``.

h_t = a_t h_{t-1} + b_t is associative under (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2), so
``torch._higher_order_ops.associative_scan`` computes it in O(log T) depth; on CUDA, Inductor
lowers the pointwise combine to one Triton kernel. The backward is the same reverse recurrence as in
``chunked.py`` (c_t = u_t + g_{t+1} c_{t+1}), run with ``reverse=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_compiled: dict[str, Callable] = {}


def _combine(x, y):
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, torch.addcmul(b2, a2, b1)


def _scan_impl(a: torch.Tensor, b: torch.Tensor, reverse: bool, mode: str) -> torch.Tensor:
    from torch._higher_order_ops.associative_scan import associative_scan

    return associative_scan(_combine, (a, b), dim=a.dim() - 2, reverse=reverse, combine_mode=mode)[1]


def linear_scan_compiled(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool = False
) -> torch.Tensor:
    """Same contract as ``chunked.linear_scan`` (dim -2 is time), through a compiled associative scan."""
    if h0 is not None:
        # fold the initial state into the first step: h_first = a_first h0 + b_first
        edge = -1 if reverse else 0
        b = b.clone()
        b[..., edge, :] += a[..., edge, :] * h0
    mode = "pointwise" if a.device.type == "cuda" else "generic"
    if mode not in _compiled:
        _compiled[mode] = torch.compile(_scan_impl, dynamic=False)
    return _compiled[mode](a.contiguous(), b.contiguous(), reverse, mode)


class _GatedScanCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x, h0):
        h = linear_scan_compiled(g, torch.addcmul(x, g, x, value=-1), h0)
        ctx.save_for_backward(g, x, h, h0 if h0 is not None else torch.empty(0))
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    def backward(ctx, grad_h):
        g, x, h, h0 = ctx.saved_tensors
        g_next = torch.zeros_like(g)
        g_next[..., :-1, :] = g[..., 1:, :]
        c = linear_scan_compiled(g_next, grad_h.contiguous(), None, reverse=True)
        grad_x = torch.addcmul(c, g, c, value=-1)
        h_prev = torch.cat([h0.unsqueeze(-2) if ctx.has_h0 else torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], -2)
        grad_g = (h_prev - x) * c
        grad_h0 = g[..., 0, :] * c[..., 0, :] if ctx.has_h0 else None
        return grad_g, grad_x, grad_h0


def gated_scan_compiled(g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """g, x: (B, H, T, K); h0: (B, H, K) or None. Must match ``gated_scan_reference``."""
    return _GatedScanCompiled.apply(g, x, h0)
