"""The one place evaluation turns a prompt into generated tokens.

Every evaluator (NIAH, LongBench, the lm-eval adapter, the demo) calls ``greedy_generate``; when the
compact-cache ``ratplus.generate`` lands, only this function changes.

Shapes: B batch, T prompt length.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ratplus.config import PatternSpec
from ratplus.model.rat import RATPlusLM


@torch.inference_mode()
def greedy_generate(
    model: RATPlusLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pattern: PatternSpec = None,
    stop_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Greedy decoding with the given attention pattern.

    input_ids: (B, T) int64 on the model's device. Returns (B, T + n) int64 with n <= max_new_tokens;
    generation ends early once every row has produced one of ``stop_ids`` (rows that stopped keep
    emitting tokens that callers cut at their first stop id).

    Reference implementation: a full forward over the whole prefix for every new token, so it is
    exactly "argmax of the full-forward logits, step by step".
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=input_ids.device)
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(ids, pattern=pattern)[:, -1]  # (B, V)
        nxt = logits.argmax(dim=-1)  # (B,)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if stops.numel():
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
    return ids


def new_tokens(output_ids: torch.Tensor, prompt_len: int, stop_ids: Iterable[int] = ()) -> list[int]:
    """Row 0's generated ids after ``prompt_len``, cut before the first stop id."""
    out = output_ids[0, prompt_len:].tolist()
    stops = set(stop_ids)
    for i, tok in enumerate(out):
        if tok in stops:
            return out[:i]
    return out
