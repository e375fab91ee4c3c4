"""FlexAttention path (CUDA; on CPU only compiled and forward-only in current PyTorch).

Shapes: B batch, H heads, T query length, S key length, K head dim.
Reference: ``ratplus.ops.attention.reference.attention_reference``.

The pattern's predicate (``masks.mask_mod_values``) becomes a ``mask_mod``; its block mask is built
once per (pattern, T, S, q_offset, device) and reused from a small cache, unlike the paper's code
which rebuilds it on every call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from ratplus.config import AttentionPattern
from ratplus.ops.attention.masks import mask_mod_values

_BLOCK_MASKS: OrderedDict[tuple, object] = OrderedDict()
_MAX_CACHED = 64
_compiled_flex: Callable | None = None


def make_mask_mod(pattern: AttentionPattern, q_offset: int = 0) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return mask_mod_values(pattern, q_idx + q_offset, kv_idx)

    return mask_mod


def get_block_mask(pattern: AttentionPattern, T: int, S: int, q_offset: int, device: torch.device):
    """Cached ``BlockMask`` for the pattern (shared over batch and heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (pattern, T, S, q_offset, str(device))
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]
    block_mask = create_block_mask(make_mask_mod(pattern, q_offset), None, None, T, S, device=device)
    _BLOCK_MASKS[key] = block_mask
    while len(_BLOCK_MASKS) > _MAX_CACHED:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


def flex_attention_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    q_offset: int = 0,
    scale: float | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Pattern attention through FlexAttention with a cached block mask. Returns (B, H, T, K)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = get_block_mask(pattern, q.shape[-2], k.shape[-2], q_offset, q.device)
    fn = flex_attention
    if compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, scale=scale)
