"""Pure tensor functions: the gated scan, pattern attention, RoPE. Nothing here knows about modules."""

from ratplus.ops.attention import attention
from ratplus.ops.rope import apply_rope, rope_cos_sin
from ratplus.ops.scan import gated_scan

__all__ = ["apply_rope", "attention", "gated_scan", "rope_cos_sin"]
