"""``ratplus eval ...``: perplexity, NIAH (data and evaluation) and LongBench.

Each command prints a table, writes its files under ``--out`` (never into the checkpoint) and
prints one JSON summary line last. lm-evaluation-harness runs through ``python -m ratplus.lm_eval``.
The ``run_*`` functions are the library entry points the commands (and the demo) call.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ratplus.bench.common import environment, print_table, resolve_device, resolve_dtype
from ratplus.eval.common import EvalModel, open_checkpoint, read_jsonl, write_json, write_jsonl

logger = logging.getLogger("ratplus")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _summary_line(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True))


def _open(path: str, device: str, dtype: str) -> EvalModel:
    dev = resolve_device(device)
    return open_checkpoint(path, device=dev, dtype=resolve_dtype(dtype, dev))


# ---- library entry points -------------------------------------------------------------------------


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
    from ratplus.eval.ppl import evaluate_ppl

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
    out = Path(out_dir)
    record: dict[str, Any] = {"eval": "ppl", "results": rows, **environment(models[0].device, _dtype(models[0]))}
    record["json"] = str(write_json(out / "ppl.json", record))
    if plot:
        record["plot"] = str(plot_ppl(rows, out / "ppl.png"))
    return record


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


# ---- argparse ----------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="float32 on CPU by default, bfloat16 on CUDA")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(sub) -> None:
    from ratplus.eval.niah import DEFAULT_DEPTHS, DEFAULT_MAX_NEW_TOKENS
    from ratplus.eval.ppl import DEFAULT_PATTERNS

    ev = sub.add_parser("eval", help="evaluation: perplexity, needle in a haystack, LongBench")
    esub = ev.add_subparsers(dest="what", metavar="WHAT")
    esub.required = True

    p = esub.add_parser("ppl", help="held-out perplexity / bits per byte per pattern (table, JSON, PNG)")
    p.add_argument("--ckpt", action="append", required=True, help="model folder (repeat for several models)")
    p.add_argument("--patterns", type=_names, default=list(DEFAULT_PATTERNS), help="comma-separated patterns")
    p.add_argument("--data", nargs="+", required=True, help=".txt/.md/.jsonl files or folders of held-out text")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="score about this many tokens (default: all)")
    p.add_argument("--no-plot", action="store_true")
    _common(p, "runs/eval/ppl")
    p.set_defaults(func=_cmd_ppl)

    depths = ",".join(str(d) for d in DEFAULT_DEPTHS)
    p = esub.add_parser("niah", help="RULER needle-in-a-haystack tasks, greedy decoding, string-match-all")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--pattern", "--patterns", dest="patterns", type=_names, default=["dense"])
    p.add_argument("--tasks", default="all", help="comma-separated NIAH tasks (default: all 8)")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096])
    p.add_argument("--num-samples", type=int, default=5, help="samples per task and length")
    p.add_argument("--depths", type=_floats, default=list(DEFAULT_DEPTHS), help=f"needle depths %% (default {depths})")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    p.add_argument("--essay", default=None, help="prose file for essay haystacks (default: the bundled plays)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="evaluate this NIAH JSONL instead of generating samples")
    _common(p, "runs/eval/niah")
    p.set_defaults(func=_cmd_niah)

    p = esub.add_parser("niah-data", help="write NIAH samples (train or test split) as JSONL, eval or SFT form")
    p.add_argument("--tokenizer", required=True, help="model folder or tokenizer.json sizing the samples")
    p.add_argument("--tasks", default="all")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096])
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--depths", type=_floats, default=list(DEFAULT_DEPTHS))
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--essay", default=None)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--format", choices=("eval", "sft"), default="eval")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_niah_data)

    p = esub.add_parser("longbench", help="LongBench v1 on local JSONL files (middle truncation, greedy)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--pattern", "--patterns", dest="patterns", type=_names, default=["dense"])
    p.add_argument("--data", nargs="+", required=True, help="<dataset>.jsonl files or folders of them")
    p.add_argument("--datasets", type=_names, default=None, help="only these datasets")
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--limit", type=int, default=None, help="records per dataset")
    _common(p, "runs/eval/longbench")
    p.set_defaults(func=_cmd_longbench)
    _add_recall(esub)


def _cmd_ppl(args) -> int:
    from ratplus.eval.corpus import read_documents

    texts = read_documents(args.data)
    models = [_open(c, args.device, args.dtype) for c in args.ckpt]
    rec = run_ppl(
        models,
        texts,
        args.patterns,
        args.out,
        args.seq_len,
        args.batch_size,
        args.max_tokens,
        not args.no_plot,
        not args.quiet,
    )
    _summary_line(
        {k: v for k, v in rec.items() if k != "results"}
        | {
            "results": [
                {k: r[k] for k in ("model", "pattern", "ppl", "bpb", "attn_flop_frac", "kv_frac", "status")}
                for r in rec["results"]
            ]
        }
    )
    return 0


def _cmd_niah(args) -> int:
    em = _open(args.ckpt, args.device, args.dtype)
    samples = read_jsonl(args.data) if args.data else None
    rec = run_niah(
        em,
        args.patterns,
        args.out,
        samples,
        args.tasks,
        args.lengths,
        args.num_samples,
        args.depths,
        args.max_new_tokens,
        args.essay,
        args.seed,
        not args.quiet,
    )
    _summary_line(
        {k: v for k, v in rec.items() if k != "results"}
        | {
            "results": [
                {"pattern": r["pattern"], "status": r["status"], "mean": r["scores"]["mean"]} for r in rec["results"]
            ]
        }
    )
    return 0


def _load_tokenizer_arg(path: str):
    from ratplus.model.io import load_config, load_tokenizer

    p = Path(path)
    if p.is_dir():
        tok = load_tokenizer(p)
        if tok is None:
            raise FileNotFoundError(f"model folder {p} has no tokenizer.json")
        return tok, load_config(p).max_seq_len
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(p)), None
    except Exception as e:
        raise ValueError(f"cannot read tokenizer {p}: {e}") from e


def _cmd_niah_data(args) -> int:
    from ratplus.eval.niah import generate_niah, to_sft

    tok, max_len = _load_tokenizer_arg(args.tokenizer)
    records = generate_niah(
        tok,
        args.tasks,
        args.lengths,
        args.num_samples,
        args.depths,
        args.split,
        args.seed,
        args.essay,
        args.max_new_tokens,
        max_len,
        not args.quiet,
    )
    if args.format == "sft":
        records = [to_sft(r) for r in records]
    path = write_jsonl(args.out, records)
    print(f"wrote {len(records)} {args.split} samples ({args.format} form) to {path}")
    _summary_line(
        {"eval": "niah-data", "split": args.split, "seed": args.seed, "records": len(records), "out": str(path)}
    )
    return 0


def _cmd_longbench(args) -> int:
    em = _open(args.ckpt, args.device, args.dtype)
    rec = run_longbench(
        em, args.data, args.patterns, args.out, args.datasets, args.context_length, args.limit, not args.quiet
    )
    _summary_line(
        {k: v for k, v in rec.items() if k != "results"}
        | {
            "results": [
                {"pattern": r["pattern"], "status": r["status"], "scores": r["scores"], "average": r["average"]}
                for r in rec["results"]
            ]
        }
    )
    return 0


# ---- eval recall (self-contained: parse, call ratplus.eval.recall.run_recall_probe) ---------------


def _add_recall(esub) -> None:
    p = esub.add_parser(
        "recall",
        help="MQAR recall probe: train RAT+ and an attention baseline from scratch, accuracy per pattern",
    )
    p.add_argument("--quick", action="store_true", help="smoke budget (tiny task and model, < 2 min on 2 cores)")
    task = p.add_argument_group("task")
    task.add_argument("--pairs", type=int, help="key-value pairs per sequence (default 6)")
    task.add_argument("--spread", type=int, help="chunk size holding at most one pair (default 16)")
    task.add_argument("--seq-len", type=int, help="context length T (default 128)")
    task.add_argument("--filler-vocab", type=int)
    task.add_argument("--key-vocab", type=int)
    task.add_argument("--value-vocab", type=int)
    task.add_argument("--packed", action="store_true", default=None, help="pairs adjacent in the body, no spread")
    tr = p.add_argument_group("training")
    tr.add_argument("--d-model", type=int)
    tr.add_argument("--layers", dest="num_layers", type=int)
    tr.add_argument("--heads", dest="num_heads", type=int)
    tr.add_argument("--steps", type=int, help="pretraining batches (default 1500)")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float, help="peak LR (default 1e-3)")
    tr.add_argument("--no-joint", dest="joint_train", action="store_false", default=None, help="dense-only pretraining")
    tr.add_argument("--joint-pattern", help="RAT+ sparse branch (default D16-W0-P0)")
    tr.add_argument("--baseline-joint-pattern", help="baseline sparse branch (default local-W16-P0)")
    tr.add_argument("--dense-warmup-steps", type=int, help="dense-only batches before joint training starts")
    tr.add_argument("--adapt-steps", type=int, help="resolution adaptation batches per sparse pattern (0 = none)")
    tr.add_argument("--adapt-lr-mult", type=float, help="adaptation LR as a multiple of --lr (paper: 0.1)")
    tr.add_argument("--adapt-patterns", type=_names, help="patterns to adapt to (default: every dilated/local one)")
    tr.add_argument("--load", default=None, help="reuse the pretrained weights of a previous probe's --out folder")
    p.add_argument("--patterns", type=_names, help="comma-separated patterns (default: scaled to the context)")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--models", type=_names, help="ratplus,baseline (default both)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default="runs/eval/recall", help="output folder (default runs/eval/recall)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_recall)


def _cmd_recall(args) -> int:
    from ratplus.eval.recall import OPTION_NAMES, recall_config, run_recall_probe

    given = {k: v for k, v in vars(args).items() if k in OPTION_NAMES}
    cfg = recall_config(args.quick, progress=not args.quiet, **given)
    rec = run_recall_probe(cfg, args.out, load_from=args.load, plot=not args.no_plot)
    keep = ("model", "pattern", "acc", "acc_adapted")
    _summary_line(
        {"eval": "recall", "json": rec["json"], "plot": rec.get("plot"), "adapt_budget": rec["adapt_budget"]}
        | {"results": [{k: r[k] for k in keep} for r in rec["rows"]]}
    )
    return 0
