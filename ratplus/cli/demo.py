"""``ratplus demo``: the end-to-end job (``ratplus.demo``) with its budget flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ratplus.cli.common import add_device, fraction, nonneg_int, positive_float, positive_int, shown_default
from ratplus.demo.pipeline import Demo, DemoConfig
from ratplus.demo.report import print_summary
from ratplus.io.corpus import CORPORA
from ratplus.io.lock import folder_lock
from ratplus.runtime import resolve_device

#: DemoConfig fields set by the flag of the same name (their number types refuse bad values)
_CONFIG_FLAGS = (
    *("pretrain_tokens", "recall_steps", "recall_lr", "recall_adapt_steps"),
    *("corpus", "joint_pattern", "dense_warmup", "seed", "recall_seed"),
)


def _default(field: str) -> str:
    return shown_default(getattr(DemoConfig, field), getattr(DemoConfig.quick(), field))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train dense, adapt sparse, evaluate: the end-to-end main job",
        description="Train dense, adapt sparse, evaluate, on a bundled corpus: 11-13 minutes on an idle "
        "2-core CPU (10 min 38 s and 13 min 4 s measured), several times that when other jobs share the "
        "cores. Ends with the models' stable names (<out>/models/...) and commands to run them (docs/guides/demo.md).",
    )
    p.add_argument("--out", default="demo_out", help="output folder (finished stages are reused)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run with tiny budgets, numbers meaningless (about 1 minute on an idle 2-core CPU)",
    )
    add_device(p, "cpu")
    p.add_argument(
        "--pretrain-tokens", type=positive_int, help=f"tokens per pretrained model {_default('pretrain_tokens')}"
    )
    p.add_argument(
        "--recall-steps",
        type=positive_int,
        help=f"recall probe pretraining steps; other stages are reused {_default('recall_steps')}",
    )
    p.add_argument("--recall-lr", type=positive_float, help=f"recall probe peak LR {_default('recall_lr')}")
    p.add_argument(
        "--recall-adapt-steps",
        type=positive_int,
        help=f"recall probe adaptation steps per sparse pattern {_default('recall_adapt_steps')}",
    )
    p.add_argument("--corpus", choices=CORPORA, help=f"bundled training corpus {_default('corpus')}")
    p.add_argument("--joint-pattern", help=f"RAT+'s joint-training sparse branch {_default('joint_pattern')}")
    p.add_argument(
        "--dense-warmup",
        type=fraction,
        help=f"fraction of RAT+'s pretraining batches trained dense only first {_default('dense_warmup')}",
    )
    p.add_argument(
        "--seed", type=nonneg_int, help=f"seed of the pretraining, adaptation and sampling stages {_default('seed')}"
    )
    p.add_argument(
        "--recall-seed",
        type=nonneg_int,
        help=f"recall probe seed; the probe runs on {DemoConfig.recall_threads} torch thread whatever the machine, "
        f"so a seed gives the same figures anywhere {_default('recall_seed')}",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    kw: dict[str, Any] = dict(out_dir=args.out, device=args.device, progress=not args.no_progress)
    for name in _CONFIG_FLAGS:
        if getattr(args, name) is not None:  # a flag not given keeps DemoConfig's (or quick's) value
            kw[name] = getattr(args, name)
    resolve_device(args.device)  # an unknown or unavailable --device fails before any work
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    with folder_lock(cfg.out_dir, "demo"):  # one demo per output folder
        results = Demo(cfg).run()
    print_summary(results)
    print(f"\nreport: {Path(cfg.out_dir) / 'report.md'}")
    return 0
