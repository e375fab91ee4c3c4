"""``ratplus bench <what>`` subcommands."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ratplus.cli.common import add_machine_flags, apply_threads, ints, names, picked
from ratplus.runtime import resolve_device, resolve_dtype


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (table + one JSON line)")
    bsub = bench.add_subparsers(dest="what", metavar="WHAT")
    bsub.required = True
    a = bsub.add_parser("attention", help="attention operator / layer prefill latency, dense vs sparse")
    a.add_argument("--seq-lens", type=ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    a.add_argument("--patterns", type=names, default="D4,D16,D64,D16-W256-P4,local-W256-P4")
    a.add_argument("--heads", type=int, default=8)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--repeats", type=int, default=3)
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
    add_machine_flags(a)
    a.set_defaults(func=_attention)

    d = bsub.add_parser("decode", help="per-token decode latency and KV bytes vs context, dense vs sparse")
    d.add_argument("--context-lens", type=ints, default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    d.add_argument("--patterns", type=names, default="D4,D16,D64,topk-B64-K16-W64-P4-quest", help="vs dense")
    d.add_argument("--heads", type=int, default=12)
    d.add_argument("--head-dim", type=int, default=64)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--steps", type=int, default=10, help="timed decode steps per point (median)")
    d.add_argument("--model-preset", default="125m", help="whole-model tokens/s at this preset ('none' to skip)")
    d.add_argument("--model-context", type=int, default=16384)
    d.add_argument("--model-patterns", type=names, default="dense,D16", help="the first one is the baseline")
    d.add_argument("--model-batch", type=ints, default=[1, 4], help="batch sizes of the whole-model line")
    d.add_argument("--model-steps", type=int, default=8)
    d.add_argument(
        "--no-peer",
        action="store_true",
        help="skip the same-size LlamaForCausalLM rows (DynamicCache and StaticCache; need transformers)",
    )
    d.add_argument("--plot", default="bench_decode.png", help="PNG path ('' to skip)")
    d.add_argument("--no-layer", action="store_true", help="skip the one-layer measurements (and their plot)")
    real = d.add_argument_group("real model (--ckpt): prefill + decode tokens/s on English prose, next to peers")
    real.add_argument(
        "--ckpt", default=None, help="model folder: time its real prefill and decode (replaces --model-preset)"
    )
    real.add_argument(
        "--peer",
        type=names,
        default=None,
        help="engines timed in the same rounds, of transformers,llama.cpp (default transformers; 'none' for "
        "none; llama.cpp is optional: skipped with a note unless llama-cpp-python is installed)",
    )
    real.add_argument(
        "--peer-source",
        default=None,
        help="transformers' source (HF folder, .gguf, pkg:<wheel>; default: imported_from)",
    )
    real.add_argument("--gguf", default=None, help="llama.cpp's GGUF file (default: the import source's)")
    real.add_argument("--prompt-lens", type=ints, default=[2048, 8192], help="prompt lengths (tokens)")
    real.add_argument("--decode-tokens", type=int, default=16, help="greedy steps timed after each prefill")
    real.add_argument("--repeats", type=int, default=3, help="interleaved rounds per prompt length (median)")
    add_machine_flags(d, threads=True)
    d.set_defaults(func=_decode)

    t = bsub.add_parser("train", help="training tokens/s, RAT+ vs the attention baseline, dense and joint steps")
    t.add_argument("--presets", type=names, default="demo", help="comma-separated model presets (e.g. demo,125m)")
    t.add_argument("--seq-lens", type=ints, default=[1024, 4096])
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--no-breakdown", action="store_true", help="skip timing the scan / gate pieces alone")
    t.add_argument("--profile", action="store_true", help="op-level CPU profile of RAT+ vs attention, dense step")
    add_machine_flags(t, dtype_help="float32 on CPU by default, bfloat16 autocast on CUDA", threads=True)
    t.set_defaults(func=_train)

    h = bsub.add_parser("hf", help="transformers generate() vs ratplus.generate (same tokens, time ratio)")
    h.add_argument("--preset", default="demo", help="model preset with random weights (ignored with --model)")
    h.add_argument("--model", default=None, help="native model folder instead of a preset")
    h.add_argument("--pattern", default="D16-W256-P4")
    h.add_argument("--batch", type=int, default=1)
    h.add_argument("--prompt-len", type=int, default=256)
    h.add_argument("--new-tokens", type=int, default=64)
    h.add_argument("--repeats", type=int, default=3)
    h.add_argument("--no-peer", action="store_true", help="skip the same-size LlamaForCausalLM generate() rows")
    add_machine_flags(h, threads=True)
    h.set_defaults(func=_hf)
    _add_serve(bsub)


def _add_serve(bsub) -> None:
    s = bsub.add_parser("serve", help="ratplus serve under N concurrent streaming clients, dense vs sparse")
    s.add_argument("--ckpt", default=None, help="model folder (default: --preset with random weights)")
    s.add_argument("--preset", default="125m")
    s.add_argument("--patterns", type=names, default="dense,D16-W256-P4")
    s.add_argument("--clients", type=ints, default=[1, 4, 16, 64])
    s.add_argument("--prompt-len", type=int, default=4096)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--kv-memory", default="2GiB")
    s.add_argument("--admission-len", type=int, default=8192, help="prompt + max_tokens of the admission count")
    s.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process")
    s.add_argument("--compile", action="store_true", help="compile the server's decode step")
    s.add_argument("--phases", type=names, default="throughput,admission", help="of throughput, admission, soak")
    s.add_argument("--soak-seconds", type=float, default=600.0)
    s.add_argument("--soak-clients", type=int, default=64)
    s.add_argument("--soak-prompt", type=int, default=256, help="longest soak prompt (tokens)")
    add_machine_flags(s)
    s.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=False,
        help="also serve the same-size transformers Llama with `transformers serve --continuous-batching` "
        "and drive it with the same clients (throughput rows; off by default: a second server, run after)",
    )  # fmt: skip
    s.set_defaults(func=_serve)


def _run(what: str, args: argparse.Namespace, **kwargs: Any) -> int:
    """``ratplus.bench.<what>.run(**kwargs)`` on the device, dtype and threads the flags name."""
    apply_threads(getattr(args, "threads", 0))
    for flag in ("seq_lens", "context_lens", "model_batch", "clients", "prompt_lens"):
        values = getattr(args, flag, None)
        if values is not None and (not values or min(values) < 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive integers, got {values}")
    for flag in (
        "heads",
        "head_dim",
        "batch",
        "repeats",
        "steps",
        "layer_len",
        "model_steps",
        "prompt_len",
        "new_tokens",
        "admission_len",
        "server_threads",
        "decode_tokens",
    ):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    device = resolve_device(args.device)
    run = importlib.import_module(f"ratplus.bench.{what}").run
    run(device=device, dtype=resolve_dtype(args.dtype, device), json_path=args.json, **kwargs)
    return 0


def _attention(args) -> int:
    shape = picked(args, "seq_lens", "patterns", "heads", "head_dim", "batch", "repeats", "layer_len")
    extra = picked(args, "tokens_per_call", "with_scan")
    return _run("attention", args, layer=not args.no_layer, **shape, **extra)


def _decode(args) -> int:
    shape = picked(args, "patterns", "heads", "head_dim", "batch", "steps", "model_context", "model_patterns")
    return _run(
        "decode",
        args,
        contexts=args.context_lens,
        model_preset=None if args.model_preset.lower() in ("", "none") else args.model_preset,
        model_batches=args.model_batch,
        model_steps=args.model_steps,
        peer=not args.no_peer,
        plot_path=args.plot or None,
        layer=not args.no_layer,
        ckpt=args.ckpt,
        peers=None if args.peer is None else [p for p in args.peer if p.lower() != "none"],
        peer_source=args.peer_source,
        gguf=args.gguf,
        prompt_lens=args.prompt_lens,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        **shape,
    )


def _train(args) -> int:
    shape = picked(args, "presets", "seq_lens", "batch", "repeats", "profile")
    return _run("train", args, breakdown=not args.no_breakdown, **shape)


def _hf(args) -> int:
    shape = picked(args, "preset", "pattern", "batch", "prompt_len", "new_tokens", "repeats")
    return _run("hf", args, model_dir=args.model, peer=not args.no_peer, **shape)


def _serve(args) -> int:
    shape = picked(args, "ckpt", "preset", "patterns", "clients", "prompt_len", "new_tokens", "kv_memory")
    extra = picked(args, "admission_len", "server_threads", "compile", "phases", "soak_seconds", "soak_clients")
    return _run("serve", args, **shape, **extra, soak_prompt=args.soak_prompt, peer=args.peer)
