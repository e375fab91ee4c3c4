"""``ratplus serve``: an OpenAI-compatible server over one model folder, one weight copy, several
attention patterns (docs/guides/serve.md).

    ratplus serve --ckpt PATH --patterns dense,D16-W256-P4 --port 8000 --kv-memory 4GiB

``--port 0`` picks a free port; the line ``ratplus serve: listening on http://HOST:PORT`` says which.
The decode step is compiled on CUDA by default (``--compile`` / ``--no-compile``); torch's compile
cache is kept under ``~/.cache/ratplus/torchinductor`` (unless ``TORCHINDUCTOR_CACHE_DIR`` is set),
so a restart reuses it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from ratplus.cli.common import (
    DTYPE_HELP,
    add_device,
    byte_size,
    names,
    nonneg_int,
    port,
    positive_int,
    seconds,
)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--ckpt", required=True, help="model folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument(
        "--patterns",
        type=names,
        default=None,
        help="comma-separated attention patterns to serve, e.g. dense,D16-W256-P4 (default: the folder's "
        "default or adapted pattern, and dense)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="model name in the API (default: metadata.json's name, else the folder's name, or for a run's "
        "final/checkpoint folder the model config's name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=8000, help="TCP port; 0 = any free one (the listening line names it)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="most requests running at once")
    p.add_argument("--max-queue", type=positive_int, default=64, help="most requests waiting; more get HTTP 429")
    p.add_argument(
        "--kv-memory",
        type=byte_size,
        default="4GiB",
        help="KV-cache budget of the admitted requests: bytes, or 512MB (MB = 10**6 B), 4GiB (GiB = 2**30 B)",
    )
    p.add_argument(
        "--prefix-cache-memory",
        type=_size_or_off,
        default="512MiB",
        help="memory for snapshots of shared prompt prefixes, prefilled once and reused (LRU); 0 = off "
        "(default: 512MiB)",
    )
    p.add_argument(
        "--prefill-chunk", type=positive_int, default=512, help="prompt tokens prefilled between decode steps"
    )
    p.add_argument("--shutdown-grace", type=seconds, default=10.0, help="seconds running requests get after SIGTERM")
    add_device(p)
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch threads, 0 = torch's choice")
    compile_ = p.add_mutually_exclusive_group()
    compile_.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="compile the decode step (default on CUDA only: on CPU it costs seconds per shape)",
    )
    compile_.add_argument("--no-compile", dest="compile", action="store_false", help="never compile the decode step")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the server's log level (debug also logs every request)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every /v1 route, else HTTP 401 (default: the "
        "RATPLUS_API_KEY environment variable if set, which keeps the key out of the process list; "
        "else no key: anyone who reaches the port may use the API)",
    )
    p.add_argument(
        "--max-body",
        type=byte_size,
        default="4MiB",
        help="largest request body: bytes, or 512KiB, 4MiB; a larger one gets HTTP 413 (default: 4MiB)",
    )
    p.set_defaults(func=_run)


def _size_or_off(text: str) -> int:
    """``byte_size``, or 0 for ``0`` / ``off``."""
    return 0 if str(text).strip().lower() in ("0", "off") else byte_size(text)


def _api_key(args) -> str | None:
    """--api-key, else $RATPLUS_API_KEY, else None (no key). Never printed."""
    key = args.api_key if args.api_key is not None else os.environ.get("RATPLUS_API_KEY")
    if key is not None and not key.strip():
        raise ValueError("--api-key / RATPLUS_API_KEY must not be empty (unset it to run without a key)")
    return key


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _run(args) -> int:
    t0 = time.perf_counter()
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"ratplus serve needs the serve extra: pip install 'ratplus[serve]' ({e})") from e
    import torch

    from ratplus.cli.common import apply_threads
    from ratplus.io.folder import load_config, load_pretrained, load_tokenizer
    from ratplus.io.metadata import read_metadata
    from ratplus.runtime import resolve_device, resolve_dtype
    from ratplus.serve.app import ServeState, create_app, load_chat_template, run_server
    from ratplus.serve.engine import Engine, served_name

    kv_memory = args.kv_memory  # bytes (common.byte_size)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = load_config(args.ckpt)  # a bad folder or pattern fails before the weights load
    meta = read_metadata(args.ckpt)
    specs = args.patterns or [s for s in (meta.default_pattern or meta.adapted_pattern, "dense") if s]
    if isinstance(specs[0], list):
        specs = [*specs[0], "dense"]
    patterns = []
    for spec in specs:
        try:
            canonical = config.canonical_pattern(spec)
        except ValueError as e:
            raise ValueError(f"--patterns: {e}") from e
        if canonical not in patterns:
            patterns.append(canonical)
    tokenizer = load_tokenizer(args.ckpt)
    if tokenizer is None:
        raise ValueError(f"{args.ckpt} has no tokenizer.json; the server needs one to read and write text")
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    if compile_:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "ratplus" / "torchinductor"))
    from ratplus.serve.admission import parse_bytes

    api_key, max_body = _api_key(args), parse_bytes(args.max_body, "--max-body")
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ValueError(f"--host/--port: cannot listen on {args.host}:{args.port} ({e.strerror})") from e
    model = load_pretrained(args.ckpt, device=device, dtype=dtype)
    engine = Engine(
        model,
        patterns,
        kv_memory,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        compile=compile_,
        prefix_memory=args.prefix_cache_memory,
    )
    t_load = time.perf_counter() - t0
    if compile_:
        with torch.inference_mode():
            print(f"ratplus serve: compiled the decode step in {engine.warm_up():.1f} s", file=sys.stderr)
    name = args.name or served_name(args.ckpt, config.name, meta.to_dict())
    state = ServeState(engine, tokenizer, name, load_chat_template(args.ckpt))
    app = create_app(state, shutdown_grace=args.shutdown_grace, api_key=api_key, max_body=max_body)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"ratplus serve: {name} on {device} ({dtype}), patterns {', '.join(patterns)}, kv-memory {kv_memory:,} B, "
        f"compile {'on' if compile_ else 'off'}; loaded in {t_load:.1f} s, ready in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    if api_key is None and not _is_loopback(args.host):
        print(
            f"ratplus serve: warning: {args.host} is not a loopback address and there is no API key: anyone "
            "who can reach this port can use the API; set RATPLUS_API_KEY (or --api-key)",
            file=sys.stderr,
            flush=True,
        )
    print(f"ratplus serve: listening on http://{shown}:{port}", file=sys.stderr, flush=True)
    sock.listen(2048)
    run_server(app, sock, shutdown_grace=args.shutdown_grace, log_level=args.log_level)
    return 0
