"""The one place evaluation turns a prompt into generated tokens.

Every evaluator (NIAH, LongBench, the lm-eval adapter, the demo) calls ``greedy_generate``; when the
compact-cache ``ratplus.generate`` lands, only this function changes.

Shapes: B batch, T prompt length.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ratplus.config import PatternSpec
from ratplus.generation import generate
from ratplus.model.rat import RATPlusLM


@torch.inference_mode()
def greedy_generate(
    model: RATPlusLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pattern: PatternSpec = None,
    stop_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Greedy decoding with the given attention pattern, through the compact KV cache.

    input_ids: (B, T) int64 on the model's device. Returns (B, T + n) int64 with n <= max_new_tokens;
    generation ends early once every row has produced one of ``stop_ids`` (rows that stopped are
    padded with their stop id, which callers cut at).

    Equivalent to "argmax of the full-forward logits, step by step" (``ratplus.generate`` is tested
    against the full forward); kept as the one entry point evaluation uses.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return input_ids
    return generate(model, input_ids, max_new_tokens, pattern=pattern, stop_tokens=sorted(set(stop_ids)))


def new_tokens(output_ids: torch.Tensor, prompt_len: int, stop_ids: Iterable[int] = ()) -> list[int]:
    """Row 0's generated ids after ``prompt_len``, cut before the first stop id."""
    out = output_ids[0, prompt_len:].tolist()
    stops = set(stop_ids)
    for i, tok in enumerate(out):
        if tok in stops:
            return out[:i]
    return out
