"""``ratplus eval ...``: perplexity, quality vs KV budget, NIAH (data and evaluation) and LongBench.

Each command prints a table, writes its files under ``--out`` (never into the checkpoint) and
prints one JSON summary line last. lm-evaluation-harness runs through ``ratplus eval lm-eval`` (or
``python -m ratplus.cli.lm_eval``).
The ``run_*`` functions it calls live in ``ratplus.eval.report``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ratplus.cli.common import (
    DTYPE_HELP,
    add_device,
    ints,
    lazy_default,
    names,
    nonneg_int,
    percents,
    positive_float,
    positive_int,
    shown_default,
)
from ratplus.eval.common import EvalModel, open_checkpoint
from ratplus.eval.report import run_budget, run_longbench, run_niah, run_ppl
from ratplus.runtime import check_dir, emit_json, read_jsonl, resolve_device, resolve_dtype, write_jsonl

logger = logging.getLogger("ratplus")


def _open(path: str, device: str, dtype: str) -> EvalModel:
    dev = resolve_device(device)
    return open_checkpoint(path, device=dev, dtype=resolve_dtype(dtype, dev))


# ---- argparse ----------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, out: str) -> None:
    add_device(p)
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _held_out(p: argparse.ArgumentParser, batch: str) -> None:
    """--seq-len, --batch-size, --max-tokens and --no-plot of the perplexity commands."""
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="window length (default: the model's max_seq_len)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help=batch)
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="read about this many tokens (default: all of --data)"
    )
    p.add_argument("--no-plot", action="store_true", help="no PNG")


def _niah_samples(p: argparse.ArgumentParser, num_samples: int) -> None:
    """The flags that make NIAH samples (eval niah, eval niah-data)."""
    from ratplus.eval.niah import DEFAULT_DEPTHS

    p.add_argument("--tasks", default="all", help="comma-separated NIAH tasks, or all (the 8 RULER tasks)")
    p.add_argument("--lengths", type=ints, default=[1024, 2048, 4096], help="haystack lengths in tokens")
    p.add_argument("--num-samples", type=positive_int, default=num_samples, help="samples per task and length")
    p.add_argument(
        "--depths",
        type=percents,
        default=list(DEFAULT_DEPTHS),
        help="depths of the first needle, in %% of the haystack (0 = start, 100 = end)",
    )
    p.add_argument("--essay", default=None, help="prose file for essay haystacks (default: the bundled plays)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the samples")


def add_parser(sub) -> None:
    from ratplus.eval.niah import DEFAULT_MAX_NEW_TOKENS
    from ratplus.eval.ppl import DEFAULT_PATTERNS

    ev = sub.add_parser(
        "eval",
        help="evaluation: perplexity (ppl), quality vs KV-cache bytes (budget), the MQAR recall probe (recall), "
        "needle in a haystack (niah, niah-data), LongBench, lm-eval",
    )
    esub = ev.add_subparsers(dest="what", metavar="WHAT")
    esub.required = True

    p = esub.add_parser("ppl", help="held-out perplexity / bits per byte per pattern (table, JSON, PNG)")
    p.add_argument("--ckpt", action="append", required=True, help="model folder (repeat for several models)")
    p.add_argument("--patterns", type=names, default=list(DEFAULT_PATTERNS), help="comma-separated patterns")
    p.add_argument("--data", nargs="+", required=True, help=".txt/.md/.jsonl files or folders of held-out text")
    _held_out(p, "windows per forward pass")
    _common(p, "runs/eval/ppl")
    p.set_defaults(func=_cmd_ppl)

    p = esub.add_parser("budget", help="held-out perplexity vs KV-cache bytes per method and budget (table, JSON, PNG)")
    p.add_argument("--ckpt", action="append", required=True, help="model folder (repeat for several models)")
    p.add_argument("--data", nargs="+", required=True, help=".txt/.md/.jsonl files or folders of held-out text")
    p.add_argument(
        "--patterns", type=names, default=None, help="comma-separated patterns (default: the matched-budget sweep)"
    )
    p.add_argument("--score-tokens", type=positive_int, default=8, help="tokens scored after each window's prompt")
    _held_out(p, "windows per forward pass")
    _common(p, "runs/eval/budget")
    p.set_defaults(func=_cmd_budget)

    p = esub.add_parser("niah", help="RULER needle-in-a-haystack tasks, greedy decoding, string-match-all")
    p.add_argument("--ckpt", required=True, help="model folder")
    p.add_argument(
        "--pattern", "--patterns", dest="patterns", type=names, default=["dense"], help="comma-separated patterns"
    )
    _niah_samples(p, 5)
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help=f"answer tokens (default: the samples' own, {DEFAULT_MAX_NEW_TOKENS} for generated ones)",
    )
    p.add_argument(
        "--data", default=None, help="evaluate this NIAH JSONL (default: generate the samples with the flags above)"
    )
    _common(p, "runs/eval/niah")
    p.set_defaults(func=_cmd_niah)

    p = esub.add_parser("niah-data", help="write NIAH samples (train or test split) as JSONL, eval or SFT form")
    p.add_argument("--tokenizer", required=True, help="model folder or tokenizer.json sizing the samples")
    _niah_samples(p, 100)
    p.add_argument(
        "--split", choices=("train", "test"), default="test", help="which haystacks and needles (disjoint splits)"
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, help="answer tokens reserved per sample"
    )
    p.add_argument(
        "--format", choices=("eval", "sft"), default="eval", help="eval records, or prompt/answer pairs for sft"
    )
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_niah_data)

    p = esub.add_parser("longbench", help="LongBench v1 on local JSONL files (middle truncation, greedy)")
    p.add_argument("--ckpt", required=True, help="model folder")
    p.add_argument(
        "--pattern", "--patterns", dest="patterns", type=names, default=["dense"], help="comma-separated patterns"
    )
    p.add_argument("--data", nargs="+", required=True, help="<dataset>.jsonl files or folders of them")
    p.add_argument(
        "--datasets", type=names, default=None, help="only these datasets (default: every one found in --data)"
    )
    p.add_argument(
        "--context-length",
        type=positive_int,
        default=4096,
        help="prompt + answer tokens; longer prompts lose their middle (capped at the model's max_seq_len)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="records per dataset (default: all)")
    _common(p, "runs/eval/longbench")
    p.set_defaults(func=_cmd_longbench)
    _add_recall(esub)

    # everything after `lm-eval` goes to lm-eval's own parser: "+" as the prefix keeps argparse from
    # reading its --options (and -h) as ours
    p = esub.add_parser(
        "lm-eval",
        prefix_chars="+",
        add_help=False,
        help="lm-evaluation-harness with the ratplus model registered (lm-eval's options; -h for them)",
    )
    p.add_argument("lm_eval_args", nargs="*", help="lm-eval's own options, passed on as they are")
    p.set_defaults(func=_cmd_lm_eval)


def _texts_and_models(args) -> tuple[list[str], list[EvalModel]]:
    """The held-out documents of ``--data`` and every ``--ckpt``, after ``--out`` is checked (before
    any model is loaded)."""
    from ratplus.io.corpus import read_documents

    check_dir(args.out)
    return read_documents(args.data), [_open(c, args.device, args.dtype) for c in args.ckpt]


def _emit_summary(rec: dict, keep: tuple[str, ...]) -> None:
    """The run's record as one JSON line, each result row cut to ``keep``."""
    rows = [{k: r[k] for k in keep} for r in rec["results"]]
    emit_json({k: v for k, v in rec.items() if k != "results"} | {"results": rows})


def _cmd_ppl(args) -> int:
    texts, models = _texts_and_models(args)
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
    _emit_summary(rec, ("model", "pattern", "ppl", "bpb", "attn_flop_frac", "kv_frac", "status"))
    return 0


def _cmd_budget(args) -> int:
    texts, models = _texts_and_models(args)
    rec = run_budget(
        models,
        texts,
        args.out,
        args.patterns,
        args.seq_len,
        args.score_tokens,
        args.batch_size,
        args.max_tokens,
        not args.no_plot,
        not args.quiet,
    )
    _emit_summary(rec, ("model", "method", "pattern", "ppl", "kv_bytes", "kv_frac", "status"))
    return 0


def _cmd_niah(args) -> int:
    check_dir(args.out)
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
    emit_json(
        {k: v for k, v in rec.items() if k != "results"}
        | {
            "results": [
                {"pattern": r["pattern"], "status": r["status"], "mean": r["scores"]["mean"]} for r in rec["results"]
            ]
        }
    )
    return 0


def _load_tokenizer_arg(path: str):
    from ratplus.io.folder import load_config, load_tokenizer

    p = Path(path)
    if p.is_dir():
        tok = load_tokenizer(p)
        if tok is None:
            raise FileNotFoundError(f"model folder {p} has no tokenizer.json")
        return tok, load_config(p).max_seq_len
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    from ratplus.io.tokenizer import load_tokenizer_file

    return load_tokenizer_file(p), None


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
    emit_json({"eval": "niah-data", "split": args.split, "seed": args.seed, "records": len(records), "out": str(path)})
    return 0


def _cmd_longbench(args) -> int:
    check_dir(args.out)
    em = _open(args.ckpt, args.device, args.dtype)
    rec = run_longbench(
        em, args.data, args.patterns, args.out, args.datasets, args.context_length, args.limit, not args.quiet
    )
    emit_json(
        {k: v for k, v in rec.items() if k != "results"}
        | {
            "results": [
                {"pattern": r["pattern"], "status": r["status"], "scores": r["scores"], "average": r["average"]}
                for r in rec["results"]
            ]
        }
    )
    return 0


def _cmd_lm_eval(args) -> int:
    from ratplus.cli.lm_eval import main

    return main(args.lm_eval_args, prog="ratplus eval lm-eval")


# ---- eval recall (self-contained: parse, call ratplus.eval.recall.run_recall_probe) ---------------


def _add_recall(esub) -> None:
    p = esub.add_parser(
        "recall",
        help="MQAR recall probe: train RAT+ and an attention baseline from scratch, accuracy per pattern",
    )
    p.add_argument("--quick", action="store_true", help="smoke budget (tiny task and model, < 2 min on 2 cores)")
    task = p.add_argument_group("task")
    _recall(task, "--pairs", positive_int, "key-value pairs per sequence")
    _recall(task, "--spread", positive_int, "chunk size holding at most one pair")
    _recall(task, "--seq-len", positive_int, "context length T")
    _recall(task, "--filler-vocab", positive_int, "distinct filler tokens")
    _recall(task, "--key-vocab", positive_int, "distinct keys")
    _recall(task, "--value-vocab", positive_int, "distinct values")
    task.add_argument("--packed", action="store_true", default=None, help="pairs adjacent in the body, no spread")
    tr = p.add_argument_group("training")
    _recall(tr, "--d-model", positive_int, "model width C")
    _recall(tr, "--layers", positive_int, "layers", "num_layers")
    _recall(tr, "--heads", positive_int, "heads per layer", "num_heads")
    _recall(tr, "--steps", positive_int, "pretraining batches")
    _recall(tr, "--batch-size", positive_int, "sequences per batch")
    _recall(tr, "--lr", positive_float, "peak LR")
    tr.add_argument("--no-joint", dest="joint_train", action="store_false", default=None, help="dense-only pretraining")
    _recall(tr, "--joint-pattern", str, "RAT+ sparse branch")
    _recall(tr, "--baseline-joint-pattern", str, "baseline sparse branch")
    _recall(tr, "--dense-warmup-steps", nonneg_int, "dense-only batches before joint training starts")
    _recall(tr, "--adapt-steps", nonneg_int, "resolution adaptation batches per sparse pattern, 0 = none")
    _recall(tr, "--adapt-lr-mult", positive_float, "adaptation LR as a multiple of --lr (paper: 0.1)")
    tr.add_argument(
        "--adapt-constant-lr",
        action="store_true",
        default=None,
        help="keep the adaptation LR at its peak (default: cosine decay to the minimum)",
    )
    _recall(tr, "--adapt-eval-every", nonneg_int, "accuracy every N adaptation steps, the adaptation curve; 0 = off")
    _recall(tr, "--adapt-patterns", names, "patterns to adapt to", none="every dilated/local one evaluated")
    tr.add_argument(
        "--load",
        default=None,
        help="reuse the pretrained weights of a previous probe's --out folder (default: train them)",
    )
    _recall(p, "--patterns", names, "comma-separated patterns", none="scaled to the context T")
    _recall(p, "--eval-batches", positive_int, "test batches per pattern")
    _recall(p, "--models", names, "ratplus, baseline or both")
    _recall(p, "--seed", nonneg_int, "seed of the task and the models")
    p.add_argument("--threads", type=nonneg_int, help="torch threads, 0 = torch's choice (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.add_argument("--out", default="runs/eval/recall", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_recall)


def _recall(p, flag: str, type_: Any, help: str, field: str | None = None, none: str = "") -> None:
    """A flag of the recall probe, None unless given; its help shows ``RecallConfig``'s default and the
    ``--quick`` one (``none``: what a default of None means), read only when --help is printed."""
    field = field or flag[2:].replace("-", "_")

    def shown() -> str:
        from ratplus.eval.recall import RecallConfig, quick_config

        full, quick = RecallConfig(), quick_config()
        value = [c.task if hasattr(c.task, field) else c for c in (full, quick)]
        full_value, quick_value = (getattr(c, field) for c in value)
        return shown_default(none if full_value is None else full_value, quick_value)

    lazy_default(p.add_argument(flag, dest=field, type=type_, help=help), shown)


def _cmd_recall(args) -> int:
    from ratplus.eval.recall import OPTION_NAMES, recall_config, run_recall_probe

    given = {k: v for k, v in vars(args).items() if k in OPTION_NAMES}
    cfg = recall_config(args.quick, progress=not args.quiet, **given)
    rec = run_recall_probe(cfg, args.out, load_from=args.load, plot=not args.no_plot)
    keep = ("model", "pattern", "acc", "acc_adapted")
    emit_json(
        {"eval": "recall", "json": rec["json"], "plot": rec.get("plot"), "adapt_budget": rec["adapt_budget"]}
        | {"results": [{k: r[k] for k in keep} for r in rec["rows"]]}
    )
    return 0
