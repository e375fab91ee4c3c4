"""``ratplus bench serve``: the server under concurrent streaming clients, dense vs sparse side by side.

One ``ratplus serve`` process (started here, on a free localhost port) serves one model with every
pattern asked; clients are the official ``openai`` async client, streaming, greedy, one request
each, prompts of random token ids (distinct per client). Per pattern and client count N:

* output tokens/s, two ways: ``decode tok/s`` counts the tokens streamed while all N requests were
  decoding at once (from the last first token to the first last token: the batched decode rate
  with no prefill in it), ``e2e tok/s`` is every output token over the wall time (prefills included);
* time to first token and inter-token latency (p50 / p99, from the chunk arrival times);
* the server's peak resident memory during the run (``VmHWM``, reset before each run).

Admission: at ``--admission-len`` tokens (prompt + max_tokens) under one ``--kv-memory``, the
number of requests the server admits at once per pattern: more requests than fit are sent, the
server's ``/metrics`` is read until all arrived and the admitted count settled (the engine thread
admits between its steps; ``requests_running`` at its most is the count admitted), then every
client hangs up. Admission needs no prefill to finish, so this is cheap even for 8K
prompts. The formula's count (budget // kv_bytes) is printed beside the measured one.

Peer (``--peer``): the same-size transformers ``LlamaForCausalLM`` (``ratplus.bench.decode.llama_peer``,
random weights, saved with ``save_pretrained`` and a word-level tokenizer) served by ``transformers
serve --continuous-batching --device cpu`` (its paged-attention continuous batching) in a second
child process, driven by the same clients, client counts, prompts and ``max_tokens`` right after the
ratplus rows. ``transformers serve`` takes text prompts only, so the peer's tokenizer is word-level
(token ``i`` is the word ``t{i}``): a peer prompt is the ratplus prompt's ids as words, served as
exactly those ids (their count recorded from the usage chunk). Its stream carries text, one chunk per token, and
``output_tokens`` is the server's own usage count. Its EOS is off, so every request runs
``max_tokens``; one short request warms it up first. Its paged cache holds ``max(clients)`` requests
of prompt + ``max_tokens`` (by default it would take most of the machine's free RAM); its peak RSS
sums the server and its engine process.

Prefix (``--phases prefix``): two more servers, without and with the prefix cache
(``--prefix-cache-memory 0`` and the default), get prompts of one shared ``prefix_len``-token prefix
plus ``suffix_len`` tokens of their own, one at a time, alternating between the two; TTFT of each
(the first request apart: cold on both) and the snapshot hits from ``/metrics``.

Soak: ``/metrics`` is read every 0.1 s all along; the scrapes whose allocated KV bytes exceed the
budget are counted (the memory bound says 0).

Without ``--ckpt`` the model is a preset with random weights and a small BPE tokenizer (the
prompts are token ids; the text is not looked at). Output: tables, then one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ratplus.bench.serve_servers import PeerServer, Server, make_folder, make_peer_folder
from ratplus.runtime import emit_json, environment, print_table

PEER_ROW = "llama (transformers serve)"


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()


async def _stream(client, model: str, prompt: list[int] | str, max_tokens: int) -> dict[str, Any]:
    """One streamed greedy request; a text prompt is the peer's (text chunks, usage from its last chunk)."""
    t0 = time.perf_counter()
    times: list[float] = []
    text = isinstance(prompt, str)
    extra = {"stream_options": {"include_usage": True}} if text else {"extra_body": {"return_token_ids": True}}
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **extra
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        if text:
            if chunk.choices[0].text:
                times.append(time.perf_counter())
            continue
        ids = (chunk.choices[0].model_extra or {}).get("token_ids")
        if ids:
            times += [time.perf_counter()] * len(ids)
    out: dict[str, Any] = {"start": t0, "times": times}
    if usage is not None:
        out |= {"tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens}
    return out


def throughput(
    server: Server, model: str, n: int, prompt_len: int, new_tokens: int, vocab: int, prompts: list | None = None
) -> dict[str, Any]:
    """N concurrent streaming clients, one request each (``prompts``: the peer's text prompts)."""
    import openai

    prompts = prompts or _prompts(n, prompt_len, vocab, seed=n)

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=3600)
        try:
            return await asyncio.gather(*(_stream(client, model, p, new_tokens) for p in prompts))
        finally:
            await client.close()

    server.reset_peak()
    t0 = time.perf_counter()
    runs = asyncio.run(main())
    wall = time.perf_counter() - t0
    firsts = [r["times"][0] for r in runs if r["times"]]
    lasts = [r["times"][-1] for r in runs if r["times"]]
    lo, hi = max(firsts), min(lasts)
    in_window = sum(lo < t <= hi for r in runs for t in r["times"])
    ttft = [r["times"][0] - r["start"] for r in runs if r["times"]]
    itl = [b - a for r in runs for a, b in zip(r["times"], r["times"][1:])]
    total = sum(r.get("tokens", len(r["times"])) for r in runs)
    served = [r["prompt_tokens"] for r in runs if "prompt_tokens" in r]
    return {
        "clients": n,
        **({"prompt_tokens_served": served} if served else {}),
        "output_tokens": total,
        "decode_tok_s": in_window / (hi - lo) if hi > lo and in_window else float("nan"),
        "e2e_tok_s": total / wall,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "itl_p50_ms": 1000 * _percentile(itl, 50),
        "itl_p99_ms": 1000 * _percentile(itl, 99),
        "peak_rss_bytes": server.peak_rss(),
        "wall_s": wall,
    }


def admission(
    server: Server, model: str, count: int, prompt_len: int, new_tokens: int, vocab: int, settle: float = 2.0
) -> dict:
    """Send ``count`` long requests at once; read how many the server admitted (the most running at
    once, after all arrived and the count settled); hang up on all."""
    import openai

    prompts = _prompts(count, prompt_len, vocab, seed=7)

    def finished(m: dict[str, float]) -> float:
        return sum(v for k, v in m.items() if k.startswith("ratplus_requests_finished_total"))

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=3600)
        before = finished(await asyncio.to_thread(server.metrics))
        tasks = [asyncio.ensure_future(_stream(client, model, p, new_tokens)) for p in prompts]
        deadline = time.monotonic() + 300
        best, last, steady = None, None, None
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            m = await asyncio.to_thread(server.metrics)
            if best is None or m["ratplus_requests_running"] > best["ratplus_requests_running"]:
                best = m
            arrived = m["ratplus_requests_running"] + m["ratplus_requests_queued"] + finished(m) - before
            # the engine thread admits between its steps (a prefill chunk may take a while): once every
            # request arrived, wait until the admitted count has stayed the same for ``settle`` seconds
            if m["ratplus_requests_running"] != last:
                last, steady = m["ratplus_requests_running"], time.monotonic()
            if arrived >= count and time.monotonic() - steady >= settle:
                break
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        return best

    m = asyncio.run(main())
    deadline = time.monotonic() + 600
    while server.metrics()["ratplus_requests_running"] > 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the cancelled rows go at the next step (after a prefill chunk at most)
    return {
        "admitted": int(m["ratplus_requests_running"]),
        "queued": int(m["ratplus_requests_queued"]),
        "kv_bytes_in_use": int(m["ratplus_kv_bytes_in_use"]),
    }


def soak(
    server: Server, model_ids: list[str], seconds: float, clients: int, vocab: int, max_prompt: int, seed: int = 0
) -> dict[str, Any]:
    """``clients`` loops for ``seconds``: each round is a streamed request read to its end, a client
    that hangs up after a few chunks, or a bad request (malformed JSON, an unknown model, a prompt
    beyond the context) that must get its 4xx. Every request has a deadline: one that passes it is
    counted as hung. Then the server must be idle again: nothing running or queued, no KV bytes."""
    import random
    import urllib.error
    import urllib.request

    import openai

    counts = {"completed": 0, "disconnected": 0, "bad_refused": 0, "server_errors": 0, "hung": 0, "other_errors": 0}
    rng = random.Random(seed)

    def malformed() -> int:
        req = urllib.request.Request(
            f"{server.url}/v1/completions", data=b'{"model": ', headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as e:
            return e.code
        return 200

    async def one(client, r: random.Random) -> None:
        kind = r.random()
        model = r.choice(model_ids)
        prompt = [r.randrange(1, vocab) for _ in range(r.randint(4, max_prompt))]
        try:
            if kind < 0.1:  # a bad request: must be refused with 4xx, never 5xx or a hang
                bad = r.randrange(3)
                if bad == 0:
                    status = await asyncio.to_thread(malformed)
                    ok = status == 400
                else:
                    try:
                        if bad == 1:
                            await client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
                        else:
                            await client.completions.create(model=model, prompt=prompt, max_tokens=10**6)
                        ok = False
                    except (openai.NotFoundError, openai.BadRequestError):
                        ok = True
                counts["bad_refused" if ok else "other_errors"] += 1
                return
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=r.randint(4, 48), temperature=r.choice([0, 0.8]), stream=True
            )
            hang_up = r.randint(1, 8) if kind < 0.35 else None
            n = 0
            async for _ in stream:
                n += 1
                if hang_up is not None and n >= hang_up:
                    await stream.close()
                    counts["disconnected"] += 1
                    return
            counts["completed"] += 1
        except openai.APITimeoutError:
            counts["hung"] += 1
        except openai.InternalServerError:
            counts["server_errors"] += 1
        except openai.RateLimitError:
            counts["other_errors"] += 1

    async def loop(i: int, deadline: float) -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        r = random.Random(rng.random() + i)
        try:
            while time.monotonic() < deadline:
                await one(client, r)
        finally:
            await client.close()

    idle_rss = server.rss()
    scrapes: list[dict[str, float]] = []
    stop = threading.Event()

    def scrape() -> None:  # /metrics all along: the allocated KV bytes must stay within the budget
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                scrapes.append(server.metrics())

    scraper = threading.Thread(target=scrape, daemon=True)
    t0 = time.monotonic()
    scraper.start()
    try:
        asyncio.run(asyncio.wait_for(_gather_loops(loop, clients, t0 + seconds), seconds + 900))
    finally:
        stop.set()
        scraper.join()
    deadline = time.monotonic() + 120
    while True:  # rows of clients that hung up go at the next step
        m = server.metrics()
        if (m["ratplus_requests_running"] == 0 and m["ratplus_requests_queued"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # the engine hands freed heap pages back to the OS when it goes idle
    return {
        **counts,
        "seconds": time.monotonic() - t0,
        "clients": clients,
        "running_after": int(m["ratplus_requests_running"]),
        "queued_after": int(m["ratplus_requests_queued"]),
        "kv_bytes_in_use_after": int(m["ratplus_kv_bytes_in_use"]),
        "kv_bytes_allocated_after": int(m["ratplus_kv_bytes_allocated"]),
        "scrapes": len(scrapes),
        "kv_bytes_allocated_max": max((int(x["ratplus_kv_bytes_allocated"]) for x in scrapes), default=0),
        "scrapes_over_budget": sum(x["ratplus_kv_bytes_allocated"] > x["ratplus_kv_bytes_budget"] for x in scrapes),
        "kv_bytes_allocated_peak": int(m.get("ratplus_kv_bytes_allocated_peak", 0)),
        "rss_before_bytes": idle_rss,
        "rss_after_bytes": server.rss(),
        "server_alive": server.proc.poll() is None,
    }


def prefix_ttft(
    servers: dict[str, Server],
    name: str,
    pattern: str,
    prefix_len: int,
    suffix_len: int,
    requests: int,
    vocab: int,
) -> list[dict[str, Any]]:
    """TTFT of prompts sharing a ``prefix_len``-token prefix (then ``suffix_len`` tokens of their
    own), one request at a time, alternating between the servers (``{"off": ..., "on": ...}``, the
    same model without and with the prefix cache) so both see the same machine. The first request
    of each server is reported apart (cold for both; it stores the snapshots of the ``on`` server)."""
    import openai

    shared = _prompts(1, prefix_len, vocab, seed=11)[0]
    suffixes = _prompts(requests + 1, suffix_len, vocab, seed=12)

    async def one(server: Server, prompt: list[int]) -> float:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=3600)
        try:
            r = await _stream(client, f"{name}:{pattern}", prompt, 2)
        finally:
            await client.close()
        return r["times"][0] - r["start"]

    hits0 = {k: _hits(s) for k, s in servers.items()}
    ttft: dict[str, list[float]] = {k: [] for k in servers}
    for suffix in suffixes:
        for key, server in servers.items():
            ttft[key].append(asyncio.run(one(server, shared + suffix)))
    return [
        {
            "pattern": pattern,
            "prefix_cache": key,
            "prefix_len": prefix_len,
            "suffix_len": suffix_len,
            "requests": requests,
            "ttft_first_s": ttft[key][0],
            "ttft_p50_s": _percentile(ttft[key][1:], 50),
            "ttft_s": ttft[key][1:],
            "prefix_hits": _hits(servers[key]) - hits0[key],
        }
        for key in servers
    ]


def _hits(server: Server) -> int:
    return int(server.metrics().get("ratplus_prefix_cache_hits_total", 0))


async def _gather_loops(loop, clients: int, deadline: float) -> None:
    await asyncio.gather(*(loop(i, deadline) for i in range(clients)))


def run(
    device: torch.device,
    dtype: torch.dtype,
    json_path: str | None = None,
    ckpt: str | None = None,
    preset: str = "125m",
    patterns: list[str] | None = None,
    clients: list[int] | None = None,
    prompt_len: int = 4096,
    new_tokens: int = 64,
    kv_memory: str = "2GiB",
    admission_len: int = 8192,
    server_threads: int = 1,
    compile: bool = False,
    phases: list[str] | None = None,
    soak_seconds: float = 600.0,
    soak_clients: int = 64,
    soak_prompt: int = 256,
    peer: bool = False,
    prefix_len: int = 2048,
    suffix_len: int = 64,
    prefix_requests: int = 4,
    prefix_memory: str = "512MiB",
    prefill_chunk: int = 512,
) -> dict[str, Any]:
    """The benchmark (module docstring). ``device`` must be the CPU (the child server runs there)."""
    import logging

    from ratplus.io.folder import load_config

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the openai client's one line per request
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if device.type != "cpu":
        raise ValueError("bench serve drives a CPU server here; run `ratplus serve --device cuda` by hand on a GPU")
    patterns = patterns or ["dense", "D16-W256-P4"]
    phases = phases or ["throughput", "admission"]
    unknown = set(phases) - {"throughput", "admission", "soak", "prefix"}
    if unknown:
        raise ValueError(f"--phases: unknown {sorted(unknown)}; choose from throughput, admission, soak, prefix")
    main_phases = bool(set(phases) - {"prefix"})
    clients = clients or [1, 4, 16, 64]
    with tempfile.TemporaryDirectory(prefix="ratplus-bench-serve-") as tmp:
        folder = (
            Path(ckpt)
            if ckpt
            else make_folder(
                preset, max(prompt_len + new_tokens, admission_len, prefix_len + suffix_len + 2), Path(tmp) / preset
            )
        )
        config = load_config(folder)
        patterns = [config.canonical_pattern(p) for p in patterns]
        vocab = config.vocab_size
        lengths = [("prompt", prompt_len + new_tokens), ("admission", admission_len)]
        for what, length in lengths + ([("prefix", prefix_len + suffix_len + 2)] if "prefix" in phases else []):
            if length > config.max_seq_len:
                raise ValueError(f"--{what}-len: {length} tokens exceed the model's max_seq_len={config.max_seq_len}")
        name = folder.resolve().name
        rows, admit, soaked, prefixed, servers = [], [], None, [], {}
        if "prefix" in phases:  # before the other phases' server: the two prefix servers alone on the machine
            for key, memory in (("off", "0"), ("on", prefix_memory)):
                flags = ["--prefill-chunk", str(prefill_chunk), "--prefix-cache-memory", memory]
                servers[key] = Server(folder, patterns, kv_memory, 4, server_threads, compile, flags)
            try:
                name = servers["on"].model_name()
                for p in patterns:
                    prefixed += prefix_ttft(servers, name, p, prefix_len, suffix_len, prefix_requests, vocab)
                    print(f"  {p}: prefix TTFT measured", file=sys.stderr, flush=True)
            finally:
                for s in servers.values():
                    s.stop()
        server = None
        if main_phases:
            server = Server(folder, patterns, kv_memory, max([*clients, 256]), server_threads, compile)
        idle_rss = end_rss = budget = 0
        try:
            if server is not None:
                idle_rss, name = server.rss(), server.model_name()
                budget = int(server.metrics()["ratplus_kv_bytes_budget"])
            if "throughput" in phases:
                for p in patterns:
                    for n in clients:
                        r = throughput(server, f"{name}:{p}", n, prompt_len, new_tokens, vocab)
                        rows.append({"pattern": p, **r})
                        print(f"  {p} x{n}: decode {r['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
            if "admission" in phases:
                adm_new = 64
                # the server's own figures (bench sits beside serve and does not import it)
                per_req = {
                    x["pattern"]: x["kv_bytes"] for x in server.get(f"/v1/patterns?prompt_tokens={admission_len}")
                }
                for p in patterns:
                    fits = budget // per_req[p]
                    a = admission(server, f"{name}:{p}", min(fits + 4, 256), admission_len - adm_new, adm_new, vocab)
                    admit.append({"pattern": p, "kv_bytes_per_request": per_req[p], "formula_count": fits, **a})
            if "soak" in phases:
                ids = [f"{name}:{p}" for p in patterns]
                soaked = soak(server, ids, soak_seconds, soak_clients, vocab, min(soak_prompt, config.max_seq_len // 2))
            end_rss = server.rss() if server is not None else 0
        finally:
            if server is not None:
                server.stop()
        peer_startup = None
        if peer and "throughput" in phases:  # after the ratplus server is gone: the two never share the cores
            peer_folder = make_peer_folder(config, prompt_len + new_tokens + 8, Path(tmp) / "llama-peer")
            peer_server = PeerServer(peer_folder, prompt_len + new_tokens + 8, server_threads, max(clients))
            peer_startup = peer_server.startup_seconds
            try:
                for n in clients:
                    # the very ids of the ratplus rows, as the words of the peer's tokenizer
                    texts = [" ".join(f"t{i}" for i in ids) for ids in _prompts(n, prompt_len, vocab, seed=n)]
                    r = throughput(peer_server, peer_server.model_id, n, prompt_len, new_tokens, vocab, texts)
                    rows.append({"pattern": PEER_ROW, **r})
                    print(f"  {PEER_ROW} x{n}: decode {r['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
            finally:
                peer_server.stop()

    print(
        f"model {name} ({config.num_params() / 1e6:.0f}M params), prompt {prompt_len}, {new_tokens} new tokens, "
        f"server threads {server_threads}, compile {'on' if compile else 'off'}, "
        f"start-up {(server or servers['on']).startup_seconds:.1f} s"
    )
    if rows:
        print_table(
            ["pattern", "clients", "decode tok/s", "e2e tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms",
             "ITL p99 ms", "peak RSS MiB"],
            [[r["pattern"], r["clients"], r["decode_tok_s"], r["e2e_tok_s"], r["ttft_p50_s"], r["ttft_p99_s"],
              r["itl_p50_ms"], r["itl_p99_ms"], r["peak_rss_bytes"] / 2**20] for r in rows],
        )  # fmt: skip
    if peer_startup is not None:
        print(f"peer: {PEER_ROW} = the same-size LlamaForCausalLM under `transformers serve --continuous-batching "
              f"--device cpu`, start-up {peer_startup:.1f} s")  # fmt: skip
        for p in patterns:
            for n in clients:
                mine = next(r for r in rows if r["pattern"] == p and r["clients"] == n)
                other = next(r for r in rows if r["pattern"] == PEER_ROW and r["clients"] == n)
                print(f"{p} / peer at {n} clients: {mine['decode_tok_s'] / other['decode_tok_s']:.2f}x decode tok/s, "
                      f"{mine['e2e_tok_s'] / other['e2e_tok_s']:.2f}x e2e tok/s")  # fmt: skip
    for p in [*patterns, *([PEER_ROW] if peer_startup is not None else [])]:
        one = next((r for r in rows if r["pattern"] == p and r["clients"] == min(clients)), None)
        for r in rows:
            if r["pattern"] == p and one and r is not one:
                print(f"{p}: {r['clients']} clients / {one['clients']}: "
                      f"{r['decode_tok_s'] / one['decode_tok_s']:.2f}x decode tokens/s")  # fmt: skip
    if admit:
        print(f"\nadmission at {admission_len} tokens per request under --kv-memory {kv_memory} ({budget:,} B):")
        print_table(
            ["pattern", "KV bytes/request", "formula count", "admitted", "queued"],
            [[a["pattern"], a["kv_bytes_per_request"], a["formula_count"], a["admitted"], a["queued"]] for a in admit],
        )
    if len(admit) > 1 and admit[0]["admitted"]:
        for a in admit[1:]:
            print(
                f"{a['pattern']} admits {a['admitted'] / admit[0]['admitted']:.1f}x the requests "
                f"{admit[0]['pattern']} does"
            )
    if prefixed:
        print(
            f"\nprefix cache: prompts of a shared {prefix_len}-token prefix + {suffix_len} tokens of their own, "
            f"one at a time, alternating between a server without and one with the prefix cache "
            f"(--prefill-chunk {prefill_chunk}); the first request of each is cold for both"
        )
        print_table(
            ["pattern", "prefix cache", "TTFT first s", "TTFT p50 s", "requests", "hits"],
            [[x["pattern"], x["prefix_cache"], x["ttft_first_s"], x["ttft_p50_s"], x["requests"], x["prefix_hits"]]
             for x in prefixed],
        )  # fmt: skip
        for p in patterns:
            off, on = (next(x for x in prefixed if x["pattern"] == p and x["prefix_cache"] == k) for k in ("off", "on"))
            print(f"{p}: TTFT with the prefix cache {off['ttft_p50_s'] / on['ttft_p50_s']:.1f}x better (p50)")
    if soaked is not None:
        print(f"\nsoak: {soaked['seconds']:.0f} s, {soaked['clients']} clients over {', '.join(patterns)}")
        print_table(list(soaked), [list(soaked.values())])
    record = {
        "bench": "serve", **environment(device, dtype), "model": name, "params": config.num_params(),
        "prompt_len": prompt_len, "new_tokens": new_tokens, "server_threads": server_threads, "compile": compile,
        "startup_s": (server or servers["on"]).startup_seconds, "idle_rss_bytes": idle_rss, "end_rss_bytes": end_rss,
        "kv_memory": budget, "admission_len": admission_len, "throughput": rows, "admission": admit,
        "soak": soaked, "prefix": prefixed, "peer": None if peer_startup is None else {
            "row": PEER_ROW, "server": "transformers serve --continuous-batching --device cpu",
            "startup_s": peer_startup, "model": "LlamaForCausalLM (same size, random weights)"},
    }  # fmt: skip
    emit_json(record, json_path)
    return record
