"""Gated linear recurrence h_t = g_t h_{t-1} + (1 - g_t) x_t (docs/DESIGN.md section 2, step 4)."""

from __future__ import annotations

import torch

from ratplus.ops.dispatch import announce, choose_scan_backend
from ratplus.ops.scan.chunked import gated_scan_chunked, linear_scan
from ratplus.ops.scan.reference import gated_scan_reference

SCAN_BACKENDS = ("auto", "reference", "chunked", "compiled")


def gated_scan(g: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Scan over dim T of (B, H, T, K) tensors from state h0 ((B, H, K), zeros when None).

    g is the forget gate in (0, 1). Inputs should be float32 (the recurrence is kept in float32
    even under bf16 autocast, as in the paper). ``backend``: ``auto`` | ``chunked`` | ``reference``.
    """
    if g.shape != x.shape:
        raise ValueError(f"gated_scan: g has shape {tuple(g.shape)} but x has {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"gated_scan: expected (..., T, K) tensors, got shape {tuple(x.shape)}")
    if h0 is not None and h0.shape != x.shape[:-2] + x.shape[-1:]:
        raise ValueError(f"gated_scan: h0 has shape {tuple(h0.shape)}, expected {tuple(x.shape[:-2] + x.shape[-1:])}")
    if backend == "reference":
        return gated_scan_reference(g, x, h0)
    if backend == "auto":
        backend = choose_scan_backend(x.device)
        announce("scan", backend, x.device)
    if backend == "chunked":
        return gated_scan_chunked(g, x, h0)
    if backend == "compiled":
        from ratplus.ops.scan.compiled import gated_scan_compiled

        return gated_scan_compiled(g, x, h0)
    raise ValueError(f"unknown scan backend {backend!r}; choose one of {SCAN_BACKENDS}")


__all__ = ["SCAN_BACKENDS", "gated_scan", "gated_scan_chunked", "gated_scan_reference", "linear_scan"]
