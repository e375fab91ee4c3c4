"""Automatic hybrid patterns: per-layer (optionally per head-group) patterns under a KV-cache budget.

``tune_pattern`` starts every unit (a layer, or a group of heads of a layer) at the sparsest rung of
a ladder of candidate patterns (default D64, D32, D16, D8, D4, D2, dense) and greedily upgrades,
one rung at a time, the unit whose upgrade buys the largest calibration-perplexity drop per KV
byte, as long as the whole model's cache stays within ``kv_budget`` x the dense cache. It stops
when no upgrade fits or none lowers the perplexity.

KV bytes are those of a real ``RATPlusCache`` for one sequence of ``seq_len`` tokens (slots of every
head group plus RAT+'s recurrent state), so the budget is exact. Calibration perplexity is
``ratplus.eval.ppl.stream_nll`` over the calibration text, full windows of ``seq_len``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ratplus.config import AttentionPattern, HeadGroups, ModelConfig, pattern_to_str
from ratplus.eval.common import EvalModel
from ratplus.eval.ppl import stream_nll, token_stream
from ratplus.model.cache import RATPlusCache

logger = logging.getLogger("ratplus")

DEFAULT_LADDER = ("D64", "D32", "D16", "D8", "D4", "D2", "dense")


def kv_bytes(config: ModelConfig, pattern: Any, seq_len: int) -> int:
    """Bytes of the decoding cache of one sequence of ``seq_len`` tokens under ``pattern``."""
    return RATPlusCache(config, pattern, batch_size=1, max_len=seq_len).nbytes()


def assemble(config: ModelConfig, choice: list[int], ladder: list[AttentionPattern], head_groups: int) -> str:
    """The pattern string of a choice (rung index per unit, layer-major), equal neighbours merged."""
    n = config.num_heads // head_groups
    layers = []
    for i in range(config.num_layers):
        groups: list[tuple[AttentionPattern, int]] = []
        for g in range(head_groups):
            p = ladder[choice[i * head_groups + g]]
            if groups and groups[-1][0] == p:
                groups[-1] = (p, groups[-1][1] + n)
            else:
                groups.append((p, n))
        layers.append(HeadGroups(tuple(groups)))
    return pattern_to_str(layers)


def tune_pattern(
    em: EvalModel,
    texts: list[str],
    kv_budget: float,
    ladder: list[str] | tuple[str, ...] = DEFAULT_LADDER,
    head_groups: int = 1,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy budgeted search (module docstring). Returns {"pattern", "ppl", "kv_bytes", "kv_frac",
    "kv_budget", "dense_kv_bytes", "steps": [...], "uniform": [...], "best_uniform_at_or_above"} where
    ``uniform`` holds every ladder pattern applied to all layers with its calibration perplexity and
    bytes, and the last is the cheapest of them with at least the chosen pattern's bytes."""
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)) or not 0 < kv_budget <= 1:
        raise ValueError(f"kv_budget must be in (0, 1] (a fraction of the dense KV cache), got {kv_budget!r}")
    config = em.config
    if head_groups < 1 or config.num_heads % head_groups or (config.num_heads // head_groups) % config.kv_group:
        raise ValueError(
            f"head_groups={head_groups} must divide num_heads={config.num_heads} into whole KV groups "
            f"(num_kv_heads={config.num_kv_heads})"
        )
    T = seq_len or config.max_seq_len
    rungs = [AttentionPattern.parse(p) for p in ladder]
    if not rungs:
        raise ValueError("ladder (--ladder) is empty: give the candidate patterns, e.g. D64,D16,D4,dense")
    for p in rungs:
        if p.is_snapkv or p.is_topk:
            raise ValueError(f"ladder pattern {p} is not a fixed-slot pattern (dense / dilated / local)")
    dense = kv_bytes(config, "dense", T)
    limit = kv_budget * dense
    stream = token_stream(texts, em.require_tokenizer("tune-pattern"), em.eos_id, max_tokens)
    memo: dict[str, float] = {}

    def ppl(pattern: str) -> float:
        if pattern not in memo:
            r = stream_nll(em.model, stream, pattern, T, batch_size, progress, desc=f"tune {pattern}")
            memo[pattern] = math.exp(r["nll_sum"] / max(1, r["tokens"]))
        return memo[pattern]

    units = config.num_layers * head_groups
    rungs = sorted(rungs, key=lambda p: kv_bytes(config, p, T))  # sparsest first
    choice = [0] * units
    current = assemble(config, choice, rungs, head_groups)
    cur_bytes = kv_bytes(config, current, T)
    if cur_bytes > limit:
        raise ValueError(
            f"the sparsest assignment ({current}) needs {cur_bytes / dense:.3f} of the dense KV cache, above "
            f"kv_budget={kv_budget}; raise the budget or add a sparser ladder pattern"
        )
    cur_ppl = ppl(current)
    steps = [{"pattern": current, "ppl": cur_ppl, "kv_bytes": cur_bytes}]
    while True:
        best = None
        for u in range(units):
            if choice[u] + 1 >= len(rungs):
                continue
            cand = list(choice)
            cand[u] += 1
            text = assemble(config, cand, rungs, head_groups)
            nbytes = kv_bytes(config, text, T)
            if nbytes > limit or nbytes <= cur_bytes:
                continue
            gain = (cur_ppl - ppl(text)) / (nbytes - cur_bytes)  # perplexity drop per byte
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, cand, text, nbytes)
        if best is None:
            break
        _, choice, current, cur_bytes = best
        cur_ppl = ppl(current)
        steps.append({"pattern": current, "ppl": cur_ppl, "kv_bytes": cur_bytes})
        logger.info("tune-pattern: %s  ppl %.3f  kv %.3f of dense", current, cur_ppl, cur_bytes / dense)
    uniform = []
    for p in rungs:
        nbytes = kv_bytes(config, p, T)
        uniform.append({"pattern": str(p), "ppl": ppl(str(p)), "kv_bytes": nbytes, "kv_frac": nbytes / dense})
    # the fair rival: the cheapest uniform pattern holding at least as many bytes as the chosen one
    # (the best of those at that size); dense, with every byte, would always be the "best" above it
    rivals = [u for u in uniform if u["kv_bytes"] >= cur_bytes]
    rival = min(rivals, key=lambda u: (u["kv_bytes"], u["ppl"])) if rivals else None
    return {
        "pattern": config.canonical_pattern(current),
        "ppl": cur_ppl,
        "kv_bytes": cur_bytes,
        "kv_frac": cur_bytes / dense,
        "kv_budget": kv_budget,
        "dense_kv_bytes": dense,
        "seq_len": T,
        "head_groups": head_groups,
        "tokens": int(stream.scored.sum()),
        "steps": steps,
        "uniform": uniform,
        "best_uniform_at_or_above": rival,
    }
