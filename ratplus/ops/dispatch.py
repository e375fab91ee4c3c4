"""Which attention backend ``backend="auto"`` picks. One small table, overridable per call.

| pattern          | CPU                | CUDA                          |
|------------------|--------------------|-------------------------------|
| dense (D = 1)    | sdpa (is_causal)   | sdpa (is_causal)              |
| dilated / local  | sparse (segmented) | flex (compiled, cached masks) |
| top-k blocks     | topk               | topk                          |

``reference`` (exact masks, O(T*S) memory) is always available for checking.

Gated scan: ``compiled`` (associative scan, Triton via Inductor) on CUDA, ``chunked`` elsewhere.
"""

from __future__ import annotations

import logging

import torch

from ratplus.config import AttentionPattern

logger = logging.getLogger("ratplus")

ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "sparse", "flex", "topk")
_announced: set[tuple[str, str]] = set()


def choose_attention_backend(pattern: AttentionPattern, device: torch.device) -> str:
    if pattern.is_topk:
        return "topk"
    if pattern.is_dense:
        return "sdpa"
    if device.type == "cuda":
        return "flex"
    return "sparse"


def choose_scan_backend(device: torch.device) -> str:
    return "compiled" if device.type == "cuda" else "chunked"


def announce(kind: str, backend: str, device: torch.device) -> None:
    """Log the chosen backend once per (device, backend) for the whole run."""
    key = (f"{kind}:{device.type}", backend)
    if key not in _announced and not torch.compiler.is_compiling():  # logging inside a trace breaks the graph
        _announced.add(key)
        logger.info("ratplus: %s backend on %s: %s", kind, device.type, backend)
