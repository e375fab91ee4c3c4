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
    d = bsub.add_parser("decode", help="per-token decode latency and KV bytes vs context, dense vs sparse")
    d.add_argument("--context-lens", type=_ints, default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    d.add_argument("--patterns", default="D4,D16,D64,topk-B64-K16-W64-P4-quest", help="compared with dense")
    d.add_argument("--heads", type=int, default=12)
    d.add_argument("--head-dim", type=int, default=64)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--steps", type=int, default=10, help="timed decode steps per point (median)")
    d.add_argument("--model-preset", default="125m", help="whole-model tokens/s at this preset ('none' to skip)")
    d.add_argument("--model-context", type=int, default=16384)
    d.add_argument("--model-patterns", default="dense,D16", help="the first one is the baseline")
    d.add_argument("--model-batch", type=_ints, default=[1, 4], help="batch sizes of the whole-model line")
    d.add_argument("--model-steps", type=int, default=8)
    d.add_argument(
        "--no-peer",
        action="store_true",
        help="skip the same-size LlamaForCausalLM rows (DynamicCache and StaticCache; need transformers)",
    )
    d.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default). 1 by default: single-token decode is memory-bound, and on "
        "a shared CPU multi-threaded small kernels mostly measure scheduler stalls",
    )
    d.add_argument("--device", default="auto")
    d.add_argument("--dtype", default="auto", help="float32 on CPU by default, bfloat16 on CUDA")
    d.add_argument("--plot", default="bench_decode.png", help="PNG path ('' to skip)")
    d.add_argument("--json", default=None, help="also write the JSON record to this file")
    d.set_defaults(func=_decode)
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
    _add_hf(bsub)


def _apply_threads(threads: int) -> None:
    """--threads: 0 keeps torch's default, n > 0 pins torch to n threads."""
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


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


def _decode(args) -> int:
    from ratplus.bench.decode import run

    _apply_threads(args.threads)
    device = resolve_device(args.device)
    preset = None if args.model_preset.lower() in ("", "none") else args.model_preset
    run(
        contexts=args.context_lens,
        patterns=[p for p in args.patterns.split(",") if p],
        heads=args.heads,
        head_dim=args.head_dim,
        batch=args.batch,
        steps=args.steps,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        model_preset=preset,
        model_context=args.model_context,
        model_patterns=[p for p in args.model_patterns.split(",") if p],
        model_batches=args.model_batch,
        peer=not args.no_peer,
        model_steps=args.model_steps,
        plot_path=args.plot or None,
        json_path=args.json,
    )
    return 0


def _train(args) -> int:
    from ratplus.bench.train import run

    _apply_threads(args.threads)
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


def _add_hf(bsub) -> None:
    h = bsub.add_parser("hf", help="transformers generate() vs ratplus.generate (same tokens, time ratio)")
    h.add_argument("--preset", default="demo", help="model preset with random weights (ignored with --model)")
    h.add_argument("--model", default=None, help="native model folder instead of a preset")
    h.add_argument("--pattern", default="D16-W256-P4")
    h.add_argument("--batch", type=int, default=1)
    h.add_argument("--prompt-len", type=int, default=256)
    h.add_argument("--new-tokens", type=int, default=64)
    h.add_argument("--repeats", type=int, default=3)
    h.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default); 1 by default, as in bench decode: on a shared CPU, "
        "multi-threaded small kernels mostly measure scheduler stalls",
    )
    h.add_argument("--device", default="auto")
    h.add_argument("--dtype", default="auto", help="float32 on CPU by default, bfloat16 on CUDA")
    h.add_argument("--no-peer", action="store_true", help="skip the same-size LlamaForCausalLM generate() rows")
    h.add_argument("--json", default=None, help="also write the JSON record to this file")
    h.set_defaults(func=_hf)


def _hf(args) -> int:
    from ratplus.bench.hf import run

    _apply_threads(args.threads)
    device = resolve_device(args.device)
    run(
        preset=args.preset,
        model_dir=args.model,
        pattern=args.pattern,
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        json_path=args.json,
        peer=not args.no_peer,
    )
    return 0
