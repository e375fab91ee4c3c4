"""Evaluation runs with their output: a table on stdout and the result files under ``out_dir``
(``ppl.json`` + ``ppl.png``, ``budget.json`` + ``budget.png``, ``niah.json`` + ``niah_predictions.jsonl``,
``longbench.json`` + ``longbench_predictions.jsonl``). The ``ratplus eval`` commands call these; nothing is written into
a checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ratplus.eval.common import EvalModel
from ratplus.runtime import environment, print_table, write_json, write_jsonl


def run_ppl(
    models: list[EvalModel],
    texts: list[str],
    patterns: list[str],
    out_dir: str | Path,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    plot: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of each model under each pattern: table, ``ppl.json`` (+ ``ppl.png``) in out_dir."""
    from ratplus.eval.plots import plot_ppl
    from ratplus.eval.ppl import check_ppl_args, evaluate_ppl

    check_ppl_args(patterns, seq_len, batch_size, max_tokens)

    if len({em.name for em in models}) < len(models):  # same folder name twice: label by full path
        for em in models:
            em.label = em.label or str(em.path)
    rows: list[dict[str, Any]] = []
    for em in models:
        rows += evaluate_ppl(em, texts, patterns, seq_len, batch_size, max_tokens, progress)
    print_table(
        ["model", "pattern", "ppl", "bpb", "attn FLOPs", "KV cache", "tokens", "status"],
        [
            [r["model"], r["pattern"], r["ppl"], r["bpb"], r["attn_flop_frac"], r["kv_frac"], r["tokens"], r["status"]]
            for r in rows
        ],
    )
    return _write_curve("ppl", rows, models, out_dir, plot_ppl if plot else None)


def _write_curve(kind: str, rows: list[dict[str, Any]], models: list[EvalModel], out_dir, plot_fn) -> dict[str, Any]:
    """``<kind>.json`` (rows + environment) and, with ``plot_fn``, ``<kind>.png`` in ``out_dir``."""
    out = Path(out_dir)
    record: dict[str, Any] = {"eval": kind, "results": rows, **environment(models[0].device, _dtype(models[0]))}
    record["json"] = str(write_json(out / f"{kind}.json", record))
    if plot_fn is not None:
        record["plot"] = str(plot_fn(rows, out / f"{kind}.png"))
    return record


def run_budget(
    models: list[EvalModel],
    texts: list[str],
    out_dir: str | Path,
    patterns: list[str] | None = None,
    seq_len: int | None = None,
    score_tokens: int = 8,
    batch_size: int = 8,
    max_tokens: int | None = None,
    plot: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Quality vs KV-cache bytes of every model, method and budget (``ratplus.eval.budget``): table,
    ``budget.json`` (+ ``budget.png``) in out_dir."""
    from ratplus.eval.budget import evaluate_budget
    from ratplus.eval.plots import plot_budget

    if len({em.name for em in models}) < len(models):  # same folder name twice: label by full path
        for em in models:
            em.label = em.label or str(em.path)
    # The recall probe's accuracy joins these rows through evaluate_budget's ``extra`` hook once
    # ratplus/eval/recall.py exists (it is built on another branch).
    rows = evaluate_budget(models, texts, patterns, seq_len, score_tokens, batch_size, max_tokens, progress)
    print_table(
        ["model", "method", "pattern", "ppl", "KV bytes/token", "KV vs dense", "tokens", "status"],
        [
            [
                r["model"],
                r["method"],
                r["pattern"],
                r["ppl"],
                r["kv_bytes_per_token"],
                r["kv_frac"],
                r["tokens"],
                r["status"],
            ]
            for r in rows
        ],
    )
    return _write_curve("budget", rows, models, out_dir, plot_budget if plot else None)


def _dtype(em: EvalModel):
    return next(em.model.parameters()).dtype


def _niah_table(result: dict[str, Any]) -> None:
    scores = result["scores"]
    lengths = sorted({n for s in scores.values() for n in s}, key=int)
    print(f"NIAH string-match-all x100 | {result['model']} | pattern {result['pattern']} ({result['status']})")
    print_table(["task", *lengths], [[t, *(s.get(n, float("nan")) for n in lengths)] for t, s in scores.items()])


def run_niah(
    em: EvalModel,
    patterns: list[str],
    out_dir: str | Path,
    samples: list[dict[str, Any]] | None = None,
    tasks: str | list[str] | None = None,
    lengths: list[int] = (1024, 2048, 4096),  # type: ignore[assignment]
    num_samples: int = 5,
    depths: list[float] | None = None,
    max_new_tokens: int | None = None,
    essay_path: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """NIAH for each pattern on one set of test samples (given, or generated with the model's
    tokenizer); writes ``niah.json`` and ``niah_predictions.jsonl``."""
    from ratplus.eval.niah import DEFAULT_DEPTHS, DEFAULT_MAX_NEW_TOKENS, evaluate_niah, generate_niah

    if samples is None:
        samples = generate_niah(
            em.require_tokenizer("NIAH sample generation"),
            tasks,
            lengths,
            num_samples,
            depths or DEFAULT_DEPTHS,
            split="test",
            seed=seed,
            essay_path=essay_path,
            max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            max_len=em.config.max_seq_len,
            progress=progress,
        )
    results, predictions = [], []
    for pattern in patterns:
        r = evaluate_niah(em, samples, pattern, max_new_tokens, progress)
        _niah_table(r)
        predictions += [{**s, "pattern": r["pattern"]} for s in r.pop("samples")]
        results.append(r)
    out = Path(out_dir)
    write_jsonl(out / "niah_predictions.jsonl", predictions)
    record = {"eval": "niah", "model": em.name, "results": results, **environment(em.device, _dtype(em))}
    record["json"] = str(write_json(out / "niah.json", record))
    return record


def run_longbench(
    em: EvalModel,
    data_paths: list[str],
    patterns: list[str],
    out_dir: str | Path,
    datasets: list[str] | None = None,
    context_length: int = 4096,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """LongBench for each pattern; writes ``longbench.json`` and ``longbench_predictions.jsonl``."""
    from ratplus.eval.longbench import evaluate_longbench, load_longbench

    data = load_longbench(data_paths, datasets)
    results, predictions = [], []
    for pattern in patterns:
        r = evaluate_longbench(em, data, pattern, context_length, limit, progress)
        predictions += [{**p, "pattern": r["pattern"]} for p in r.pop("predictions")]
        results.append(r)
    names = list(data)
    print(f"LongBench x100 | {em.name} | context {results[0]['context_length']}")
    print_table(
        ["pattern", *names, "average", "status"],
        [[r["pattern"], *(r["scores"][n] for n in names), r["average"], r["status"]] for r in results],
    )
    out = Path(out_dir)
    write_jsonl(out / "longbench_predictions.jsonl", predictions)
    record = {"eval": "longbench", "model": em.name, "results": results, **environment(em.device, _dtype(em))}
    record["json"] = str(write_json(out / "longbench.json", record))
    return record
