"""Shared prompt prefixes are prefilled once (ratplus/serve/prefix.py): a request that restores a
snapshot gets exactly the tokens of a cold prefill, the snapshots stay within their own budget
(least recently used evicted), and patterns never share snapshots."""

from __future__ import annotations

import threading

import pytest
import torch

from ratplus.serve.engine import Engine, Request
from ratplus.serve.prefix import PrefixCache
from tests.serve.conftest import D16, DENSE
from tests.serve.test_serve import solo

CHUNK = 16


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (n,), generator=g).tolist()


def run(engine: Engine, prompt: list[int], pattern: str, max_tokens: int = 20) -> Request:
    """One request through a started engine, to its end."""
    done = threading.Event()
    r = Request(prompt, max_tokens, pattern, sink=lambda e: e[0] in ("end", "error") and done.set())
    r.kv_bytes = engine.request_bytes(pattern, r.length)
    engine.submit(r)
    assert done.wait(60), "the request did not finish"
    assert r.finish_reason in ("stop", "length"), r.finish_reason
    return r


@pytest.fixture
def engines(model):
    """(with the prefix cache, without it), both started; stopped after the test."""
    warm = Engine(model, [DENSE, D16], 1 << 24, prefill_chunk=CHUNK, prefix_memory=1 << 22)
    cold = Engine(model, [DENSE, D16], 1 << 24, prefill_chunk=CHUNK)
    warm.start()
    cold.start()
    yield warm, cold
    warm.stop()
    cold.stop()


@pytest.mark.parametrize("pattern", [DENSE, D16])
def test_a_restored_prefix_gives_the_tokens_of_a_cold_prefill(engines, model, pattern):
    warm, cold = engines
    prefix = _ids(3 * CHUNK + 5, seed=1)  # 3 whole chunks shared, then 5 more shared tokens
    first = run(warm, prefix + _ids(7, seed=2), pattern)
    assert warm.prefix.stats()["entries"] == 3  # boundaries 16, 32, 48 (the 4th chunk ends mid-prompt)
    for seed in (3, 4):
        prompt = prefix + _ids(9, seed=seed)
        hit = run(warm, prompt, pattern)
        assert hit.tokens == run(cold, prompt, pattern).tokens
        assert hit.tokens == solo(model, prompt, 20, pattern)
    s = warm.prefix.stats()
    assert (s["lookups"], s["hits"], s["tokens_reused"]) == (3, 2, 2 * 3 * CHUNK)
    assert first.tokens == run(cold, prefix + _ids(7, seed=2), pattern).tokens


def test_the_longest_stored_prefix_shorter_than_the_prompt_is_used(engines, model):
    warm, cold = engines
    prompt = _ids(2 * CHUNK, seed=5)
    run(warm, prompt, DENSE)  # stores 16 and 32 (the whole prompt)
    again = run(warm, prompt, DENSE)  # the same prompt: 32 would leave nothing to prefill, so 16
    assert warm.prefix.stats()["tokens_reused"] == CHUNK
    assert again.tokens == run(cold, prompt, DENSE).tokens
    longer = run(warm, prompt + _ids(3, seed=6), DENSE)  # now the 32-token snapshot
    assert warm.prefix.stats()["tokens_reused"] == 3 * CHUNK
    assert longer.tokens == run(cold, prompt + _ids(3, seed=6), DENSE).tokens


def test_patterns_do_not_share_snapshots(engines):
    warm, _ = engines
    prompt = _ids(2 * CHUNK + 3, seed=7)
    run(warm, prompt, DENSE)
    run(warm, prompt, D16)
    assert warm.prefix.stats()["hits"] == 0
    run(warm, prompt, D16)
    assert warm.prefix.stats()["hits"] == 1


def test_snapshots_stay_within_their_budget_least_recently_used_out(model):
    one = Engine(model, [DENSE], 1 << 24, prefill_chunk=CHUNK, prefix_memory=1 << 22)
    one.start()
    try:
        run(one, _ids(CHUNK + 1, seed=8), DENSE)
        size = one.prefix.stats()["bytes"]  # one snapshot of 16 tokens
    finally:
        one.stop()
    engine = Engine(model, [DENSE], 1 << 24, prefill_chunk=CHUNK, prefix_memory=2 * size)
    engine.start()
    try:
        a, b, c = (_ids(CHUNK + 1, seed=s) for s in (9, 10, 11))
        run(engine, a, DENSE)
        run(engine, b, DENSE)
        run(engine, a, DENSE)  # a hit: a is now the most recently used
        run(engine, c, DENSE)  # evicts b
        s = engine.prefix.stats()
        assert s["bytes"] <= 2 * size and s["entries"] == 2 and s["evictions"] == 1 and s["hits"] == 1
        run(engine, a, DENSE)
        run(engine, b, DENSE)
        assert engine.prefix.stats()["hits"] == 2  # a still there, b was not
    finally:
        engine.stop()


def test_off_and_bad_budgets():
    assert PrefixCache(0, CHUNK).restore(DENSE, list(range(40)), None) == 0
    with pytest.raises(ValueError, match="--prefix-cache-memory"):
        PrefixCache(-1, CHUNK)


def test_echo_scoring_never_restores(engines):
    """Prompt logprobs need every prompt position's logits: such a request prefills cold."""
    warm, _ = engines
    prompt = _ids(2 * CHUNK + 3, seed=12)
    run(warm, prompt, DENSE)
    done = threading.Event()
    r = Request(prompt, 2, DENSE, sink=lambda e: e[0] in ("end", "error") and done.set())
    if not hasattr(r, "prompt_logprobs"):
        pytest.skip("the engine has no prompt logprobs")
    r.prompt_logprobs = 0
    r.kv_bytes = warm.request_bytes(DENSE, r.length)
    warm.submit(r)
    assert done.wait(60)
    assert warm.prefix.stats()["hits"] == 0


@pytest.mark.parametrize("pattern", [DENSE, D16, "local-W7-P2"])
def test_restore_then_prefill_equals_the_cold_cache_bit_for_bit(model, pattern):
    """The whole cache (slots and recurrent states) and the last logits after restoring 2 chunks and
    prefilling the rest equal a cold chunked prefill's, exactly; into a row of another pool length."""
    from ratplus.model.cache import RATPlusCache
    from ratplus.serve.pool import row_view

    prompt = _ids(2 * CHUNK + 11, seed=13)
    cache = PrefixCache(1 << 22, CHUNK)

    def prefill(view, start: int) -> torch.Tensor:
        for i in range(start, len(prompt), CHUNK):
            h = model.hidden(torch.tensor([prompt[i : i + CHUNK]]), cache=row_view(view, 0, 1, held=i))
            cache.store(pattern, prompt[: min(len(prompt), i + CHUNK)], row_view(view, 0, 1, held=0))
        return model.logits(h[:, -1:])[0, -1]

    with torch.inference_mode():
        cold = RATPlusCache(model.config, pattern, 1, 100)
        want = prefill(cold, 0)
        warm = RATPlusCache(model.config, pattern, 1, 300)
        assert cache.restore(pattern, prompt, row_view(warm, 0, 1)) == 2 * CHUNK
        got = prefill(warm, 2 * CHUNK)
    assert torch.equal(got, want)
    for a, b in zip(cold.layers, warm.layers):
        assert torch.equal(a.state, b.state)
        for ga, gb in zip(a.groups, b.groups):
            n = ga.layout.num_valid(len(prompt))
            assert gb.layout.num_valid(len(prompt)) == n
            assert torch.equal(ga.k[:, :, :n], gb.k[:, :, :n]) and torch.equal(ga.v[:, :, :n], gb.v[:, :, :n])
