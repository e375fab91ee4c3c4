"""``ratplus bench <what>`` subcommands."""

from __future__ import annotations

import argparse

from ratplus.bench.common import resolve_device, resolve_dtype


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (table + one JSON line)")
    bsub = bench.add_subparsers(dest="what", metavar="WHAT")
    bsub.required = True
    a = bsub.add_parser("attention", help="attention operator / layer prefill latency, dense vs sparse")
    a.add_argument("--seq-lens", type=_ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    a.add_argument("--patterns", default="D4,D16,D64,D16-W256-P4,local-W256-P4")
    a.add_argument("--heads", type=int, default=8)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--device", default="auto")
    a.add_argument("--dtype", default="auto", help="float32 on CPU by default, bfloat16 on CUDA")
    a.add_argument("--layer-len", type=int, default=4096, help="T of the full-layer measurements")
    a.add_argument("--no-layer", action="store_true", help="skip the full-layer measurements")
    a.add_argument(
        "--tokens-per-call",
        type=int,
        default=None,
        help="batch = this // T for each T (the paper's protocol uses 262144)",
    )
    a.add_argument(
        "--with-scan",
        action="store_true",
        help="time the RAT+ operator (gated scan + attention) and add a 'RAT+ dense' row",
    )
    a.add_argument("--json", default=None, help="also write the JSON record to this file")
    a.set_defaults(func=_attention)
    t = bsub.add_parser("train", help="training tokens/s, RAT+ vs the attention baseline, dense and joint steps")
    t.add_argument("--presets", default="demo", help="comma-separated model presets (e.g. demo,125m)")
    t.add_argument("--seq-lens", type=_ints, default=[1024, 4096])
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="auto", help="float32 on CPU by default, bfloat16 autocast on CUDA")
    t.add_argument("--no-breakdown", action="store_true", help="skip timing the scan / gate pieces alone")
    t.add_argument("--profile", action="store_true", help="op-level CPU profile of RAT+ vs attention, dense step")
    t.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default). 1 by default, as bench decode: on a shared CPU, "
        "multi-threaded small kernels mostly measure scheduler stalls",
    )
    t.add_argument("--json", default=None, help="also write the JSON record to this file")
    t.set_defaults(func=_train)


def _attention(args) -> int:
    from ratplus.bench.attention import run

    device = resolve_device(args.device)
    run(
        seq_lens=args.seq_lens,
        patterns=[p for p in args.patterns.split(",") if p],
        heads=args.heads,
        head_dim=args.head_dim,
        batch=args.batch,
        repeats=args.repeats,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        layer=not args.no_layer,
        layer_len=args.layer_len,
        json_path=args.json,
        tokens_per_call=args.tokens_per_call,
        with_scan=args.with_scan,
    )
    return 0


def _train(args) -> int:
    import torch

    from ratplus.bench.train import run

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    run(
        presets=[p for p in args.presets.split(",") if p],
        seq_lens=args.seq_lens,
        batch=args.batch,
        repeats=args.repeats,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        breakdown=not args.no_breakdown,
        json_path=args.json,
        profile=args.profile,
    )
    return 0
