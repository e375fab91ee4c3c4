"""``ratplus serve`` through the official ``openai`` client against a live server: completions,
chat, streaming, greedy tokens of concurrent clients equal to solo ``ratplus.generate``, errors,
admission by KV bytes and 429, disconnects."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import openai
import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")
import torch  # noqa: E402

from ratplus.generation import generate  # noqa: E402
from ratplus.model.cache import RATPlusCache  # noqa: E402
from ratplus.serve.admission import kv_bytes, parse_bytes  # noqa: E402
from ratplus.serve.app import TextStream, plain_chat_prompt  # noqa: E402
from tests.serve.conftest import D16, DENSE, NAME, httpx, live_server  # noqa: E402


def solo(model, ids: list[int], max_tokens: int, pattern: str) -> list[int]:
    """The prompt's greedy continuation from ``ratplus.generate`` alone, cut before EOS."""
    out = generate(model, [ids], max_tokens, pattern=pattern)[0, len(ids) :].tolist()
    eos = model.config.eos_token_id
    return out[: out.index(eos)] if eos in out else out


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 300, (n,), generator=g).tolist()  # some past 256: the pools grow
    return [torch.randint(0, 300, (t,), generator=g).tolist() for t in lengths]


# ---- admission formula --------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["dense", "D16-W8-P2", "D16-W256-P4", "local-W7-P2", "D4:2+dense:2"])
@pytest.mark.parametrize("length", [1, 9, 100, 333])
def test_kv_bytes_equal_the_cache_allocation(model, pattern, length):
    cache = RATPlusCache(model.config, pattern, 1, length)
    assert kv_bytes(model.config, pattern, length) == cache.nbytes()


def test_kv_bytes_refuses_patterns_without_slots(model):
    with pytest.raises(ValueError, match="fixed slot layout"):
        kv_bytes(model.config, "topk-B4-K1-W2-P1", 64)


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1000") == 1000
    for bad in ("four", "-1", "0", "3 parsecs"):
        with pytest.raises(ValueError, match="--kv-memory"):
            parse_bytes(bad)


def test_text_stream_holds_back_a_stop_prefix(tokenizer):
    ids = tokenizer.encode("Once upon a time there was").ids
    ts = TextStream(tokenizer, ["time"])
    out = "".join(ts.push(i) for i in ids)
    assert out == "Once upon a " and ts.stopped


# ---- completions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [DENSE, D16])
def test_completion_equals_generate(live, model, tokenizer, pattern):
    text = "Once upon a time there was a small model"
    ids = tokenizer.encode(text).ids
    r = live.client().completions.create(
        model=f"{NAME}:{pattern}", prompt=text, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
    )
    want = solo(model, ids, 24, pattern)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == want
    assert choice.text == tokenizer.decode(want)
    assert choice.finish_reason == ("length" if len(want) == 24 else "stop")
    assert r.model == f"{NAME}:{pattern}"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))


def test_pattern_by_body_field_and_default(live, model):
    ids = prompts(1, seed=3)[0]
    c = live.client()
    by_field = c.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, extra_body={"pattern": D16})
    default = c.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert by_field.model == f"{NAME}:{D16}" and default.model == f"{NAME}:{DENSE}"
    assert by_field.choices[0].text == live.state.tokenizer.decode(solo(model, ids, 12, D16))


@pytest.mark.parametrize("pattern", [DENSE, D16])
def test_sixteen_concurrent_clients_get_their_solo_greedy_tokens(live, model, pattern):
    """16 clients at once (max_batch 8: rows join and leave while others decode, the rest queue),
    prompts of 3..300 tokens (the pool grows past 256 slots while rows run), 5..40 new tokens, half
    of them streaming: every row's tokens are
    those ``ratplus.generate`` gives that prompt alone."""
    ps = prompts(16, seed=1)
    news = [5 + (7 * i) % 36 for i in range(16)]

    async def one(client, ids, n, stream):
        kw = dict(model=f"{NAME}:{pattern}", prompt=ids, max_tokens=n, temperature=0)
        if not stream:
            r = await client.completions.create(**kw, extra_body={"return_token_ids": True})
            return r.choices[0].model_extra["token_ids"]
        got = []
        async for chunk in await client.completions.create(**kw, stream=True, extra_body={"return_token_ids": True}):
            got += (chunk.choices[0].model_extra or {}).get("token_ids") or []
        return got

    async def main():
        client = live.async_client()
        return await asyncio.gather(*(one(client, p, n, i % 2 == 1) for i, (p, n) in enumerate(zip(ps, news))))

    got = asyncio.run(main())
    for ids, n, g in zip(ps, news, got):
        assert g == solo(model, ids, n, pattern)
    s = live.engine.snapshot()
    assert s["running"] == 0 and s["kv_bytes_in_use"] == 0 and s["kv_bytes_allocated"] == 0
    assert s["peak_running"] == 8


def test_streaming_completion_matches_the_whole_one(live):
    c = live.client()
    kw = dict(model=f"{NAME}:{D16}", prompt="To be, or not to be", max_tokens=20, temperature=0)
    whole = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_ends_the_text_before_it(live, model, tokenizer):
    ids = prompts(1, seed=5)[0]
    full = tokenizer.decode(solo(model, ids, 30, DENSE))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the test needs a visible stop string"
    c = live.client()
    kw = dict(model=f"{NAME}:{DENSE}", prompt=ids, max_tokens=30, temperature=0, stop=[stop])
    r = c.completions.create(**kw)
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True))
    assert streamed == r.choices[0].text


def test_seeded_sampling_is_reproducible_and_equals_generate(live, model):
    ids = prompts(1, seed=7)[0]
    kw = dict(model=f"{NAME}:{D16}", prompt=ids, max_tokens=16, temperature=0.9, top_p=0.95, seed=42)
    c = live.client()
    a = c.completions.create(**kw, extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
    b = c.completions.create(**kw, extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
    g = torch.Generator().manual_seed(42)
    want = generate(model, [ids], 16, pattern=D16, temperature=0.9, top_p=0.95, generator=g)[0, len(ids) :].tolist()
    eos = model.config.eos_token_id
    assert a == b == (want[: want.index(eos)] if eos in want else want)


# ---- chat -----------------------------------------------------------------------------------------------
def test_chat_uses_the_plain_format_and_streams(live, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]
    c = live.client()
    r = c.chat.completions.create(model=f"{NAME}:{D16}", messages=messages, max_tokens=15, temperature=0)
    ids = tokenizer.encode(plain_chat_prompt([(m["role"], m["content"]) for m in messages])).ids
    want = tokenizer.decode(solo(model, ids, 15, D16))
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    stream = c.chat.completions.create(
        model=f"{NAME}:{D16}", messages=messages, max_tokens=15, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


# ---- the other routes -----------------------------------------------------------------------------------------
def test_models_health_metrics(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [f"{NAME}:{DENSE}", f"{NAME}:{D16}"]
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    text = httpx.get(f"{live.url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["ratplus_kv_bytes_budget"] == 1 << 30
    assert values["ratplus_requests_running"] == 0 and values["ratplus_kv_bytes_in_use"] == 0
    assert values["ratplus_generated_tokens_total"] == live.engine.tokens_total > 0
    assert values["ratplus_time_to_first_token_seconds_count"] > 0
    assert "ratplus_tokens_per_second" in values
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and "<textarea" in page.text


# ---- errors -----------------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert "Traceback" not in r.text
    return body


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ('{"model": "tiny", "prompt": "hi"', 400, "not valid JSON"),
        ("[1, 2]", 400, "JSON object"),
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "not found"),
        ({"model": "tiny:D7-W3", "prompt": "hi"}, 404, "not loaded"),
        ({"model": "tiny:banana", "prompt": "hi"}, 404, "not a valid pattern"),
        ({"model": "tiny", "prompt": "hi", "pattern": "D4"}, 404, "not loaded"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 1023}, 400, "context"),
        ({"model": "tiny", "prompt": list(range(5)) * 205}, 400, "context"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "prompt": "hi", "n": 17}, 400, "less than or equal to 16"),
        ({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "tiny", "prompt": ""}, 400, "empty"),
        ({"model": "tiny", "prompt": [1, 99999]}, 400, "outside"),
        ({"model": "tiny", "prompt": [[1, 2], []]}, 400, "empty"),
        ({"model": "tiny", "prompt": ["a"] * 65}, 400, "--max-queue"),
    ],
)
def test_bad_completion_requests(live, body, status, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{live.url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert needle in _error(r, status)["message"]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, "max_"),
    ],
)
def test_bad_chat_requests(live, body, needle):
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body)
    assert needle in _error(r, 400)["message"]


def test_errors_through_the_client_and_the_server_lives_on(live):
    c = live.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=NAME, prompt="hi", max_tokens=5000)
    _error(httpx.get(f"{live.url}/v1/nothing"), 404)
    assert c.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


# ---- admission, 429, disconnects ------------------------------------------------------------------------------
class Gate:
    """Holds the engine before each decode step, once ``rows`` requests are decoding, until opened:
    they got their first token (from their prefill) and wait, so a test can look at the server."""

    def __init__(self, engine, rows: int = 0):
        self.open, self.engine, self.rows, self.inner = threading.Event(), engine, rows, engine.decode_step
        engine.decode_step = self

    def __call__(self, *args):
        if sum(len(p.rows) for p in self.engine.pools.values()) >= self.rows:
            self.open.wait(60)
        return self.inner(*args)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def test_admission_by_kv_bytes_then_queue_then_429(model, tokenizer):
    """Budget for exactly two requests of this size: two run, one waits, the next gets 429; once
    the first two finish the waiting one runs, and every output is still the solo one."""
    ps = prompts(3, seed=11)
    ps = [p[:40] + [7] * (40 - len(p[:40])) for p in ps]  # 40 tokens each: the same KV bytes
    need = kv_bytes(model.config, D16, 40 + 20)
    with live_server(model, tokenizer, kv_memory=2 * need + need // 2, max_batch=8, max_queue=1) as live:
        gate = Gate(live.engine, rows=2)
        c = live.client()
        streams = [
            c.completions.create(
                model=f"{NAME}:{D16}",
                prompt=p,
                max_tokens=20,
                temperature=0,
                stream=True,
                extra_body={"return_token_ids": True},  # a chunk per token, even one that ends mid-character
            )
            for p in ps[:2]
        ]
        firsts = [next(iter(s)) for s in streams]  # both admitted: their prefill gave a first token
        results = {}

        def third():
            r = c.completions.create(model=f"{NAME}:{D16}", prompt=ps[2], max_tokens=20, temperature=0)
            results["third"] = r.choices[0].text

        t = threading.Thread(target=third)
        t.start()
        deadline = time.monotonic() + 10
        while metrics(live.url)["ratplus_requests_queued"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        m = metrics(live.url)
        assert m["ratplus_requests_running"] == 2
        assert m["ratplus_kv_bytes_in_use"] == 2 * need
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=f"{NAME}:{D16}", prompt="hi", max_tokens=20)
        too_big = httpx.post(f"{live.url}/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 1000})
        assert _error(too_big, 400)["code"] == "kv_memory_exceeded"
        gate.open.set()
        texts = [f.choices[0].text + "".join(ch.choices[0].text for ch in s) for f, s in zip(firsts, streams)]
        t.join(30)
        texts.append(results["third"])
        for p, text in zip(ps, texts):
            assert text == tokenizer.decode(solo(model, p, 20, D16))
        m = metrics(live.url)
        assert m["ratplus_requests_running"] == 0 and m["ratplus_kv_bytes_in_use"] == 0


def test_disconnect_frees_the_row_and_its_memory(model, tokenizer):
    with live_server(model, tokenizer, max_batch=4) as live:
        gate = Gate(live.engine)
        gate.open.set()
        slow = gate.inner

        def step(*args):  # about 5 ms a step, so 900 tokens take seconds
            time.sleep(0.005)
            return slow(*args)

        gate.inner = step
        body = {"model": f"{NAME}:{DENSE}", "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0}
        for stream in (True, False):
            with httpx.Client(timeout=1.0 if not stream else 30) as h:
                if stream:
                    with h.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": True}) as r:
                        lines = r.iter_lines()
                        assert next(lines).startswith("data: ")
                else:
                    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and hangs up
                        h.post(f"{live.url}/v1/completions", json=body)
            deadline = time.monotonic() + 10
            while live.engine.snapshot()["running"]:
                assert time.monotonic() < deadline, "the row of a gone client was not freed"
                time.sleep(0.02)
            s = live.engine.snapshot()
            assert s["kv_bytes_in_use"] == 0 and s["kv_bytes_allocated"] == 0, s
        assert live.engine.finished["cancelled"] == 2, live.engine.finished
        assert live.engine.tokens_total < 2 * 900
