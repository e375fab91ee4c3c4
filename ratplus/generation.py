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

Sampling transforms (pure functions on one row's logits, used by ``ratplus serve``'s batched step
per row, and by ``ratplus generate``), in the order they apply (vLLM's order):
``logit_bias`` -> ``min_tokens`` (stop tokens banned until then) -> ``repetition_penalty`` (prompt
and output tokens: a positive logit divided, a negative one multiplied) -> ``frequency_penalty``
(times each output token's count) and ``presence_penalty`` (once per output token seen) -> greedy
argmax, or temperature -> ``min_p`` -> ``top_k`` -> ``top_p`` -> a draw. Log-probabilities reported
for tokens (``token_logprobs``) are those of the model's raw logits, before any transform (so they
score text, as lm-eval needs, whatever the sampling settings).

``IncrementalDetokenizer`` turns tokens into text pieces as they come (``ratplus generate`` and the
server share it): a piece is handed out only once its characters are complete, so every character
is printed, and the pieces join to the decoded whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ratplus.config import PatternSpec
from ratplus.model.cache import RATPlusCache, compute_dtype
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
    min_p: float | None = None,
) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy when temperature == 0, else sampling from
    softmax(logits / temperature) restricted to the tokens whose probability is at least min_p
    times the most likely one's, to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (the most likely token is always kept). Returns (B,) int64."""
    _check_sampling(temperature, top_k, top_p)
    if min_p is not None and (not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be None or in [0, 1], got {min_p!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if min_p:
        # p_i >= min_p * p_max  <=>  score_i >= score_max + log(min_p)
        floor = scores.max(dim=-1, keepdim=True).values + math.log(min_p)
        scores = scores.masked_fill(scores < floor, float("-inf"))
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


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its next token (module docstring for the order of the transforms).

    temperature 0 = greedy (top_k, top_p, min_p unused); top_k None/0 = off; top_p None/1 = off;
    penalties at 0 (presence, frequency) and 1 (repetition) are off; ``logit_bias`` maps token id
    -> value added to its logit; ``min_tokens``: the stop tokens are banned until this many tokens
    were generated."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0

    def check(self, vocab_size: int) -> SamplingParams:
        """Raise ValueError naming the field on a bad value; returns self."""
        _check_sampling(self.temperature, self.top_k, self.top_p)
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not math.isfinite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        for t, b in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"logit_bias: token id {t!r} is outside [0, vocab_size={vocab_size})")
            if not math.isfinite(b) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias: the bias of token {t} must be in [-100, 100], got {b!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        return self

    @property
    def transforms_logits(self) -> bool:
        """Whether anything changes the logits before the greedy argmax / the draw."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1
        )


def apply_penalties(
    logits: torch.Tensor,
    prompt: Sequence[int],
    output: Sequence[int],
    presence: float = 0.0,
    frequency: float = 0.0,
    repetition: float = 1.0,
) -> torch.Tensor:
    """One row's logits (V,) with the penalties of its history applied (a new tensor).

    repetition (HF / vLLM): every token of prompt or output has a positive logit divided by it, a
    negative one multiplied; frequency: minus ``frequency x count`` per output token; presence:
    minus ``presence`` once per distinct output token (OpenAI's definitions, output tokens only)."""
    V = logits.shape[-1]
    out = logits.float().clone()
    if repetition != 1 and (prompt or output):
        seen = torch.zeros(V, dtype=torch.bool, device=out.device)
        seen[torch.tensor([*prompt, *output], dtype=torch.long, device=out.device)] = True
        out = torch.where(seen, torch.where(out > 0, out / repetition, out * repetition), out)
    if (presence or frequency) and output:
        counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=out.device), minlength=V)
        out = out - frequency * counts.float() - presence * (counts > 0).float()
    return out


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    stop_ids: Iterable[int] = (),
) -> torch.Tensor:
    """One row's logits (V,) after logit_bias, the min_tokens ban of ``stop_ids``, and the
    penalties (module docstring); temperature and the filters are ``sample_next``'s."""
    out = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=out.device)
        out[ids] += torch.tensor(list(params.logit_bias.values()), dtype=out.dtype, device=out.device)
    if len(output) < params.min_tokens:
        banned = list(stop_ids)
        if banned:
            out[torch.tensor(banned, dtype=torch.long, device=out.device)] = float("-inf")
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1:
        out = apply_penalties(
            out, prompt, output, params.presence_penalty, params.frequency_penalty, params.repetition_penalty
        )
    return out


def sample_row(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> int:
    """The next token of one sequence from its logits (V,): ``process_logits`` then ``sample_next``."""
    if params.transforms_logits:
        logits = process_logits(logits, params, prompt, output, stop_ids)
    top_p = None if params.top_p is None or params.top_p >= 1 else params.top_p
    top_k = params.top_k if params.top_k and params.top_k > 0 else None
    return int(sample_next(logits.view(1, -1), params.temperature, top_k, top_p, generator, params.min_p)[0])


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities of ``tokens`` (N,) under raw ``logits`` (N, V), and the ``top`` most likely
    (id, logprob) pairs per row (most likely first; ties keep the lower id)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = logp.gather(-1, tokens.view(-1, 1).to(logp.device)).squeeze(-1).tolist()
    if top <= 0:
        return chosen, [[] for _ in chosen]
    values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


class IncrementalDetokenizer:
    """Token ids in, text pieces out, as they come (a ``tokenizers.Tokenizer``, or anything with
    ``decode(ids) -> str``).

    Each push decodes only a short window: the tokens since the last piece plus a few before them
    (``context`` tokens, e.g. the prompt, seed that window, so leading spaces are the ones the
    whole text has). A piece is held back while the window's text ends in an incomplete character
    (U+FFFD, a multi-byte character split across tokens) and handed out once a later token
    completes it; ``flush`` hands out whatever is left. The pieces join to ``decode(tokens)``."""

    #: tokens of the context decoded with the first window (decoders that strip a leading space
    #: or join pieces look at the token before)
    LOOKBACK = 5

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._ids: list[int] = [int(t) for t in list(context)[-self.LOOKBACK :]]
        self._prefix = 0  # the window starts here: the tokens of the last piece handed out
        self._read = len(self._ids)  # tokens before this are handed out
        self.tokens: list[int] = []

    def push(self, token: int) -> str:
        """Add one token; the text that is complete now ("" while a character is unfinished)."""
        self.tokens.append(int(token))
        self._ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """The rest, even an unfinished character (as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
        now = decode(self._ids[self._prefix :])
        if not final and (len(now) <= len(before) or now.endswith("\ufffd")):
            return ""  # nothing new, or a multi-byte character still unfinished: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before) :]


class _History:
    """What the penalties of ``generate`` need per row, on the device (no read back per token):
    which tokens the prompt or output hold (repetition) and each output token's count (presence,
    frequency), as (B, V) tensors."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None, vocab_size: int):
        B = ids.shape[0]
        self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=ids.device)
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        self.seen.scatter_(1, ids, real)  # padding (mask 0) marks nothing
        self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=ids.device)

    def apply(self, logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """logits (B, V) with apply_penalties' transforms, every row at once."""
        out = logits.float()
        if p.repetition_penalty != 1:
            r = p.repetition_penalty
            out = torch.where(self.seen, torch.where(out > 0, out / r, out * r), out)
        if p.presence_penalty or p.frequency_penalty:
            out = out - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return out

    def add(self, token: torch.Tensor, live: torch.Tensor) -> None:
        """Count this step's tokens (B,) of the rows still running (``live``)."""
        self.seen.scatter_(1, token.view(-1, 1), live.view(-1, 1) | self.seen.gather(1, token.view(-1, 1)))
        self.counts.scatter_add_(1, token.view(-1, 1), live.view(-1, 1).float())


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
    *,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
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
    penalties = SamplingParams(
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    ).check(config.vocab_size)
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
    dtype = compute_dtype(model.embedding.wte.weight)  # autocast's dtype when forward runs under it
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
        history = _History(ids, mask, config.vocab_size) if penalties.transforms_logits else None
        for step in range(new):
            if history is not None:  # on the device, no read back: (B, V) seen / counts tensors
                logits = history.apply(logits, penalties)
            token = sample_next(logits, temperature, top_k, top_p, generator, min_p)  # (B,)
            token = torch.where(finished, pad, token)
            if history is not None:
                history.add(token, ~finished)
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
    *,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
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
    min_p, repetition_penalty, presence_penalty, frequency_penalty: as in ``sample_next`` and
      ``apply_penalties`` (module docstring), applied to every row on the device (1 / 0 = off).
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
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
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


__all__ = [
    "IncrementalDetokenizer",
    "SamplingParams",
    "apply_penalties",
    "generate",
    "generate_stream",
    "process_logits",
    "sample_next",
    "sample_row",
    "token_logprobs",
]
