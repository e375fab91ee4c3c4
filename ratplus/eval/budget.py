"""Quality against KV-cache bytes: every method and a sweep of its budget knob, measured the same way.

Protocol (one for all methods, so SnapKV, which only acts after a prompt, compares fairly): the
held-out stream (``ratplus.eval.ppl.token_stream``) is cut into windows of ``seq_len`` + 1 tokens;
in each window the first ``seq_len - score_tokens`` tokens are the prompt, prefilled into the
method's decoding cache (``RATPlusCache``), and the last ``score_tokens`` tokens are fed after it
and scored. For the pattern methods these logits equal a full forward (decode == forward); for
SnapKV they are the logits after its eviction. ``kv_bytes`` is the cache's allocated storage per
sequence at the end of the window (``RATPlusCache.nbytes()``: kept keys and values, top-k block
summaries, RAT+'s recurrent state), ``kv_bytes_per_token`` that over ``seq_len``.

Methods (``method`` of each row; one line per model and method in the plot):
  dense        causal attention (with GQA checkpoints: fewer KV heads)
  dilated      ``D<d>`` (RAT+'s sparse inference; on the attention baseline the same pattern)
  streaming    ``local-W<w>-P4``: attention sinks + a window. On the attention baseline this is
               StreamingLLM (Xiao et al. 2023); on RAT+ the recurrence also carries the older text
  snapkv       ``snapkv-C<c>-O<o>`` KV eviction after the prompt (on RAT+: RAT+ + SnapKV)
  topk         ``topk-B<b>-K<k>-W<w>-P4``: top-k blocks (keeps every key: dense bytes)
The default sweep (``default_sweep``) picks each knob so the methods meet at the dilated budgets.

Shapes: B windows per batch, T window length, V vocab.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ratplus.config import ModelConfig, PatternSpec
from ratplus.eval.common import EvalModel
from ratplus.eval.ppl import TokenStream, _windows, token_stream
from ratplus.model.cache import RATPlusCache

logger = logging.getLogger("ratplus")

DILATIONS = (4, 8, 16, 32, 64)
SINKS = 4  # StreamingLLM's attention sinks
SNAPKV_WINDOW = 4  # observation window of the default SnapKV sweep (small: the demo context is 256)


def method_of(config: ModelConfig, pattern: PatternSpec) -> str:
    """The method a pattern belongs to: dense / dilated / streaming / snapkv / topk, or hybrid when
    its layers or head groups do not all run the same pattern (``tune-pattern``'s choices)."""
    layers = config.resolve_pattern(pattern)
    if len({p for layer in layers for p, _ in layer.groups}) > 1:
        return "hybrid"
    kinds = set()
    for layer in layers:
        for p, _ in layer.groups:
            if p.is_dense:
                kinds.add("dense")
            elif p.is_snapkv:
                kinds.add("snapkv")
            elif p.is_topk:
                kinds.add("topk")
            elif p.dilation_size is None:
                kinds.add("streaming")
            else:
                kinds.add("dilated")
    return kinds.pop() if len(kinds) == 1 else "hybrid"


def default_sweep(config: ModelConfig, seq_len: int, score_tokens: int) -> list[str]:
    """Patterns of every method at matched budgets: for each D in ``DILATIONS`` RAT+'s bytes with
    ``D<d>``, s = 1 + floor((seq_len - 1) / D) slots + 1 slot's worth of recurrent state (2K float32
    per KV head, as one float32 slot), then a sinks + window pattern with P + W + 1 = s and a SnapKV
    setting holding s slots at the window's end (C + O + score_tokens = s, where that fits), and two
    top-k settings. The same list for RAT+ and the attention baseline, so they meet at equal bytes."""
    del config  # the sweep is in slots; the model only validates it
    out = ["dense"]
    for D in DILATIONS:
        s = 1 + (seq_len - 1) // D + 1
        out.append(f"D{D}")
        out.append(f"local-W{max(0, s - SINKS - 1)}-P{SINKS}")
        c = s - SNAPKV_WINDOW - score_tokens
        if c >= SNAPKV_WINDOW:
            out.append(f"snapkv-C{c}-O{SNAPKV_WINDOW}")
    block = max(1, seq_len // 16)
    out += [f"topk-B{block}-K{k}-W{block}-P{SINKS}" for k in (1, 4)]
    return list(dict.fromkeys(out))


@torch.inference_mode()
def budget_nll(
    model,
    stream: TokenStream,
    pattern: PatternSpec,
    seq_len: int,
    score_tokens: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = False,
    desc: str = "budget",
) -> dict[str, Any]:
    """Summed NLL of the scored continuation tokens under ``pattern`` (module docstring), their count,
    and the cache bytes per sequence at the end of a window."""
    if not 1 <= score_tokens < seq_len:
        raise ValueError(f"score_tokens must be in [1, seq_len={seq_len}), got {score_tokens}")
    model.check_length(seq_len)
    spans = [(s, e) for s, e in _windows(len(stream), seq_len) if e - s == seq_len + 1]
    if max_windows is not None:
        spans = spans[:max_windows]
    if not spans:
        raise ValueError(f"the evaluation text is shorter than one window of {seq_len + 1} tokens")
    weight = model.embedding.wte.weight
    prompt = seq_len - score_tokens
    nll, count, kv_bytes = 0.0, 0, 0
    batches = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        chunk = torch.stack([stream.ids[s:e] for s, e in batch]).to(weight.device)  # (B, T + 1)
        mask = torch.stack([stream.scored[s + prompt + 1 : e] for s, e in batch]).to(weight.device)
        cache = RATPlusCache(model.config, pattern, len(batch), seq_len, device=weight.device, dtype=weight.dtype)
        model(chunk[:, :prompt], cache=cache)  # prefill
        logits = model(chunk[:, prompt:seq_len], cache=cache)  # (B, score_tokens, V)
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, prompt + 1 :], reduction="none")
        nll += float(token_nll[mask].double().sum())
        count += int(mask.sum())
        kv_bytes = max(kv_bytes, cache.nbytes() // len(batch))
    return {"nll_sum": nll, "tokens": count, "kv_bytes": kv_bytes}


def evaluate_budget(
    models: list[EvalModel],
    texts: list[str],
    patterns: list[str] | None = None,
    seq_len: int | None = None,
    score_tokens: int = 8,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
    extra: Callable[[EvalModel, str], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per model and pattern (``default_sweep`` of each model when ``patterns`` is None).

    Row keys: model, method, pattern, status, nll, ppl, tokens, seq_len, score_tokens, kv_bytes,
    kv_bytes_per_token, kv_frac (over the same model's dense bytes), num_kv_heads. ``extra(em,
    pattern)`` adds further metrics to a row (the hook for the recall probe's accuracy)."""
    for name, value in (("batch_size (--batch-size)", batch_size), ("score_tokens (--score-tokens)", score_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    rows: list[dict[str, Any]] = []
    for em in models:
        config = em.config
        ctx = seq_len or config.max_seq_len
        if ctx > config.max_seq_len:
            raise ValueError(f"seq_len={ctx} exceeds the model's max_seq_len={config.max_seq_len}")
        sweep = patterns if patterns is not None else default_sweep(config, ctx, score_tokens)
        names = [config.canonical_pattern(p) for p in sweep]  # validates every pattern up front
        if "dense" not in names:
            names.insert(0, "dense")  # the reference of kv_frac
        stream = token_stream(texts, em.require_tokenizer("the budget comparison"), em.eos_id, max_tokens)
        own: list[dict[str, Any]] = []
        # the comparison is zero-shot by design: one line per model names the unadapted patterns, not one each
        unadapted = [n for n in names if em.status(n).startswith("not adapted")]
        if unadapted:
            logger.warning(
                "%s: %d of %d patterns not adapted (%s): %s; the budget comparison scores them zero-shot",
                em.name,
                len(unadapted),
                len(names),
                em.status(unadapted[0]).removeprefix("not adapted (").removesuffix(")"),
                ", ".join(unadapted),
            )
        for name in names:
            status = em.status(name)
            r = budget_nll(em.model, stream, name, ctx, score_tokens, batch_size, None, progress, f"{em.name} {name}")
            if r["tokens"] == 0:
                raise ValueError("no scored tokens: every target follows an EOS; give longer documents")
            mean = r["nll_sum"] / r["tokens"]
            row = {
                "model": em.name,
                "method": method_of(config, name),
                "pattern": name,
                "status": status,
                "nll": mean,
                "ppl": math.exp(mean),
                "tokens": r["tokens"],
                "seq_len": ctx,
                "score_tokens": score_tokens,
                "kv_bytes": r["kv_bytes"],
                "kv_bytes_per_token": r["kv_bytes"] / ctx,
                "num_kv_heads": config.num_kv_heads,
            }
            if extra is not None:
                row.update(extra(em, name))
            own.append(row)
        dense_bytes = next(r["kv_bytes"] for r in own if r["pattern"] == "dense")
        for row in own:
            row["kv_frac"] = row["kv_bytes"] / dense_bytes
        rows += own
    return rows


def compare_at_bytes(rows: list[dict[str, Any]], model: str, pattern: str, against: list[tuple[str, str]]) -> dict:
    """``model``/``pattern``'s perplexity against each (model, method): that method's best (lowest)
    perplexity among its rows holding at least as many KV bytes. Returns {"<model> <method>": {"pattern",
    "ppl", "kv_bytes", "gain"}} with gain = other ppl / this ppl - 1 (0.10 = this one 10% better)."""
    (ref,) = [r for r in rows if r["model"] == model and r["pattern"] == pattern]
    out = {}
    for other_model, method in against:
        cands = [
            r for r in rows if r["model"] == other_model and r["method"] == method and r["kv_bytes"] >= ref["kv_bytes"]
        ]
        if not cands:
            continue
        best = min(cands, key=lambda r: r["ppl"])
        out[f"{other_model} {method}"] = {
            "pattern": best["pattern"],
            "ppl": best["ppl"],
            "kv_bytes": best["kv_bytes"],
            "gain": best["ppl"] / ref["ppl"] - 1,
        }
    return out
