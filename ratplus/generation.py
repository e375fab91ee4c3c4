"""Text generation with a RAT+ model: prefill, decode loop, sampling, streaming.

Shapes: B batch, T prompt length, V vocab.

``generate(model, input_ids, max_new_tokens, pattern="D16-W256-P4")`` builds a ``RATPlusCache`` for
the pattern chosen at call time, runs one forward over the prompt (the prefill), then one token per
step. Prompts of different lengths: pass a list of token lists, or a left-padded (B, T) tensor
with an ``attention_mask`` (1 = token, 0 = padding); each row then decodes exactly as it would alone.
Rows that emit a stop token stay in the batch and emit padding; whether all rows stopped is read
on the host only every few steps. Everything is validated once, before the first forward, so bad
arguments never fail half-way through and the decode loop reads nothing back per token.

After the prefill each token goes through ``RATPlusLM.decode_step``, a fixed-shape step (token
positions as a (B,) tensor, index-tensor cache writes, a mask over every slot: the gpt-fast
pattern) that ``torch.compile`` can capture; top-k patterns use the reference step
``model(token, cache=cache)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ratplus.config import PatternSpec
from ratplus.model.cache import RATPlusCache
from ratplus.model.rat import RATPlusLM

Streamer = Callable[[torch.Tensor], None]


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy when temperature == 0, else sampling from
    softmax(logits / temperature) restricted to the top_k most likely tokens and to the smallest
    set whose probability reaches top_p (the most likely token is always kept). Returns (B,) int64."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_and_pad(
    vocab_size: int, eos_token_id: int | None, stop_tokens: int | Iterable[int] | None, pad_token_id: int | None
) -> tuple[list[int], int]:
    """Stop tokens (default: [eos] when the config has one) and the padding id (default: the first
    stop token, else 0), both checked against the vocabulary."""
    if stop_tokens is None:
        stop = [] if eos_token_id is None else [eos_token_id]
    else:
        stop = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens)
    if pad_token_id is None:
        pad_token_id = stop[0] if stop else 0
    for name, s in [*(("stop token", s) for s in stop), ("pad_token_id", pad_token_id)]:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < vocab_size:
            raise ValueError(f"{name} {s!r} is not a token id in [0, vocab_size={vocab_size})")
    return stop, pad_token_id


def _prompt_tensor(
    input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) ids and the left-padding mask (None when every row is full)."""
    if not isinstance(input_ids, torch.Tensor):
        if isinstance(input_ids, (str, bytes)):
            raise ValueError("input_ids must be token ids (a tensor or lists of ints), not text: tokenize it first")
        rows = [list(r) for r in input_ids]
        if not rows:
            raise ValueError("input_ids is empty (no rows)")
        for i, r in enumerate(rows):
            bad = next((t for t in r if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
            if bad is not None:  # a float would be truncated to another token, a bool read as 0/1
                raise ValueError(f"prompt row {i} holds {bad!r} ({type(bad).__name__}): token ids must be ints")
        if attention_mask is not None:
            raise ValueError("attention_mask is built from the lists themselves; pass it only with a tensor")
        if any(len(r) == 0 for r in rows):
            raise ValueError(f"prompt row {[len(r) for r in rows].index(0)} is empty")
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, T - len(r) :] = 1
        return ids, (None if bool(mask.all()) else mask)
    ids = input_ids
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids of shape (B, T), got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"the prompt is empty: input_ids has shape {tuple(ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(ids.shape)}")
        if bool((attention_mask == 1).all()):
            attention_mask = None
    return ids.long(), attention_mask


def generate_stream(
    model: RATPlusLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    pattern: PatternSpec = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] | None = None,
    max_length: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    stop_check_every: int = 8,
) -> Iterator[torch.Tensor]:
    """Like ``generate`` but yields the new tokens of each step, (B,) int64 (``pad_token_id`` for
    rows that already stopped), as soon as they are sampled.

    Whether every row has stopped is read back to the host only every ``stop_check_every`` steps
    (no device sync per token), so up to ``stop_check_every - 1`` all-padding steps may follow the
    last stop (``generate`` trims them; 1 = check every step)."""
    config = model.config
    if isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int) or stop_check_every < 1:
        raise ValueError(f"stop_check_every must be an int >= 1, got {stop_check_every!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    stop, pad_token_id = _stop_and_pad(config.vocab_size, config.eos_token_id, stop_tokens, pad_token_id)
    ids, mask = _prompt_tensor(input_ids, attention_mask, pad_token_id)
    if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
        raise ValueError(f"input_ids hold token ids outside [0, vocab_size={config.vocab_size})")
    limit = config.max_seq_len if max_length is None else max_length
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if limit > config.max_seq_len:
        raise ValueError(f"max_length={limit} exceeds the model's max_seq_len={config.max_seq_len}")
    prompt_len = int(ids.shape[1] if mask is None else mask.sum(dim=1).max())
    if prompt_len > limit:
        raise ValueError(f"the prompt has {prompt_len} tokens, longer than max_length={limit}")
    new = min(max_new_tokens, limit - prompt_len)
    if new == 0:
        return
    device = next(model.parameters()).device
    dtype = model.embedding.wte.weight.dtype
    B = ids.shape[0]
    # builds (and validates) the cache before any forward: a bad pattern fails here
    cache = RATPlusCache(config, pattern, B, prompt_len + new, device=device, dtype=dtype)
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    # finished rows stay in the batch (fixed shapes) and emit pad_token_id; whether all rows
    # finished is read on the host only every ``stop_check_every`` steps
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
    with torch.no_grad():
        ids, mask = ids.to(device), None if mask is None else mask.to(device)
        # the head on the last position only: with a large vocabulary, logits for every prompt position
        # cost a quarter of an 8K prefill (SmolLM2, V = 49,152) and only the last one is sampled
        h = model.hidden(ids, cache=cache, attention_mask=mask, backend=backend)  # (B, T, C)
        logits = model.logits(h[:, -1:])[:, -1]  # (B, V)
        fixed = cache.supports_fixed_step
        held = torch.tensor(cache.lengths, dtype=torch.long, device=device)  # (B,) tokens per row
        for step in range(new):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            token = torch.where(finished, pad, token)
            yield token
            if step == new - 1:
                return
            if stop:
                finished = finished | torch.isin(token, stop_t)
                if (step + 1) % stop_check_every == 0 and bool(finished.all()):
                    return
            if fixed:
                logits = model.decode_step(token.unsqueeze(-1), cache, held)
                held = held + 1
            else:  # top-k groups: the reference step (data-dependent block choice)
                logits = model(token.unsqueeze(-1), cache=cache, backend=backend)[:, -1]


def generate(
    model: RATPlusLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    pattern: PatternSpec = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] | None = None,
    max_length: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    streamer: Streamer | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt; returns (B, T + new) int64.

    input_ids: (B, T) or (T,) int tensor, or a list of token lists (left-padded for you).
    pattern: attention pattern for the whole run (any pattern spec; None = dense).
    temperature: 0 = greedy (top_k / top_p ignored); > 0 samples, with optional ``top_k`` (0/None
      = off) and nucleus ``top_p`` in (0, 1]. ``generator`` makes sampling reproducible.
    stop_tokens: a row stops after emitting one (default: ``config.eos_token_id`` if set); its
      later positions hold ``pad_token_id`` (default: the first stop token, else 0). Generation
      ends when every row stopped, so ``new`` may be smaller than ``max_new_tokens``.
    max_length: cap on prompt + new tokens per row (default and maximum: ``config.max_seq_len``).
    attention_mask: (B, T), 0 on left padding, for a padded tensor prompt.
    streamer: called with the (B,) new tokens of every step as they come.
    """
    stop, pad = _stop_and_pad(model.config.vocab_size, model.config.eos_token_id, stop_tokens, pad_token_id)
    ids, _ = _prompt_tensor(input_ids, attention_mask, pad)
    steps = []
    for tokens in generate_stream(
        model,
        input_ids,
        max_new_tokens,
        pattern,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        max_length,
        attention_mask,
        pad,
        generator,
        backend,
        # a streamer reads every token on the host anyway; it must not see steps after the last stop
        1 if streamer is not None else 8,
    ):
        if streamer is not None:
            streamer(tokens)
        steps.append(tokens)
    if not steps:
        return ids
    out = torch.stack(steps, dim=1)  # (B, new)
    if stop:
        # drop the trailing steps in which every row had already stopped (a stop token earlier in the row)
        hit = torch.isin(out, torch.tensor(stop, device=out.device)).long()
        all_done = ((hit.cumsum(dim=1) - hit) > 0).all(dim=0)  # (new,)
        if bool(all_done.any()):
            out = out[:, : int(all_done.long().argmax())]
    return torch.cat([ids.to(out.device), out], dim=1)


__all__ = ["generate", "generate_stream", "sample_next"]
