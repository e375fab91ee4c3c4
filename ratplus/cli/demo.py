"""``ratplus demo``: the end-to-end job (``ratplus.demo``) with its budget flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ratplus.demo.pipeline import Demo, DemoConfig
from ratplus.demo.report import print_summary
from ratplus.io.corpus import CORPORA
from ratplus.io.lock import folder_lock
from ratplus.runtime import resolve_device


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train dense, adapt sparse, evaluate: the end-to-end main job")
    p.add_argument("--out", default="demo_out", help="output folder (finished stages are reused)")
    p.add_argument("--quick", action="store_true", help="smoke run with tiny budgets (a minute or two)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--pretrain-tokens", type=int, help=f"tokens per pretrained model (default {DemoConfig.pretrain_tokens:,})"
    )
    p.add_argument(
        "--recall-steps",
        type=int,
        help=f"recall probe pretraining steps (default {DemoConfig.recall_steps}); other stages are reused",
    )
    p.add_argument("--recall-lr", type=float, help=f"recall probe peak LR (default {DemoConfig.recall_lr:g})")
    p.add_argument(
        "--recall-adapt-steps",
        type=int,
        help=f"recall probe adaptation steps per sparse pattern (default {DemoConfig.recall_adapt_steps})",
    )
    p.add_argument("--corpus", choices=CORPORA, help=f"bundled training corpus (default {DemoConfig.corpus})")
    p.add_argument("--joint-pattern", help=f"RAT+'s joint-training sparse branch (default {DemoConfig.joint_pattern})")
    p.add_argument(
        "--dense-warmup",
        type=float,
        help=f"fraction of RAT+'s pretraining batches trained dense only first (default {DemoConfig.dense_warmup})",
    )
    p.add_argument(
        "--seed", type=int, help=f"seed of the pretraining, adaptation and sampling stages (default {DemoConfig.seed})"
    )
    p.add_argument(
        "--recall-seed",
        type=int,
        help=f"recall probe seed (default {DemoConfig.recall_seed}); the probe runs on "
        f"{DemoConfig.recall_threads} torch thread whatever the machine, so a seed gives the same figures anywhere",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    kw: dict[str, Any] = dict(out_dir=args.out, device=args.device, progress=not args.no_progress)
    for name in ("pretrain_tokens", "recall_steps", "recall_lr", "recall_adapt_steps"):
        value = getattr(args, name)
        if value is not None:
            if not value > 0:  # also refuses nan
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
            kw[name] = value
    for name in ("corpus", "joint_pattern", "dense_warmup", "seed", "recall_seed"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    resolve_device(args.device)  # an unknown or unavailable --device fails before any work
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    with folder_lock(cfg.out_dir, "demo"):  # one demo per output folder
        results = Demo(cfg).run()
    print_summary(results)
    print(f"\nreport: {Path(cfg.out_dir) / 'report.md'}")
    return 0
