"""Loop reference for the gated linear recurrence (docs/DESIGN.md section 2, step 4).

Shapes: B batch, H heads, T time, K head dim.

    h_t = g_t * h_{t-1} + (1 - g_t) * x_t,    h_{-1} = h0 (zeros when None)

This is the truth every fast path is tested against; it is slow on purpose (one Python step per t).
"""

from __future__ import annotations

import torch


def gated_scan_reference(g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """g, x: (B, H, T, K); h0: (B, H, K) or None. Returns h: (B, H, T, K) in x's dtype."""
    h = torch.zeros_like(x[..., 0, :]) if h0 is None else h0
    out = []
    for t in range(x.shape[-2]):
        h = g[..., t, :] * h + (1 - g[..., t, :]) * x[..., t, :]
        out.append(h)
    return torch.stack(out, dim=-2)
