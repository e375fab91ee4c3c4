"""Multi-query associative recall (MQAR): does sparse inference keep in-context retrieval?

Shapes: B batch (sequences), T sequence length, V vocab (filler + key + value tokens).

The task (the Zoology study's MQAR, arranged so dilation cannot cheat): a body of filler tokens holds
``pairs`` key-value pairs written as two adjacent tokens ``k v``; the body is cut into chunks of
``spread`` tokens and each chunk holds at most one pair, at a random offset inside its chunk, so a
pair lands on a chunk end (a dilated key when ``spread`` = D) only as often as chance allows. After
the body every key is queried once, in random order, each followed by its value; only those answers
are targets. Filler, key and value tokens come from separate vocabularies, so the answer can only be
found by looking the key up in the context. The answers are teacher-forced, so a model that binds
nothing can still rule out the values already answered (``elimination_floor``: about 41% at 6
pairs); the first query's accuracy (``first_query``) is the clean measure of retrieval.
``packed=True`` writes the pairs next to each other at a random place in the body instead (for comparison).

The probe trains a RAT+ model and an attention baseline of the same size from scratch on this task
with the project's training semantics (``ratplus.train.trainer.optimizer_steps``: joint training is a
sparse optimizer step then a dense one on the same batch; the baseline's sparse branch is a local
window), optionally adapts each to every sparse pattern (DESIGN.md section 5, resolution adaptation),
and reports answer accuracy per pattern: a table, ``recall.json`` and ``recall.png``.

The parts: ``recall_task`` (the sequences, their seed streams, the scoring), ``recall_train`` (the
settings, training and adaptation, the probe folder's models), this module (traces of what the model
attends to, the run and its report); every name stays importable from here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ratplus.eval.plots import plot_recall
from ratplus.eval.recall_task import (
    SPLITS,
    RecallBatch,
    RecallTask,
    answer_accuracy,
    answer_matrix,
    batches,
    default_patterns,
    elimination_floor,
    evaluate_accuracy,
    make_batch,
)
from ratplus.eval.recall_train import (
    OPTION_NAMES,
    TASK_FIELDS,
    RecallConfig,
    _pattern,
    adapt,
    demo_config,
    load_probe_model,
    pretrain,
    probe_model_path,
    quick_config,
    recall_config,
)
from ratplus.io.folder import save_pretrained
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import atomic_write_text, make_dir, print_table


def gate_profile(model: RATPlusLM, b: RecallBatch, task: RecallTask) -> list[dict[str, float]]:
    """Mean forget gate g per layer over key, value, filler and query-key positions (RAT+ only): a gate
    near 1 keeps the state (the token is let through weakly), near 0 writes the token in."""
    if not model.config.apply_re:
        return []
    out: list[dict[str, float]] = []
    device = next(model.parameters()).device
    ids = b.input_ids.to(device)
    F_, K_ = task.filler_vocab, task.key_vocab
    kinds = {
        "filler": ids < F_,
        "key": (ids >= F_) & (ids < F_ + K_),
        "value": ids >= F_ + K_,
    }
    query = torch.zeros_like(ids, dtype=torch.bool)
    query.scatter_(1, b.query_pos.to(device), True)
    kinds["key"] &= ~query
    kinds["query_key"] = query
    with torch.no_grad():
        x = model.embedding.wte(ids)  # (B, T, C)
        cos, sin = model.rope(torch.arange(ids.shape[1], device=device), x.dtype)
        for block in model.backbone.layers:
            _, _, _, _, g = block.seq_layer.project(x)  # g (B, H, T, K)
            gm = g.mean(dim=(1, 3))  # (B, T)
            out.append({k: float(gm[m].mean()) for k, m in kinds.items() if m.any()})
            x = block(x, model.resolve_pattern(None)[0], cos, sin)
    return out


@torch.no_grad()
def _attention_weights(model: RATPlusLM, ids: torch.Tensor, pattern: str) -> Iterator[torch.Tensor]:
    """Per layer, the attention weights (B, H, T, S) of ``pattern`` (dense or dilated/local) on ``ids``
    (B, T), recomputed from the layer's projections with the exact mask (reference semantics)."""
    from ratplus.ops.attention.masks import dilated_mask
    from ratplus.ops.rope import apply_rope

    T = ids.shape[1]
    cos, sin = model.rope(torch.arange(T, device=ids.device), torch.float32)
    mask = dilated_mask(_pattern(pattern), T, T, device=ids.device)  # (T, S)
    x = model.embedding.wte(ids)  # (B, T, C)
    for block, lp in zip(model.backbone.layers, model.resolve_pattern(pattern), strict=True):
        layer = block.seq_layer
        _, q, k, v, g = layer.project(x)  # (B, H, T, K)
        if g is not None:
            k, v = layer.recur(g, k, v)
        q, k = apply_rope(q, cos, sin), apply_rope(k.to(q.dtype), cos, sin)
        scores = (q @ k.transpose(-1, -2)) * layer.head_dim**-0.5  # (B, H, T, S)
        yield scores.masked_fill(~mask, float("-inf")).softmax(-1)
        x = block(x, lp, cos, sin)


def _asked_pair(ids: torch.Tensor, b: RecallBatch) -> torch.Tensor:
    """(B, n) body position of the key each query asks for (its value sits one later)."""
    pair_pos = b.pair_pos.to(ids.device)
    body_keys = ids.gather(1, pair_pos)  # (B, n)
    asked = ids.gather(1, b.query_pos.to(ids.device))  # (B, n)
    which = (asked.unsqueeze(2) == body_keys.unsqueeze(1)).float().argmax(2)  # (B, n) pair index
    return pair_pos.gather(1, which)


def _rows_at(w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention rows (B, H, n, S) of the query positions ``pos`` (B, n) in weights ``w`` (B, H, T, S)."""
    B, H, _, S = w.shape
    return w.gather(2, pos[:, None, :, None].expand(B, H, pos.shape[1], S))


def _mass_on(rows: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows (B, H, n, S) and one key position per row (B, n): (mass on it, is it the argmax), each
    (B, H, n)."""
    idx = keys[:, None, :, None].expand(-1, rows.shape[1], -1, 1)
    return rows.gather(3, idx).squeeze(3), rows.argmax(3) == keys[:, None, :]


@torch.no_grad()
def carrier_attention(model: RATPlusLM, b: RecallBatch, task: RecallTask, pattern: str) -> list[dict[str, float]]:
    """Where each answer's query looks, per layer, under a dilated ``pattern`` (D > 1).

    The *carrier* of a pair is the first dilated key at or after its value token (the first position
    p >= value with (p + 1) % D == 0): the only dilated key whose recurrent state can hold both key
    and value. For each queried key (the position that predicts the answer) this returns, per layer,
    the attention mass on the carrier (best head) and the fraction of queries whose most-attended key
    (best head) is the carrier; mean over the batch. Uses the exact masks (reference semantics)."""
    p = _pattern(pattern)
    if p.is_topk or p.is_dense or p.dilation_size is None:
        raise ValueError(f"pattern must be dilated with D > 1, got {pattern!r}")
    D = p.dilation_size
    ids = b.input_ids.to(next(model.parameters()).device)
    qp = b.query_pos.to(ids.device)  # (B, n)
    value_pos = _asked_pair(ids, b) + 1  # (B, n)
    carrier = (value_pos + 1 + D - 1) // D * D - 1  # first p >= value_pos with (p + 1) % D == 0
    sel = carrier < qp - p.local_size  # the carrier is a dilated key of the query
    out: list[dict[str, float]] = []
    for w in _attention_weights(model, ids, pattern):
        mass, top = _mass_on(_rows_at(w, qp), carrier)
        out.append(
            {
                "carrier_mass": float(mass.amax(1)[sel].mean()) if sel.any() else float("nan"),
                "carrier_top": float(top.any(1)[sel].float().mean()) if sel.any() else float("nan"),
                "queries": int(sel.sum()),
            }
        )
    return out


@torch.no_grad()
def induction_attention(model: RATPlusLM, b: RecallBatch) -> list[dict[str, float]]:
    """The two attention steps of an induction circuit, per layer, under dense attention.

    Attention solves MQAR in two steps: at each value token a *previous-token* head copies the key just
    before it (``prev_mass``: the value's weight on its key), and at each queried key a *lookup* head
    attends to the value that followed the same key in the body (``lookup_mass`` / ``lookup_top``:
    the weight on that value, and how often it is the most-attended position). Best head, mean over
    the pairs / queries of the batch. RAT+'s recurrence gives the first step for free: its key at
    the value position already mixes the key token in."""
    ids = b.input_ids.to(next(model.parameters()).device)
    key_pos = b.pair_pos.to(ids.device)  # (B, n): every body key, its value one later
    asked_value = _asked_pair(ids, b) + 1  # (B, n)
    out: list[dict[str, float]] = []
    for w in _attention_weights(model, ids, "dense"):
        prev, _ = _mass_on(_rows_at(w, key_pos + 1), key_pos)
        look, top = _mass_on(_rows_at(w, b.query_pos.to(ids.device)), asked_value)
        out.append(
            {
                "prev_mass": float(prev.amax(1).mean()),
                "lookup_mass": float(look.amax(1).mean()),
                "lookup_top": float(top.any(1).float().mean()),
            }
        )
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _print_table(rows: list[dict[str, Any]], models: list[str]) -> None:
    head = ["pattern"]
    for m in models:
        head += [f"{m} zero-shot", f"{m} adapted", f"{m} 1st query"]
    table = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        line: list[Any] = [pattern]
        for m in models:
            r = next(r for r in rows if r["model"] == m and r["pattern"] == pattern)
            line += [_fmt(r["acc"]), _fmt(r.get("acc_adapted")), _fmt(r.get("first_query"))]
        table.append(line)
    print("recall accuracy x100 (answers right; 1st query: the first answer alone, adapted where adapted)")
    print_table(head, table)


def run_recall_probe(
    cfg: RecallConfig, out_dir: str | Path, load_from: str | Path | None = None, plot: bool = True
) -> dict[str, Any]:
    """Train (or load from ``load_from``, a previous probe's folder), adapt, evaluate, report.

    Writes ``<model>/`` (a model folder: the weights after pretraining), ``recall.json`` and ``recall.png`` into
    ``out_dir``, prints the table and returns the record (``rows``: one per model and pattern with
    ``acc`` (zero-shot) and ``acc_adapted``)."""
    cfg.validate()
    cfg.check_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    make_dir(out)  # a clear error for a file standing there, before any training
    # every saved model read and checked before any work starts
    loaded = {}
    if load_from is not None:
        loaded = {n: load_probe_model(load_from, n, cfg.model_config(n == "baseline")) for n in cfg.models}
    patterns = cfg.all_patterns()
    adapt_set = set(cfg.sparse_adapt_patterns()) if cfg.adapt_steps else set()
    test = [make_batch(cfg.task, cfg.batch_size, cfg.seed, "test", i) for i in range(cfg.eval_batches)]
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {"eval": "recall", "config": cfg.to_dict(), "models": {}}
    for name in cfg.models:
        baseline = name == "baseline"
        torch.manual_seed(cfg.seed)
        model = RATPlusLM(cfg.model_config(baseline))
        t0 = time.perf_counter()
        info: dict[str, Any] = {"params": model.num_params()}
        if load_from is not None:
            model = loaded[name]
            info["loaded_from"] = str(load_from)
        else:
            info["train_log"] = pretrain(model, cfg, baseline)
            save_pretrained(model, out / name)  # the project's model folder: safetensors + manifest
        info["pretrain_s"] = round(time.perf_counter() - t0, 1)
        info["gates"] = gate_profile(model, test[0], cfg.task)
        info["induction"] = induction_attention(model, test[0])
        t0 = time.perf_counter()
        for pattern in tqdm(patterns, desc=f"eval {name}", disable=not cfg.progress, leave=False):
            p = _pattern(pattern)
            right = answer_matrix(model, test, pattern).float()  # (N, pairs)
            row: dict[str, Any] = {
                "model": name,
                "pattern": pattern,
                "kind": "topk" if p.is_topk else ("local" if p.dilation_size is None else "dilated"),
                "dilation": p.dilation_size,
                "acc": float(right.mean()),
                "acc_adapted": None,
                "by_query": right.mean(0).tolist(),  # accuracy of the j-th query (elimination_floor)
            }
            if row["kind"] == "dilated" and (p.local_size or p.initial_size) and not p.is_dense:
                row["kind"] = "dilated+window"
            traced = row["kind"] == "dilated" and not p.is_dense
            if traced:
                row["carrier"] = carrier_attention(model, test[0], cfg.task, pattern)
            if pattern in adapt_set:
                curve: list[dict[str, float]] = []
                adapted = adapt(model, cfg, pattern, test=test, curve=curve)
                if curve:
                    row["adapt_curve"] = curve
                right = answer_matrix(adapted, test, pattern).float()
                row["acc_adapted"], row["by_query_adapted"] = float(right.mean()), right.mean(0).tolist()
                row["acc_adapted_dense"] = evaluate_accuracy(adapted, test, "dense")
                if traced:
                    row["carrier_adapted"] = carrier_attention(adapted, test[0], cfg.task, pattern)
                if adapted.config.apply_re:
                    row["gates_adapted"] = gate_profile(adapted, test[0], cfg.task)
            rows.append(row)
        info["eval_adapt_s"] = round(time.perf_counter() - t0, 1)
        record["models"][name] = info
    dense = {r["model"]: r["acc"] for r in rows if r["pattern"] == "dense"}
    for r in rows:
        best = r["acc_adapted"] if r["acc_adapted"] is not None else r["acc"]
        r["frac_of_dense"] = best / dense[r["model"]] if dense.get(r["model"]) else None
    for r in rows:
        r["first_query"] = (r["by_query_adapted"] if r["acc_adapted"] is not None else r["by_query"])[0]
    record["rows"] = rows
    record["elimination_floor"] = elimination_floor(cfg.task.pairs)
    record["adapt_budget"] = {
        "steps": cfg.adapt_steps,
        "lr": cfg.lr * cfg.adapt_lr_mult,
        "lr_mult": cfg.adapt_lr_mult,
        "schedule": "constant" if cfg.adapt_constant_lr else "cosine",
        "fraction_of_pretraining": cfg.adapt_steps / cfg.steps,
    }
    _print_table(rows, list(cfg.models))
    control = next((p for p in patterns if _pattern(p).dilation_size is None and not _pattern(p).is_topk), None)
    record["control"] = control
    atomic_write_text(out / "recall.json", json.dumps(record, indent=1, default=_json_default) + "\n")
    record["json"] = str(out / "recall.json")
    if plot:
        t = cfg.task
        how = f"joint {cfg.joint_pattern} after {cfg.dense_warmup_steps} dense" if cfg.joint_train else "dense"
        title = (
            f"MQAR {t.pairs} pairs, T={t.seq_len}, spread {t.spread}; {cfg.steps} steps ({how});\n"
            f"adapt {cfg.adapt_steps} steps at {cfg.adapt_lr_mult}x LR per pattern"
        )
        record["plot"] = str(plot_recall(rows, out / "recall.png", control, title))
    return record


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = [
    "OPTION_NAMES",
    "SPLITS",
    "TASK_FIELDS",
    "RecallBatch",
    "RecallConfig",
    "RecallTask",
    "adapt",
    "answer_accuracy",
    "answer_matrix",
    "batches",
    "carrier_attention",
    "default_patterns",
    "demo_config",
    "elimination_floor",
    "evaluate_accuracy",
    "gate_profile",
    "induction_attention",
    "load_probe_model",
    "make_batch",
    "pretrain",
    "probe_model_path",
    "quick_config",
    "recall_config",
    "run_recall_probe",
]
