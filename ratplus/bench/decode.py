"""``ratplus bench decode``: per-token decode latency and KV-cache bytes versus context length.

Two measurements, each dense versus sparse side by side in one run:

1. One attention layer's decode step (store the new key/value in the cache, attend over it) at each
   context length, for dense and each pattern: median ms per token, the cache's reported bytes, the
   formula P + W + 1 + floor(T / D) slots x 2 x H x K x itemsize (+ state, + top-k summaries), and
   the memory growth while the cache was built and filled (CUDA allocator, or the process's
   resident set on Linux CPU; a hidden over-allocation would show up there).
2. A whole model (default the ``125m`` preset) decoding at one context length: tokens per second
   per pattern and batch size, with the step ``ratplus.generate`` uses (``RATPlusLM.decode_step``;
   the reference step for top-k). The cache is filled with random keys, values and states instead
   of running a long prefill (the per-token cost does not depend on the values); the output says so.
   Peer rows (``transformers`` installed): the same-size ``LlamaForCausalLM`` (same width, depth,
   heads, vocab, tied embeddings, SwiGLU of width 8C/3 rounded up to 256: 2048 at C = 768; random
   weights), decoding at the same context and batch with transformers' default ``DynamicCache``
   (what ``generate()`` uses unless told otherwise; it grows by concatenation) and ``StaticCache``,
   its caches filled with random keys/values the same way. Also per pattern: the bandwidth limit,
   tokens/s if every step read the weights once plus the cache's bytes at the read bandwidth
   measured in the same run (a matrix-vector product over a weight-sized matrix).

With ``ckpt`` (``--ckpt FOLDER``) the whole-model line is a real model instead: its real prefill of
English prose and greedy decode at each prompt length, tokens/s per pattern, next to transformers'
``LlamaForCausalLM`` of the same weights and llama.cpp on its GGUF (``--peer``; llama.cpp only when
``llama-cpp-python`` is installed), with its own parity checks first (``ratplus.bench.engines``).
``layer=False`` (``--no-layer``) skips section 1.

Before timing, each pattern's prefill + decode is checked against a full forward on a tiny model;
a pattern that fails is not timed. Output: a table, a PNG plot, and one JSON line last.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from ratplus.bench.synthetic import fill_synthetic_
from ratplus.config import ModelConfig
from ratplus.eval.plots import save_figure
from ratplus.model.cache import RATPlusCache, cache_nbytes
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import emit_json, environment, print_table

#: On CPU the memory check compares the resident-set growth of building a cache with its bytes.
#: That only works when the cache gets fresh pages rather than reused heap, so while a cache is
#: built glibc is asked to serve every allocation of at least this size with mmap; for the timed
#: steps the threshold goes back to 32 MiB (glibc's dynamic maximum) so temporaries reuse heap.
MMAP_MIN_BYTES = 2**20
_M_MMAP_THRESHOLD = -3
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_PATTERNS = ("D4", "D16", "D64", "topk-B64-K16-W64-P4-quest")


def _mallopt_mmap_threshold(nbytes: int, trim: bool = False) -> bool:
    """glibc's mallopt(M_MMAP_THRESHOLD, nbytes), after malloc_trim(0) (free heap pages go back to
    the system, so reusing them faults fresh pages in) when ``trim``; False without glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if trim:
            libc.malloc_trim(0)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def _fresh_pages(device: torch.device) -> Iterator[bool]:
    """Within: CPU buffers >= 1 MiB get pages of their own. Yields whether the resident-set growth
    is an exact measure of what was allocated."""
    exact = device.type == "cpu" and _mallopt_mmap_threshold(MMAP_MIN_BYTES, trim=True)
    try:
        yield exact
    finally:
        if exact:
            _mallopt_mmap_threshold(32 * 2**20)


def memory_in_use(device: torch.device) -> int | None:
    """Bytes held by the CUDA allocator, or this process's resident set size on CPU (Linux /proc;
    None elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


formula_bytes = cache_nbytes  # the bench's name for the cache formula (ratplus.model.cache.cache_nbytes)


def check_decode_parity(patterns: list[str], device: torch.device, n: int | None = None, m: int = 40) -> None:
    """Prefill of n tokens + m decode steps == one full forward (float32, tiny model, the patterns as
    given); raise if not. By default n is long enough for every top-k pattern to choose among more
    blocks than it keeps."""
    torch.manual_seed(0)
    if n is None:
        n = 200
        for spec in patterns:
            for layer in ModelConfig.from_preset("tiny").resolve_pattern(spec):
                for p, _ in layer.groups:
                    if p.is_topk:
                        n = max(n, p.initial_size + p.local_size + (p.top_k + 2) * p.block_size)
    config = ModelConfig.from_preset("tiny", max_seq_len=n + m)
    model = RATPlusLM(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, n + m), device=device)
    with torch.no_grad():
        for pattern in patterns:
            full = model(ids, pattern=pattern)
            cache = RATPlusCache(config, pattern, 1, n + m, device=device)
            steps = [model(ids[:, :n], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(n, n + m)]
            err = (torch.cat(steps, dim=1) - full).abs().max().item()
            if cache.supports_fixed_step:  # the step the whole-model line times
                cache = RATPlusCache(config, pattern, 1, n + m, device=device)
                model(ids[:, :n], cache=cache)
                held = torch.tensor(cache.lengths, device=device)
                fixed = [model.decode_step(ids[:, i : i + 1], cache, held + (i - n)) for i in range(n, n + m)]
                err = max(err, (torch.stack(fixed, dim=1) - full[:, n:]).abs().max().item())
            if err > 1e-4:
                raise RuntimeError(f"decode parity failed for {pattern}: max |decode - full forward| = {err:.3g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(config, pattern, batch, context, steps, device, dtype) -> tuple[RATPlusCache, int | None]:
    """A cache holding ``context`` synthetic tokens with room for the timed steps, and the memory
    its construction added."""
    gc.collect()
    with _fresh_pages(device) as exact:
        mem0 = memory_in_use(device)
        cache = RATPlusCache(config, pattern, batch, context + steps + 2, device=device, dtype=dtype)
        fill_synthetic_(cache, context, torch.Generator().manual_seed(0))
        mem1 = memory_in_use(device)
    if mem0 is None or mem1 is None or not (exact or device.type == "cuda"):
        return cache, None
    return cache, mem1 - mem0


def _interleaved(steps: dict[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step function, timed round-robin (one warm-up round) so that every
    pattern sees the same background load on a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            _sync(device)
            if i:
                times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _layer_point(config, names, batch, context, steps, device, dtype) -> dict[str, dict[str, Any]]:
    """One attention layer at one context: every pattern's decode step (write k/v + attend)."""
    caches, out = {}, {}
    for name in names:
        caches[name], growth = _build(config, name, batch, context, steps, device, dtype)
        out[name] = {"nbytes": caches[name].nbytes(), "mem_growth": growth}
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    q, k, v = (torch.randn(batch, config.num_heads, 1, config.head_dim, device=device, dtype=dtype) for _ in range(3))

    def step(cache: RATPlusCache):
        def run():
            with cache.append(token):
                cache.layers[0].attend(q, k, v)

        return run

    with torch.no_grad():
        seconds = _interleaved({name: step(c) for name, c in caches.items()}, steps, device)
    for name in names:
        out[name]["s"] = seconds[name]
    return out


PEER_CACHES = ("dynamic", "static")


def llama_peer(config: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype):
    """The same-size ``LlamaForCausalLM`` (module docstring), random weights (seed 0), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    peer_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=256 * -(-8 * config.d_model // (3 * 256)),  # SwiGLU 8C/3, up to a multiple of 256
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=max_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(peer_config).to(device=device, dtype=dtype).eval()


def _peer_cache(peer, kind: str, batch: int, context: int, steps: int, device, dtype):
    """A transformers cache ("dynamic" or "static") holding ``context`` random keys/values per layer."""
    from transformers import DynamicCache, StaticCache

    c = peer.config
    K = c.hidden_size // c.num_attention_heads
    cache = StaticCache(config=c, max_cache_len=context + steps + 2) if kind == "static" else DynamicCache(config=c)
    gen = torch.Generator().manual_seed(0)
    tile = torch.randn(batch, c.num_key_value_heads, min(context, 1021), K, generator=gen).to(
        device=device, dtype=dtype
    )
    kv = tile.repeat(1, 1, -(-context // tile.shape[2]), 1)[:, :, :context]
    for layer in range(c.num_hidden_layers):
        cache.update(kv.clone(), kv.clone(), layer)
    return cache


def _peer_cache_kwarg(peer) -> str:
    """``cache`` from transformers 5.24 on, ``past_key_values`` before (the older name then warns)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(peer).forward).parameters else "past_key_values"


def _ratplus_step(model: RATPlusLM, cache: RATPlusCache, token: torch.Tensor):
    """The decode step ``ratplus.generate`` runs: the fixed-shape one, or the reference for top-k."""
    if not cache.supports_fixed_step:
        return lambda: model(token, cache=cache)
    held = torch.tensor(cache.lengths, device=token.device)

    def run():
        nonlocal held
        model.decode_step(token, cache, held)
        held = held + 1

    return run


def _bandwidth_probe(device: torch.device, dtype: torch.dtype, nbytes: int = 2**28) -> tuple[Any, int]:
    """A matrix-vector product over an ``nbytes`` matrix (768 wide), the access pattern of a decode
    step's weights, and the bytes it reads: timed with the steps, it gives the read bandwidth."""
    item = torch.empty(0, dtype=dtype).element_size()
    w = torch.randn(nbytes // (768 * item), 768, device=device, dtype=dtype)
    x = torch.randn(768, device=device, dtype=dtype)
    return (lambda: torch.mv(w, x)), w.numel() * item


def _model_point(model, patterns, batch, context, steps, device, dtype, peer=None) -> tuple[dict, float]:
    """Whole model at one context and batch: tokens/s and cache bytes per pattern (and per peer cache
    kind, named ``llama-dynamic`` / ``llama-static``), and the read bandwidth (bytes/s) measured in
    the same interleaved rounds."""
    caches = {p: _build(model.config, p, batch, context, steps, device, dtype)[0] for p in patterns}
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    fns = {p: _ratplus_step(model, c, token) for p, c in caches.items()}
    nbytes = {p: c.nbytes() for p, c in caches.items()}
    if peer is not None:
        for kind in PEER_CACHES:
            cache = _peer_cache(peer, kind, batch, context, steps, device, dtype)
            fns[f"llama-{kind}"] = lambda cache=cache: peer(token, use_cache=True, **{_peer_cache_kwarg(peer): cache})
            nbytes[f"llama-{kind}"] = sum(
                t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
            )
    probe, probe_bytes = _bandwidth_probe(device, dtype)
    with torch.no_grad():
        seconds = _interleaved({**fns, "_probe": probe}, steps, device)
    return {p: (batch / seconds[p], nbytes[p]) for p in fns}, probe_bytes / seconds["_probe"]


def _plot(path: str, contexts: list[int], names: list[str], results: dict, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, faster to import

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for name in names:
        ax1.plot(contexts, [results[name][T]["s"] * 1e3 for T in contexts], marker="o", label=name)
        ax2.plot(contexts, [results[name][T]["nbytes"] / 2**20 for T in contexts], marker="o", label=name)
    for ax, ylabel in ((ax1, "decode step, ms / token"), (ax2, "KV cache, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.13, top=0.9, wspace=0.3)
    save_figure(fig, path, 110, layout=False)


def run(
    contexts: list[int] | None = None,
    patterns: list[str] | None = None,
    heads: int = 12,
    head_dim: int = 64,
    batch: int = 1,
    steps: int = 10,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    model_preset: str | None = "125m",
    model_context: int = 16384,
    model_patterns: list[str] | None = None,
    model_batches: list[int] | None = None,
    model_steps: int = 8,
    peer: bool = True,
    plot_path: str | None = "bench_decode.png",
    json_path: str | None = None,
    layer: bool = True,
    ckpt: str | None = None,
    peers: list[str] | None = None,
    peer_source: str | None = None,
    gguf: str | None = None,
    prompt_lens: list[int] | None = None,
    decode_tokens: int = 16,
    repeats: int = 3,
) -> dict[str, Any]:
    """Sections 1 (``layer``) and 2 (``model_preset``, or with ``ckpt`` the real model of
    ``ratplus.bench.engines``: prefill + decode at ``prompt_lens`` next to ``peers``)."""
    device = device or torch.device("cpu")
    contexts = list(contexts or DEFAULT_CONTEXTS)
    names = ["dense", *[p for p in (patterns or DEFAULT_PATTERNS) if p != "dense"]]
    model_patterns = list(model_patterns or ["dense", "D16"])
    model_batches = list(model_batches or [1, 4])
    check_decode_parity(sorted((set(names) if layer else set()) | set(model_patterns)), device)
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in names}
    env = environment(device, dtype)
    if layer:
        _layer_section(names, contexts, heads, head_dim, batch, steps, device, dtype, results, env)
    else:
        contexts, plot_path = [], None

    model_record: dict[str, Any] | None = None
    real_record: dict[str, Any] | None = None
    if ckpt is not None:
        from ratplus.bench.engines import real_model

        real_record = real_model(
            ckpt,
            model_patterns,
            list(prompt_lens or [2048, 8192]),
            decode_tokens,
            repeats,
            list(peers if peers is not None else ["transformers"]),
            peer_source,
            gguf,
            device,
            dtype,
        )
    elif model_preset:
        model_record = _model_section(
            model_preset, model_context, model_patterns, model_batches, model_steps, peer, device, dtype
        )

    if plot_path:
        _plot(
            plot_path,
            contexts,
            names,
            results,
            f"RAT+ decode, one layer, B={batch} H={heads} K={head_dim} {env['dtype']} ({env['device']})",
        )
        print(f"\nplot: {plot_path}")
    record: dict[str, Any] = {
        "bench": "decode",
        **env,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "steps": steps,
        "layer": {
            name: {
                str(T): {k: v for k, v in r.items()} | {"speedup": results["dense"][T]["s"] / r["s"]}
                for T, r in per_t.items()
            }
            for name, per_t in results.items()
            if per_t
        },
        "model": model_record,
        "real_model": real_record,
        "plot": plot_path,
    }
    emit_json(record, json_path)
    return record


def _layer_section(names, contexts, heads, head_dim, batch, steps, device, dtype, results, env) -> None:
    """Section 1: one attention layer's decode step per context and pattern (fills ``results``)."""
    config = ModelConfig(
        vocab_size=8, d_model=heads * head_dim, num_layers=1, num_heads=heads, max_seq_len=max(contexts) + steps + 2
    )
    rows = []
    for T in contexts:
        point = _layer_point(config, names, batch, T, steps, device, dtype)
        for name in names:
            r = point[name]
            r["formula_bytes"] = formula_bytes(config, name, batch, T + steps + 2, dtype)
            results[name][T] = r
            dense = point["dense"]["s"]
            growth = r["mem_growth"]
            rows.append(
                [
                    T,
                    name,
                    r["s"] * 1e3,
                    dense / r["s"],
                    r["nbytes"] / 2**20,
                    "yes" if r["nbytes"] == r["formula_bytes"] else "NO",
                    "-"
                    if growth is None or (device.type == "cpu" and r["nbytes"] < 4 * MMAP_MIN_BYTES)
                    else f"{growth / 2**20:.1f}",
                ]
            )
    print(
        f"decode step of one attention layer (write k/v + attend), B={batch} H={heads} K={head_dim} "
        f"{env['dtype']}, {env['device']}; median of {steps} steps, patterns interleaved"
    )
    print_table(["context", "pattern", "ms/token", "speedup", "KV MiB", "= formula", "mem growth MiB"], rows)
    print("(speedup: dense ms / pattern ms; mem growth: memory added by building + filling the cache: CUDA")
    print(" allocator, or CPU resident set with fresh pages for buffers >= 1 MiB (caches >= 4 MiB); ~ KV MiB)")


def _model_section(model_preset, model_context, model_patterns, model_batches, model_steps, peer, device, dtype):
    """Section 2: a preset with random weights decoding from a synthetic cache; its record."""
    torch.manual_seed(0)
    mconfig = ModelConfig.from_preset(model_preset, max_seq_len=model_context + model_steps + 2)
    model = RATPlusLM(mconfig).to(device=device, dtype=dtype).eval()
    peer_model = None
    if peer:
        try:
            peer_model = llama_peer(mconfig, model_context + model_steps + 2, device, dtype)
        except ImportError:
            print("(no peer rows: transformers is not installed)")
    params = {p: model.num_params() for p in model_patterns}
    if peer_model is not None:
        params |= {f"llama-{k}": sum(t.numel() for t in peer_model.parameters()) for k in PEER_CACHES}
    item = torch.empty(0, dtype=dtype).element_size()
    weight_bytes = {name: n * item for name, n in params.items()}
    rows_names = list(params)
    tps: dict[str, dict[int, float]] = {p: {} for p in rows_names}
    kv: dict[str, dict[int, int]] = {p: {} for p in rows_names}
    bandwidth: dict[int, float] = {}
    for b in model_batches:
        point, bandwidth[b] = _model_point(
            model, model_patterns, b, model_context, model_steps, device, dtype, peer_model
        )
        for p, (rate, nbytes) in point.items():
            tps[p][b], kv[p][b] = rate, nbytes
    del model, peer_model
    # tokens/s if a step only read the weights once and the whole cache once, at the measured bandwidth
    limit = {p: {b: b * bandwidth[b] / (weight_bytes[p] + kv[p][b]) for b in model_batches} for p in rows_names}
    print(
        f"\nwhole-model decode, {model_preset} preset, context {model_context}, median of {model_steps} "
        "interleaved steps (cache filled with random keys/values/states, not a real prefill: per-token cost only)"
    )
    base = model_patterns[0]
    mrows = [
        [
            p,
            f"{params[p] / 1e6:.4g}M",
            b,
            tps[p][b],
            tps[p][b] / tps[base][b],
            tps[p][b] * params[p] / (tps[base][b] * params[base]),
            kv[p][b] / 2**20,
            tps[p][b] / limit[p][b],
        ]
        for b in model_batches
        for p in rows_names
    ]
    print_table(["model", "params", "batch", "tokens/s", f"vs {base}", "x params", "KV MiB", "of bw limit"], mrows)
    print(
        f"(x params: tokens/s x params relative to {base}; bw limit: weights + KV bytes per step at the "
        "read bandwidth measured in the same rounds: "
        + ", ".join(f"batch {b} {bw / 1e9:.2f} GB/s" for b, bw in bandwidth.items())
        + ")"
    )
    for b in model_batches:
        line = ", ".join(f"{p} {tps[p][b]:.1f} tok/s" for p in rows_names)
        print(f"{model_preset} @ {model_context} tokens, batch {b}: {line}")
    model_record = {
        "preset": model_preset,
        "context": model_context,
        "batches": model_batches,
        "synthetic_cache": True,
        "params": params,
        "read_bandwidth_bytes_per_s": {str(b): v for b, v in bandwidth.items()},
        "tokens_per_s": {p: {str(b): v for b, v in tps[p].items()} for p in rows_names},
        "kv_bytes": {p: {str(b): v for b, v in kv[p].items()} for p in rows_names},
        "bandwidth_limit_tokens_per_s": {p: {str(b): v for b, v in limit[p].items()} for p in rows_names},
    }
    return model_record


__all__ = ["check_decode_parity", "formula_bytes", "llama_peer", "memory_in_use", "run"]
