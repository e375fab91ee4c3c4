"""A table of hostile requests (wrong types, out-of-range numbers, broken encodings, huge or deep
bodies): each gets a 4xx with an OpenAI-style error body, none a 5xx, while a concurrent stream
keeps flowing (no request stalls it: tokenizing a megabyte prompt runs off the event loop)."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")

from tests.serve.conftest import DENSE, NAME, httpx, live_server  # noqa: E402

MAX_BODY = 2 * 2**20


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _completion(**fields) -> bytes:
    return _j({"model": NAME, "prompt": "hi", "max_tokens": 2, **fields})


def _chat(content) -> bytes:
    return _j({"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2})


# (what, method, path, body bytes or None, headers, expected status, a word the message must hold)
CASES = [
    ("max_tokens as a string", "POST", "/v1/completions", _completion(max_tokens="4"), None, 400, "max_tokens"),
    ("max_tokens as a bool", "POST", "/v1/completions", _completion(max_tokens=True), None, 400, "max_tokens"),
    ("max_tokens as a float", "POST", "/v1/completions", _completion(max_tokens=4.0), None, 400, "max_tokens"),
    ("negative max_tokens", "POST", "/v1/completions", _completion(max_tokens=-1), None, 400, "max_tokens"),
    ("stream as a string", "POST", "/v1/completions", _completion(stream="yes"), None, 400, "stream"),
    ("temperature as a string", "POST", "/v1/completions", _completion(temperature="hot"), None, 400, "temperature"),
    ("temperature NaN", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', None,
     400, "temperature"),
    ("presence_penalty 99", "POST", "/v1/completions", _completion(presence_penalty=99), None, 400,
     "presence_penalty"),
    ("frequency_penalty -99", "POST", "/v1/completions", _completion(frequency_penalty=-99), None, 400,
     "frequency_penalty"),
    ("seed 2**70", "POST", "/v1/completions", _completion(seed=2**70), None, 400, "seed"),
    ("seed as a string", "POST", "/v1/completions", _completion(seed="42"), None, 400, "seed"),
    ("lone surrogate in the prompt", "POST", "/v1/completions",
     b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', None, 400, "surrogate"),
    ("lone surrogate in a chat message", "POST", "/v1/chat/completions", _chat("x\udfffy"), None, 400, "surrogate"),
    ("lone surrogate in a content part", "POST", "/v1/chat/completions", _chat([{"type": "text", "text": "\ud83d"}]),
     None, 400, "surrogate"),
    ("lone surrogate in stop", "POST", "/v1/completions", _completion(stop=["\ud800"]), None, 400, "surrogate"),
    ("lone surrogate in the model", "POST", "/v1/completions", _j({"model": "t\ud800", "prompt": "hi"}), None, 400,
     "surrogate"),
    ("invalid UTF-8 bytes", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', None, 400, ""),
    ("model as a number", "POST", "/v1/completions", _j({"model": 7, "prompt": "hi"}), None, 400, "model"),
    ("prompt null", "POST", "/v1/completions", _j({"model": NAME, "prompt": None}), None, 400, "prompt"),
    ("prompt an object", "POST", "/v1/completions", _j({"model": NAME, "prompt": {"a": 1}}), None, 400, "prompt"),
    ("prompt of mixed lists", "POST", "/v1/completions", _j({"model": NAME, "prompt": [[1, 2], "x"]}), None, 400,
     "prompt"),
    ("negative token id", "POST", "/v1/completions", _j({"model": NAME, "prompt": [-1, 2]}), None, 400, "prompt"),
    ("float token id", "POST", "/v1/completions", _j({"model": NAME, "prompt": [1.5, 2]}), None, 400, "prompt"),
    ("huge token id", "POST", "/v1/completions", _j({"model": NAME, "prompt": [2**80]}), None, 400, "prompt"),
    ("too many prompts", "POST", "/v1/completions", _j({"model": NAME, "prompt": [[1]] * 1000}), None, 400,
     "prompt"),
    ("10k logit_bias entries", "POST", "/v1/completions", _completion(logit_bias={str(i): 1 for i in range(10_000)}),
     None, 400, "logit_bias"),
    ("a JSON array body", "POST", "/v1/completions", b"[1, 2]", None, 400, "JSON object"),
    ("a JSON null body", "POST", "/v1/completions", b"null", None, 400, "JSON object"),
    ("a JSON string body", "POST", "/v1/completions", b'"prompt"', None, 400, "JSON object"),
    ("not JSON", "POST", "/v1/completions", b"model=tiny&prompt=hi", None, 400, "JSON"),
    ("an empty body", "POST", "/v1/completions", b"", None, 400, "empty"),
    ("a lone surrogate as a field name", "POST", "/v1/completions", b'{"model": "tiny", "\\ud800": 1}', None, 400,
     ""),
    ("a lone surrogate as a logit_bias key", "POST", "/v1/completions", _completion(logit_bias={"\ud800": 1}), None,
     400, "surrogate"),
    ("truncated JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', None, 400, "JSON"),
    ("deeply nested JSON", "POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, None, 400, ""),
    ("a body over the limit", "POST", "/v1/completions", _completion(prompt="a" * (MAX_BODY + 10)), None, 413,
     "limit"),
    ("a megabyte prompt", "POST", "/v1/completions", _completion(prompt="Once upon a time " * 100_000), None, 400,
     "context"),
    ("a megabyte chat message", "POST", "/v1/chat/completions", _chat("The quick brown fox. " * 80_000), None, 400,
     "context"),
    ("a text/plain JSON body", "POST", "/v1/completions", _completion(max_tokens="x"), {"Content-Type": "text/plain"},
     400, "max_tokens"),
    ("negative prompt_tokens", "GET", "/v1/patterns?prompt_tokens=-5", None, None, 400, "prompt_tokens"),
    ("prompt_tokens not a number", "GET", "/v1/patterns?prompt_tokens=abc", None, None, 400, "prompt_tokens"),
    ("an unknown route", "GET", "/v1/nothing", None, None, 404, ""),
    ("a wrong method", "GET", "/v1/completions", None, None, 405, ""),
]  # fmt: skip


def _check(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert needle in err["message"], err
    assert "Traceback" not in r.text


def test_hostile_requests_get_4xx_while_a_stream_keeps_flowing(model, tokenizer):
    with live_server(model, tokenizer, patterns=(DENSE,), max_body=MAX_BODY) as live:
        inner = live.engine.decode_step

        def slow_step(*args):  # ~5 ms a step: the stream lasts the whole table
            time.sleep(0.005)
            return inner(*args)

        live.engine.decode_step = slow_step
        arrivals: list[float] = []
        result: dict = {}

        def stream() -> None:
            body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0,
                    "ignore_eos": True, "stream": True, "return_token_ids": True}  # fmt: skip
            n = 0
            with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.monotonic())
                        for choice in json.loads(line[6:])["choices"]:
                            n += len(choice.get("token_ids", []))
            result["tokens"] = n

        t = threading.Thread(target=stream)
        t.start()
        while not arrivals:
            time.sleep(0.01)
        with httpx.Client(timeout=60) as client:
            for what, method, path, body, headers, status, needle in CASES:
                r = client.request(method, f"{live.url}{path}", content=body, headers=headers)
                try:
                    _check(r, status, needle)
                except AssertionError as e:
                    raise AssertionError(f"{what}: {e}") from None
            # a chunked body (no Content-Length) over the limit is cut off at the limit
            chunks = (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 4))
            _check(client.post(f"{live.url}/v1/completions", content=chunks), 413, "limit")
            # and the server is still right: a JSON body without a Content-Type is read as JSON
            request = client.build_request("POST", f"{live.url}/v1/completions", content=_completion())
            assert "content-type" not in request.headers
            ok = client.send(request)
            assert ok.status_code == 200, ok.text
        table_end = time.monotonic()
        t.join(120)
        assert result.get("tokens") == 900, result
        assert arrivals[-1] > table_end, "the stream ended before the table did: make it longer"
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert max(gaps) < 1.0, f"the stream stalled for {max(gaps):.2f} s"
        assert live.engine.finished.get("error", 0) == 0


def test_error_bodies_encode_whatever_the_request_held():
    """An error that quotes a request's lone surrogate still encodes (escaped), never a 500."""
    from ratplus.serve.errors import APIError

    body = json.loads(APIError(400, "model 't\ud800' not found", param="a\udfff").raw())
    assert body["error"]["message"] == "model 't\\ud800' not found" and body["error"]["param"] == "a\\udfff"
