"""``--kv-memory`` is a bound on what the engine allocates: mixed lengths and patterns under a tight
budget, the allocated bytes sampled all the time (and the engine's own peak, reshapes' transients
included) never pass it, and every request still gets its solo greedy tokens."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ratplus.model.cache import RATPlusCache, cache_nbytes
from ratplus.serve.admission import kv_bytes
from ratplus.serve.engine import Engine, Request
from ratplus.serve.pool import reshape, reshape_peak, row_view, tensor_sizes
from tests.serve.conftest import D16, DENSE
from tests.serve.test_serve import prompts, solo


@pytest.mark.parametrize("pattern", ["dense", "D16-W8-P2", "local-W7-P2", "D4:2+dense:2"])
@pytest.mark.parametrize("rows, length", [(1, 1), (3, 9), (5, 333)])
def test_tensor_sizes_sum_to_the_cache(model, pattern, rows, length):
    sizes = tensor_sizes(model.config, pattern, rows, length, torch.float32)
    assert sum(sizes) == cache_nbytes(model.config, pattern, rows, length, torch.float32)
    assert sum(sizes) == RATPlusCache(model.config, pattern, rows, length).nbytes()


def test_reshape_peak():
    assert reshape_peak([], [4, 4, 1]) == 9  # from nothing: the new tensors only
    assert reshape_peak([4, 4, 1], []) == 9
    assert reshape_peak([4, 4, 1], [8, 8, 2]) == 8 + 4 + 1 + 8  # the last big one: 3 new + 1 old + itself
    assert reshape_peak([8, 8], [4, 4]) == 8 + 8 + 4


def test_reshape_and_views_keep_decoding_exact(model):
    """Two rows prefilled through one-row views, the pool reshaped longer and wider, then shorter,
    decoding through a view of the running rows: each row's tokens are its solo greedy ones."""
    ps = [prompts(2, seed=9)[0][:40], prompts(2, seed=9)[1][:25]]
    new = 30
    with torch.inference_mode():
        cache = RATPlusCache(model.config, D16, 2, 80)
        nxt = []
        for i, ids in enumerate(ps):
            view = row_view(cache, i, i + 1)
            h = model.hidden(torch.tensor([ids]), cache=view)
            nxt.append(int(model.logits(h[:, -1:])[0, -1].argmax()))
        held = [len(p) for p in ps]
        got = [[t] for t in nxt]
        for step in range(new - 1):
            if step == 5:
                reshape(cache, 5, 400, keep=2)
            if step == 15:
                reshape(cache, 2, 80, keep=2)
            logits = model.decode_step(torch.tensor(nxt).view(2, 1), row_view(cache, 0, 2), torch.tensor(held))
            nxt = logits.argmax(-1).tolist()
            held = [h + 1 for h in held]
            for g, t in zip(got, nxt):
                g.append(t)
    for ids, g in zip(ps, got):
        want = solo(model, ids, new, D16)
        assert g[: len(want)] == want


def _run_all(engine: Engine, reqs: list[Request], budget: int) -> list[int]:
    """Submit every request, sample the allocated bytes until all finished; returns the samples."""
    done = threading.Event()
    left = [len(reqs)]
    lock = threading.Lock()

    def sink_for(r):
        def sink(event):
            if event[0] in ("end", "error"):
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        return sink

    for r in reqs:
        r.sink = sink_for(r)
    samples = []
    engine.start()
    try:
        for r in reqs:
            engine.submit(r)
        while not done.wait(0.001):
            samples.append(engine.allocated())
            assert time.monotonic() < deadline
    finally:
        engine.stop()
    return samples


deadline = float("inf")


def test_allocated_never_exceeds_the_budget_with_mixed_lengths_and_patterns(model):
    global deadline
    ps = prompts(14, seed=4)
    news = [3 + (11 * i) % 60 for i in range(14)]
    pats = [DENSE if i % 3 else D16 for i in range(14)]
    biggest = max(kv_bytes(model.config, p, len(ids) + n) for p, ids, n in zip(pats, ps, news))
    budget = int(2.5 * biggest)  # a handful of requests at once: queueing, reshapes, trimming
    engine = Engine(model, [DENSE, D16], budget, max_batch=8, max_queue=64, prefill_chunk=64)
    reqs = [Request(ids, n, p, sink=None) for ids, n, p in zip(ps, news, pats)]
    for r in reqs:
        r.kv_bytes = engine.request_bytes(r.pattern, r.length)
    deadline = time.monotonic() + 120
    samples = _run_all(engine, reqs, budget)
    assert samples and max(samples) <= budget
    assert 0 < engine.peak_allocated <= budget
    assert engine.allocated() == 0 and engine.budget.in_use == 0
    assert engine.peak_running >= 2  # the budget let several run at once
    for r, ids, n, p in zip(reqs, ps, news, pats):
        assert r.finish_reason in ("stop", "length")
        assert r.tokens == solo(model, ids, n, p)


def test_a_budget_no_request_fits_is_refused(model):
    least = {p: kv_bytes(model.config, p, 2) for p in (DENSE, D16)}
    big, small = sorted(least, key=least.get, reverse=True)
    with pytest.raises(ValueError, match=rf"--kv-memory .* smaller than the smallest request under {big}"):
        Engine(model, [small, big], least[big] - 1)
    Engine(model, [small, big], least[big])  # exactly enough: accepted


def test_metrics_show_reserved_and_allocated_bytes(model, tokenizer):
    from tests.serve.conftest import live_server

    with live_server(model, tokenizer, kv_memory=1 << 20) as live:
        c = live.client()
        c.completions.create(model=f"tiny:{DENSE}", prompt="Once upon a time", max_tokens=5, temperature=0)
        text = httpx_get(f"{live.url}/metrics")
    for name in ("kv_bytes_in_use", "kv_bytes_allocated", "kv_bytes_allocated_peak", "kv_bytes_budget"):
        assert f"\nratplus_{name} " in text
    peak = float(text.split("\nratplus_kv_bytes_allocated_peak ")[1].split()[0])
    assert 0 < peak <= 1 << 20


def httpx_get(url: str) -> str:
    from tests.serve.conftest import httpx

    return httpx.get(url, timeout=30).text


def test_cancelled_rows_anywhere_leave_the_others_exact(model):
    """Requests cancelled while waiting, while prefilling (chunked prompts) and while decoding: the
    rows that move to fill the holes keep their contents (every other request gets its solo greedy
    tokens) and all memory comes back."""
    ps = prompts(12, seed=6)
    news = [20 + (7 * i) % 30 for i in range(12)]
    pats = [D16 if i % 2 else DENSE for i in range(12)]
    engine = Engine(model, [DENSE, D16], 1 << 24, max_batch=6, prefill_chunk=32)
    reqs = [Request(ids, n, p, sink=None) for ids, n, p in zip(ps, news, pats)]
    doomed = {1: "decoding", 4: "submitted", 7: "decoding", 10: "submitted"}
    done = threading.Event()
    left = [len(reqs)]

    def sink_for(i, r):
        def sink(event):
            if event[0] == "token" and doomed.get(i) == "decoding" and len(r.tokens) == 2:
                engine.cancel(r)
            if event[0] in ("end", "error"):
                left[0] -= 1
                if not left[0]:
                    done.set()

        return sink

    engine.start()
    try:
        for i, r in enumerate(reqs):
            r.sink, r.kv_bytes = sink_for(i, r), engine.request_bytes(r.pattern, r.length)
            engine.submit(r)
            if doomed.get(i) == "submitted":
                engine.cancel(r)
        assert done.wait(120)
    finally:
        engine.stop()
    for i, (r, ids, n, p) in enumerate(zip(reqs, ps, news, pats)):
        if i in doomed:
            assert r.finish_reason == "cancelled"
        else:
            assert r.tokens == solo(model, ids, n, p)
    assert engine.allocated() == 0 and engine.budget.in_use == 0


def test_serve_refuses_a_budget_no_request_fits(ckpt, capsys):
    """``ratplus serve --kv-memory 100``: exit 2 with one line naming the flag (issue 31: it was
    accepted, and every request then waited forever)."""
    from ratplus.cli import main

    argv = ["serve", "--ckpt", str(ckpt), "--device", "cpu", "--port", "0", "--patterns", DENSE]
    assert main([*argv, "--kv-memory", "100"]) == 2
    err = capsys.readouterr().err
    assert "--kv-memory 100 B is smaller than the smallest request under dense" in err
