"""``ratplus bench <what>`` subcommands."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ratplus.cli.common import (
    add_machine_flags,
    apply_threads,
    byte_size,
    ints,
    names,
    picked,
    positive_int,
    seconds,
)
from ratplus.runtime import resolve_device, resolve_dtype


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (table + one JSON line)")
    bsub = bench.add_subparsers(dest="what", metavar="WHAT")
    bsub.required = True
    a = bsub.add_parser("attention", help="attention operator / layer prefill latency, dense vs sparse")
    a.add_argument(
        "--seq-lens",
        type=ints,
        default=[1024, 2048, 4096, 8192, 16384, 32768],
        help="sequence lengths T timed, comma-separated",
    )
    a.add_argument(
        "--patterns",
        type=names,
        default="D4,D16,D64,D16-W256-P4,local-W256-P4",
        help="sparse patterns timed against dense",
    )
    a.add_argument("--heads", type=positive_int, default=8, help="attention heads H")
    a.add_argument("--head-dim", type=positive_int, default=64, help="head size K")
    a.add_argument("--batch", type=positive_int, default=1, help="batch B (see --tokens-per-call)")
    a.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per point after warm-up (median)")
    a.add_argument("--layer-len", type=positive_int, default=4096, help="T of the full-layer measurements")
    a.add_argument("--no-layer", action="store_true", help="skip the full-layer measurements")
    a.add_argument(
        "--tokens-per-call",
        type=positive_int,
        default=None,
        help="batch = this // T for each T (the paper's protocol uses 262144) (default: off, --batch at every T)",
    )
    a.add_argument(
        "--with-scan",
        action="store_true",
        help="time the RAT+ operator (gated scan + attention) and add a 'RAT+ dense' row",
    )
    add_machine_flags(a)
    a.set_defaults(func=_attention)

    d = bsub.add_parser("decode", help="per-token decode latency and KV bytes vs context, dense vs sparse")
    d.add_argument(
        "--context-lens",
        type=ints,
        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072],
        help="cached context lengths of the one-layer decode step, comma-separated",
    )
    d.add_argument(
        "--patterns", type=names, default="D4,D16,D64,topk-B64-K16-W64-P4-quest", help="sparse patterns, vs dense"
    )
    d.add_argument("--heads", type=positive_int, default=12, help="attention heads H of the one-layer step")
    d.add_argument("--head-dim", type=positive_int, default=64, help="head size K of the one-layer step")
    d.add_argument("--batch", type=positive_int, default=1, help="batch B of the one-layer step")
    d.add_argument("--steps", type=positive_int, default=10, help="timed decode steps per point (median)")
    d.add_argument("--model-preset", default="125m", help="whole-model tokens/s at this preset ('none' to skip)")
    d.add_argument("--model-context", type=positive_int, default=16384, help="cached context of the whole-model line")
    d.add_argument("--model-patterns", type=names, default="dense,D16", help="the first one is the baseline")
    d.add_argument("--model-batch", type=ints, default=[1, 4], help="batch sizes of the whole-model line")
    d.add_argument("--model-steps", type=positive_int, default=8, help="timed decode steps of the whole-model line")
    d.add_argument(
        "--no-peer",
        action="store_true",
        help="skip the same-size LlamaForCausalLM rows (DynamicCache and StaticCache; need transformers)",
    )
    d.add_argument("--plot", default="bench_decode.png", help="PNG path ('' to skip)")
    d.add_argument("--no-layer", action="store_true", help="skip the one-layer measurements (and their plot)")
    real = d.add_argument_group("real model (--ckpt): prefill + decode tokens/s on English prose, next to peers")
    real.add_argument(
        "--ckpt",
        default=None,
        help="model folder: time its real prefill and decode, instead of --model-preset (default: none)",
    )
    real.add_argument(
        "--peer",
        type=names,
        default=None,
        help="engines timed in the same rounds, of transformers,llama.cpp; 'none' for none; llama.cpp is "
        "optional: skipped with a note unless llama-cpp-python is installed (default: transformers)",
    )
    real.add_argument(
        "--peer-source",
        default=None,
        help="transformers' source: HF folder, .gguf or pkg:<wheel> (default: the folder's imported_from)",
    )
    real.add_argument("--gguf", default=None, help="llama.cpp's GGUF file (default: the import source's)")
    real.add_argument("--prompt-lens", type=ints, default=[2048, 8192], help="prompt lengths (tokens)")
    real.add_argument("--decode-tokens", type=positive_int, default=16, help="greedy steps timed after each prefill")
    real.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds per prompt length (median)")
    add_machine_flags(d, threads=True)
    d.set_defaults(func=_decode)

    t = bsub.add_parser("train", help="training tokens/s, RAT+ vs the attention baseline, dense and joint steps")
    t.add_argument("--presets", type=names, default="demo", help="comma-separated model presets (e.g. demo,125m)")
    t.add_argument("--seq-lens", type=ints, default=[1024, 4096], help="sequence lengths of a step, comma-separated")
    t.add_argument("--batch", type=positive_int, default=1, help="sequences per step")
    t.add_argument("--repeats", type=positive_int, default=2, help="timed steps per point after warm-up (median)")
    t.add_argument("--no-breakdown", action="store_true", help="skip timing the scan / gate pieces alone")
    t.add_argument("--profile", action="store_true", help="op-level CPU profile of RAT+ vs attention, dense step")
    add_machine_flags(t, dtype_help="float32 on CPU by default, bfloat16 autocast on CUDA", threads=True)
    t.set_defaults(func=_train)

    h = bsub.add_parser("hf", help="transformers generate() vs ratplus.generate (same tokens, time ratio)")
    h.add_argument("--preset", default="demo", help="model preset with random weights (ignored with --model)")
    h.add_argument("--model", default=None, help="native model folder instead of a preset (default: --preset)")
    h.add_argument("--pattern", default="D16-W256-P4", help="attention pattern both generate() calls use")
    h.add_argument("--batch", type=positive_int, default=1, help="prompts per generate() call")
    h.add_argument("--prompt-len", type=positive_int, default=256, help="prompt tokens")
    h.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per call")
    h.add_argument("--repeats", type=positive_int, default=3, help="timed calls after warm-up (median)")
    h.add_argument("--no-peer", action="store_true", help="skip the same-size LlamaForCausalLM generate() rows")
    h.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd HF forward and generate() next to eager "
        "(default: off; compiling takes minutes on CPU)",
    )
    add_machine_flags(h, threads=True)
    h.set_defaults(func=_hf)
    _add_serve(bsub)


def _add_serve(bsub) -> None:
    s = bsub.add_parser("serve", help="ratplus serve under N concurrent streaming clients, dense vs sparse")
    s.add_argument("--ckpt", default=None, help="model folder (default: --preset with random weights)")
    s.add_argument("--preset", default="125m", help="model preset with random weights, without --ckpt")
    s.add_argument("--patterns", type=names, default="dense,D16-W256-P4", help="patterns served and timed")
    s.add_argument("--clients", type=ints, default=[1, 4, 16, 64], help="concurrent streaming clients, comma-separated")
    s.add_argument("--prompt-len", type=positive_int, default=4096, help="prompt tokens per request")
    s.add_argument("--new-tokens", type=positive_int, default=64, help="max_tokens per request")
    s.add_argument("--kv-memory", type=byte_size, default="2GiB", help="the server's --kv-memory")
    s.add_argument(
        "--admission-len", type=positive_int, default=8192, help="prompt + max_tokens of the admission count"
    )
    s.add_argument("--server-threads", type=positive_int, default=1, help="torch threads of the server process")
    s.add_argument("--compile", action="store_true", help="compile the server's decode step")
    s.add_argument(
        "--phases",
        type=names,
        default="throughput,admission",
        help="of throughput, admission, soak, prefix (TTFT of prompts sharing a prefix, with and without the "
        "server's prefix cache)",
    )
    s.add_argument("--prefix-len", type=positive_int, default=2048, help="shared prompt prefix of the prefix phase")
    s.add_argument("--suffix-len", type=positive_int, default=64, help="tokens of each prompt after the shared prefix")
    s.add_argument(
        "--prefix-requests", type=positive_int, default=4, help="requests per server after the first (prefix phase)"
    )
    s.add_argument("--prefill-chunk", type=positive_int, default=512, help="the prefix phase servers' --prefill-chunk")
    s.add_argument("--soak-seconds", type=seconds, default=600.0, help="seconds the soak phase runs")
    s.add_argument("--soak-clients", type=positive_int, default=64, help="concurrent clients of the soak phase")
    s.add_argument("--soak-prompt", type=positive_int, default=256, help="longest soak prompt (tokens)")
    add_machine_flags(s)
    s.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=False,
        help="also serve the same-size transformers Llama with `transformers serve --continuous-batching` "
        "and drive it with the same clients (throughput rows; off by default: a second server, run after)",
    )  # fmt: skip
    s.set_defaults(func=_serve)


def _run(what: str, args: argparse.Namespace, **kwargs: Any) -> int:
    """``ratplus.bench.<what>.run(**kwargs)`` on the device, dtype and threads the flags name."""
    apply_threads(getattr(args, "threads", 0))  # every number flag was checked by its type (cli.common)
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
    shape = picked(args, "preset", "pattern", "batch", "prompt_len", "new_tokens", "repeats", "compile")
    return _run("hf", args, model_dir=args.model, peer=not args.no_peer, **shape)


def _serve(args) -> int:
    shape = picked(args, "ckpt", "preset", "patterns", "clients", "prompt_len", "new_tokens")
    shape["kv_memory"] = str(args.kv_memory)  # bytes, passed on to the server's --kv-memory
    extra = picked(args, "admission_len", "server_threads", "compile", "phases", "soak_seconds", "soak_clients")
    extra |= picked(args, "prefix_len", "suffix_len", "prefix_requests", "prefill_chunk")
    return _run("serve", args, **shape, **extra, soak_prompt=args.soak_prompt, peer=args.peer)
