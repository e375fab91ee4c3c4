"""Held-out perplexity and bits per byte of one checkpoint under several attention patterns.

The text is laid out as in training (docs/DESIGN.md section 5): documents tokenized and concatenated with
an EOS after each; a target whose input token is EOS is not scored (nothing predicts the first
token of a document). The stream is cut into non-overlapping windows of ``seq_len`` inputs that
share one token with the next window, so every scored token is predicted exactly once, each window
from a fresh context at position 0.

Bits per byte = total NLL / ln 2 / UTF-8 bytes of the scored tokens (per-token byte counts come
from the tokenizer's character offsets; EOS counts 0 bytes). Unlike perplexity it compares models
with different tokenizers.

Shapes: N stream length, B windows per batch, T window length, V vocab.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ratplus.config import PatternSpec
from ratplus.eval.common import EvalModel, pattern_costs, warn_if_not_adapted
from ratplus.model.rat import RATPlusLM

logger = logging.getLogger("ratplus")

DEFAULT_PATTERNS = ("dense", "D4", "D16", "D64", "D16-W256-P4", "local-W64-P4")


@dataclass
class TokenStream:
    """ids (N,) int64 token stream; nbytes (N,) int64 UTF-8 bytes each token covers; scored (N,) bool
    whether ids[j] is a scored target (j >= 1 and ids[j - 1] is not EOS)."""

    ids: torch.Tensor
    nbytes: torch.Tensor
    scored: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.numel())


def _token_bytes(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes per token from character offsets: differences of the cumulative byte position of
    each token's end (ends made non-decreasing, so a character split over tokens is counted once)."""
    # cum[i] = UTF-8 bytes of text[:i]; ASCII text needs no table (bytes == characters).
    cum = None if text.isascii() else [0, *itertools.accumulate(len(c.encode("utf-8")) for c in text)]
    out, prev = [], 0
    for _, end in offsets:
        end = max(end, prev)
        b_end = end if cum is None else cum[end]
        b_prev = prev if cum is None else cum[prev]
        out.append(b_end - b_prev)
        prev = end
    return out


def token_stream(texts: list[str], tokenizer: Any, eos_id: int | None, max_tokens: int | None = None) -> TokenStream:
    """Tokenize documents into one stream, EOS after each (none when ``eos_id`` is None).

    ``max_tokens`` keeps the first max_tokens + 1 tokens (about max_tokens scored targets)."""
    if not texts:
        raise ValueError("no documents to evaluate")
    ids: list[int] = []
    nbytes: list[int] = []
    limit = None if max_tokens is None else max_tokens + 1
    for text in texts:
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(enc.ids)
        nbytes.extend(_token_bytes(text, enc.offsets))
        if eos_id is not None:
            ids.append(eos_id)
            nbytes.append(0)
        if limit is not None and len(ids) >= limit:
            break
    if limit is not None:
        ids, nbytes = ids[:limit], nbytes[:limit]
    if len(ids) < 2:
        raise ValueError(f"the evaluation text has {len(ids)} token(s); need at least 2")
    t_ids = torch.tensor(ids, dtype=torch.long)
    scored = torch.ones(len(ids), dtype=torch.bool)
    scored[0] = False
    if eos_id is not None:
        scored[1:] &= t_ids[:-1] != eos_id
    return TokenStream(t_ids, torch.tensor(nbytes, dtype=torch.long), scored)


def _windows(n: int, seq_len: int) -> list[tuple[int, int]]:
    """[start, end) token spans of seq_len + 1 tokens (the last may be shorter), overlapping by one."""
    return [(s, min(s + seq_len + 1, n)) for s in range(0, n - 1, seq_len)]


@torch.inference_mode()
def stream_nll(
    model: RATPlusLM,
    stream: TokenStream,
    pattern: PatternSpec,
    seq_len: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "ppl",
) -> dict[str, float]:
    """Summed NLL (nats, float64), scored-token and byte counts of ``stream`` under ``pattern``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.check_length(seq_len)
    device = next(model.parameters()).device
    spans = _windows(len(stream), seq_len)
    # Equal-length windows share a batch; only the last window can be shorter.
    groups: dict[int, list[tuple[int, int]]] = {}
    for s, e in spans:
        groups.setdefault(e - s, []).append((s, e))
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    nll, count, nbytes = 0.0, 0, 0
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        chunk = torch.stack([stream.ids[s:e] for s, e in batch]).to(device)  # (B, T + 1)
        mask = torch.stack([stream.scored[s + 1 : e] for s, e in batch]).to(device)  # (B, T)
        logits = model(chunk[:, :-1], pattern=pattern)  # (B, T, V)
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (B, T)
        nll += float(token_nll[mask].double().sum())
        count += int(mask.sum())
        nbytes += int(sum(int(stream.nbytes[s + 1 : e][stream.scored[s + 1 : e]].sum()) for s, e in batch))
    return {"nll_sum": nll, "tokens": count, "bytes": nbytes}


def check_ppl_args(patterns: Any, seq_len: int | None, batch_size: int, max_tokens: int | None) -> None:
    """The sizes of a perplexity run, checked before any work (ValueError naming the flag)."""
    if not patterns:
        raise ValueError("no patterns to evaluate (--patterns is empty)")
    for name, value, low in (("seq_len", seq_len, 2), ("max_tokens", max_tokens, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an int >= {low}, got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be an int >= 1, got {batch_size!r}")


def evaluate_ppl(
    em: EvalModel,
    texts: list[str],
    patterns: list[PatternSpec] | tuple[PatternSpec, ...] = DEFAULT_PATTERNS,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity and bits per byte of ``em`` on ``texts`` for each pattern, one row per pattern.

    Row keys: model, pattern, status (dense / adapted / joint-trained / not adapted ...), nll (mean
    nats per token), ppl, bpb, tokens, bytes, seq_len, attn_flop_frac, kv_frac (cost relative to
    dense at ``seq_len``).
    """
    check_ppl_args(patterns, seq_len, batch_size, max_tokens)
    tokenizer = em.require_tokenizer("perplexity evaluation")
    seq_len = seq_len or em.config.max_seq_len
    if seq_len > em.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={em.config.max_seq_len}")
    names = [em.config.canonical_pattern(p) for p in patterns]  # validates every pattern up front
    stream = token_stream(texts, tokenizer, em.eos_id, max_tokens)
    rows = []
    for spec, name in zip(patterns, names):
        status = warn_if_not_adapted(em, spec)
        r = stream_nll(em.model, stream, spec, seq_len, batch_size, progress, desc=f"ppl {em.name} {name}")
        if r["tokens"] == 0:
            raise ValueError("no scored tokens: every target follows an EOS; give longer documents")
        mean = r["nll_sum"] / r["tokens"]
        rows.append(
            {
                "model": em.name,
                "pattern": name,
                "status": status,
                "nll": mean,
                "ppl": math.exp(mean),
                "bpb": r["nll_sum"] / math.log(2) / r["bytes"] if r["bytes"] else float("nan"),
                "tokens": r["tokens"],
                "bytes": r["bytes"],
                "seq_len": seq_len,
                **pattern_costs(em.config, spec, seq_len),
            }
        )
    return rows
