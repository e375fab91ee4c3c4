"""Rotary position embedding, rotate-half convention over the whole head dim (docs/DESIGN.md 2, step 5).

Shapes: B batch, H heads, T length, K head dim (even).
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, K) for integer positions (T,).

    Angles are computed in float32 (float64 when asked for float64), then cast: in bf16 the angle
    of a large position would be wrong by whole radians."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    angles = positions.to(work).unsqueeze(-1) * inv_freq  # (T, K/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, K): rotate-half pairs i with i + K/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., T, K); cos, sin broadcastable to it. Returns x rotated (same dtype).

    Under autocast x is bf16/fp16 while cos, sin follow the float32 embeddings: the product is taken
    in the wider type and cast back, so q, k and v (and a decode cache built for the compute dtype)
    agree on one dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
