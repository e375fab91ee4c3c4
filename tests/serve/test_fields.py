"""Sampling and scoring fields of ``ratplus serve``, each against a reference computed here from the
model's own logits (a full forward per step, no cache): logprobs / top_logprobs (completions and
chat, streamed and not), echo with prompt logprobs and max_tokens 0, batched and token-id prompts,
presence / frequency / repetition penalties, logit_bias, top_k, min_p, stop_token_ids, ignore_eos,
min_tokens, max_completion_tokens; and every field the server does not implement refused by name."""

from __future__ import annotations

import json

import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")
import torch  # noqa: E402

from ratplus.generation import generate  # noqa: E402
from tests.serve.conftest import D16, DENSE, NAME, httpx  # noqa: E402

PROMPT = [5, 17, 99, 3, 250, 41, 8, 77, 120, 64, 33, 2]


def logits_of(model, ids: list[int], pattern: str) -> torch.Tensor:
    """(T, V) float64 logits of a full forward over ids."""
    with torch.no_grad():
        return model(torch.tensor([ids]), pattern=pattern)[0].double()


def greedy_ref(model, ids, n, pattern, transform=None, stop=(), min_tokens=0):
    """Greedy tokens, recomputing the whole sequence each step; ``transform(logits, out)`` edits the
    last position's logits (a plain-Python reference of the field under test)."""
    out: list[int] = []
    for _ in range(n):
        logits = logits_of(model, ids + out, pattern)[-1].clone()
        if transform is not None:
            transform(logits, out)
        if len(out) < min_tokens:
            for s in stop:
                logits[s] = float("-inf")
        t = int(logits.argmax())
        if t in stop:
            break
        out.append(t)
    return out


def post(live, body: dict, route: str = "completions") -> dict:
    r = httpx.post(f"{live.url}/v1/{route}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(live, body: dict, route: str = "completions") -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{live.url}/v1/{route}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def error(live, body: dict, route: str = "completions") -> dict:
    r = httpx.post(f"{live.url}/v1/{route}", json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def eos(model) -> int:
    return model.config.eos_token_id


# ---- logprobs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [DENSE, D16])
def test_completion_logprobs_equal_log_softmax_of_the_logits(live, model, pattern):
    body = {"model": f"{NAME}:{pattern}", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3,
            "return_token_ids": True, "ignore_eos": True}  # fmt: skip
    whole = post(live, body)["choices"][0]
    out = whole["token_ids"]
    assert out == greedy_ref(model, PROMPT, 8, pattern) and len(out) == 8
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    for i, t in enumerate(out):
        ref = torch.log_softmax(logits_of(model, PROMPT + out[:i], pattern)[-1], -1)
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[t]), abs=1e-4)
        top3 = sorted(ref.tolist(), reverse=True)[:3]
        assert sorted(lp["top_logprobs"][i].values(), reverse=True)[:3] == pytest.approx(top3, abs=1e-4)
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(lp["token_logprobs"][i], abs=1e-6)  # greedy
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    chunks = stream(live, body)
    streamed = {"tokens": [], "token_logprobs": []}
    for ch in chunks:
        for c in ch["choices"]:
            if c.get("logprobs"):
                streamed["tokens"] += c["logprobs"]["tokens"]
                streamed["token_logprobs"] += c["logprobs"]["token_logprobs"]
    assert streamed["tokens"] == lp["tokens"]
    assert streamed["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-6)


def test_chat_logprobs_and_top_logprobs(live, model, tokenizer):
    from ratplus.serve.app import plain_chat_prompt

    messages = [{"role": "user", "content": "Tell me about foxes."}]
    ids = tokenizer.encode(plain_chat_prompt([("user", "Tell me about foxes.")])).ids
    body = {"model": f"{NAME}:{DENSE}", "messages": messages, "max_completion_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "return_token_ids": True, "ignore_eos": True}  # fmt: skip
    choice = post(live, body, "chat/completions")["choices"][0]
    out = choice["token_ids"]
    assert out == greedy_ref(model, ids, 6, DENSE)
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    for i, (t, entry) in enumerate(zip(out, content)):
        ref = torch.log_softmax(logits_of(model, ids + out[:i], DENSE)[-1], -1)
        assert entry["logprob"] == pytest.approx(float(ref[t]), abs=1e-4)
        assert entry["token"] == tokenizer.decode([t], skip_special_tokens=False)
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(ref.topk(2).values.tolist(), abs=1e-4)
        if entry["token"].isascii():
            assert bytes(entry["bytes"]) == entry["token"].encode()
    got = []
    for ch in stream(live, body, "chat/completions"):
        for c in ch["choices"]:
            got += (c.get("logprobs") or {}).get("content") or []
    assert [e["token"] for e in got] == [e["token"] for e in content]
    assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in content], abs=1e-6)
    plain = post(live, {**body, "logprobs": False, "top_logprobs": None}, "chat/completions")["choices"][0]
    assert plain["logprobs"] is None and plain["message"]["content"] == choice["message"]["content"]


def test_token_bytes_join_to_the_text(tokenizer):
    """Chat logprobs' ``bytes`` are each token's raw bytes: joined, they decode to the text even
    where a character is split across tokens (its pieces' texts are U+FFFD)."""
    from ratplus.serve.responses import token_bytes, token_text

    text = "naïve café — 日本語 🙂 fox"
    ids = tokenizer.encode(text).ids
    assert any(token_text(tokenizer, t) == "\ufffd" for t in ids)
    assert b"".join(bytes(token_bytes(tokenizer, t)) for t in ids).decode("utf-8") == text


# ---- echo, batched and token-id prompts --------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [DENSE, D16])
def test_echo_scores_the_prompt_with_max_tokens_zero(live, model, tokenizer, pattern):
    prompts = [PROMPT, [*PROMPT[:5], 300, 301], list(range(40, 80))]
    body = {"model": f"{NAME}:{pattern}", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
            "temperature": 0}  # fmt: skip
    r = post(live, body)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert r["usage"]["prompt_tokens"] == sum(map(len, prompts)) and r["usage"]["completion_tokens"] == 0
    for ids, c in zip(prompts, r["choices"]):
        assert c["text"] == tokenizer.decode(ids) and c["finish_reason"] == "length"
        lp = c["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = torch.log_softmax(logits_of(model, ids, pattern), -1)
        want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        greedy = [int(ref[i - 1].argmax()) == ids[i] for i in range(1, len(ids))]
        assert [t == max(top.values()) for t, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:])] == greedy
    # lm-eval's loglikelihood request: echo + one generated token; the prompt part is the same
    one = post(live, {**body, "max_tokens": 1})
    for c0, c1 in zip(r["choices"], one["choices"]):
        assert c1["logprobs"]["token_logprobs"][:-1] == pytest.approx(c0["logprobs"]["token_logprobs"], abs=1e-6)
        assert len(c1["logprobs"]["tokens"]) == len(c0["logprobs"]["tokens"]) + 1
    chunks = stream(live, {**body, "prompt": "Once upon a time", "max_tokens": 3})
    text = "".join(c["text"] for ch in chunks for c in ch["choices"])
    assert text.startswith("Once upon a time") and chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_batched_text_prompts_get_one_choice_each(live, model, tokenizer):
    texts = ["Once upon a time", "The quick brown fox", "def add(a, b):"]
    body = {"model": f"{NAME}:{D16}", "prompt": texts, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    r = post(live, body)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for t, c in zip(texts, r["choices"]):
        ids = tokenizer.encode(t).ids
        want = generate(model, [ids], 6, pattern=D16)[0, len(ids) :].tolist()
        want = want[: want.index(eos(model))] if eos(model) in want else want
        assert c["token_ids"] == want and c["text"] == tokenizer.decode(want)
    by_index: dict[int, str] = {}
    for ch in stream(live, body):
        for c in ch["choices"]:
            by_index[c["index"]] = by_index.get(c["index"], "") + c["text"]
    assert [by_index[i] for i in range(3)] == [c["text"] for c in r["choices"]]


def test_n_samples_per_prompt(live, model, tokenizer):
    """n = 3 with a seed: three choices per prompt (index = prompt x n + sample), sample j drawn
    with seed + j exactly as ``ratplus.generate`` draws it; streamed the same; prompt tokens counted
    once per prompt."""
    prompts = [PROMPT, PROMPT[:6]]
    body = {"model": f"{NAME}:{DENSE}", "prompt": prompts, "n": 3, "max_tokens": 6, "temperature": 0.9,
            "seed": 100, "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = post(live, {k: v for k, v in body.items() if k != "stream_options"})
    assert [c["index"] for c in r["choices"]] == list(range(6))
    assert r["usage"]["prompt_tokens"] == sum(map(len, prompts)) and r["usage"]["completion_tokens"] == 36
    for c in r["choices"]:
        i, j = divmod(c["index"], 3)
        g = torch.Generator().manual_seed(100 + j)
        want = generate(model, [prompts[i]], 6, pattern=DENSE, temperature=0.9, generator=g, stop_tokens=[])
        assert c["token_ids"] == want[0, len(prompts[i]) :].tolist()
    assert len({tuple(c["token_ids"]) for c in r["choices"][:3]}) == 3  # the samples differ
    streamed: dict[int, list[int]] = {}
    chunks = stream(live, body)
    for ch in chunks:
        for c in ch["choices"]:
            streamed.setdefault(c["index"], []).extend(c.get("token_ids", []))
    assert [streamed[k] for k in range(6)] == [c["token_ids"] for c in r["choices"]]
    assert chunks[-1]["usage"] == r["usage"]
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4,
            "temperature": 1.0, "seed": 1}  # fmt: skip
    assert [c["index"] for c in post(live, chat, "chat/completions")["choices"]] == [0, 1]


# ---- penalties and logit_bias (greedy: the reference is exact) -----------------------------------------------
def _presence(v):
    def f(logits, out):
        for t in set(out):
            logits[t] -= v

    return f


def _frequency(v):
    def f(logits, out):
        for t in set(out):
            logits[t] -= v * out.count(t)

    return f


def _repetition(v):
    def f(logits, out):
        for t in set(PROMPT) | set(out):
            logits[t] = logits[t] / v if logits[t] > 0 else logits[t] * v

    return f


def _bias(bias):
    def f(logits, out):
        for t, b in bias.items():
            logits[int(t)] += b

    return f


@pytest.mark.parametrize(
    "field, value, transform",
    [
        ("presence_penalty", 1.5, _presence(1.5)),
        ("frequency_penalty", 0.9, _frequency(0.9)),
        ("repetition_penalty", 3.0, _repetition(3.0)),
        ("logit_bias", {"7": 4.0, "99": -100}, _bias({"7": 4.0, "99": -100})),
    ],
)
def test_penalty_and_bias_fields_equal_the_reference(live, model, field, value, transform):
    n = 16
    plain = greedy_ref(model, PROMPT, n, DENSE, stop=(eos(model),))
    want = greedy_ref(model, PROMPT, n, DENSE, transform, stop=(eos(model),))
    assert want != plain, "the field must change this prompt's greedy continuation"
    body = {"model": f"{NAME}:{DENSE}", "prompt": PROMPT, "max_tokens": n, "temperature": 0, field: value,
            "return_token_ids": True}  # fmt: skip
    assert post(live, body)["choices"][0]["token_ids"] == want
    got = [t for ch in stream(live, body) for c in ch["choices"] for t in c.get("token_ids", [])]
    assert got == want


def test_top_k_and_min_p(live, model):
    """top_k 1 and min_p 1 keep only the best token: greedy at any temperature; a seeded draw with
    top_k / min_p equals ``ratplus.generate``'s with the same generator settings."""
    base = {"model": f"{NAME}:{DENSE}", "prompt": PROMPT, "max_tokens": 10, "return_token_ids": True,
            "ignore_eos": True}  # fmt: skip
    greedy = greedy_ref(model, PROMPT, 10, DENSE)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert post(live, {**base, "temperature": 1.7, "seed": 3, **extra})["choices"][0]["token_ids"] == greedy
    draws = post(live, {**base, "temperature": 1.5, "seed": 11, "top_k": 4})["choices"][0]["token_ids"]
    g = torch.Generator().manual_seed(11)
    want = generate(model, [PROMPT], 10, pattern=DENSE, temperature=1.5, top_k=4, generator=g, stop_tokens=[])
    assert draws == want[0, len(PROMPT) :].tolist() != greedy

    # this random model's distribution is nearly flat: min_p 0.97 keeps a handful of tokens per step
    def kept(out: list[int]) -> list[bool]:
        ok = []
        for i, t in enumerate(out):
            p = torch.softmax(logits_of(model, PROMPT + out[:i], DENSE)[-1], -1)
            ok.append(bool(p[t] >= 0.97 * p.max() - 1e-9))
        return ok

    wide = [post(live, {**base, "temperature": 1.0, "seed": s})["choices"][0]["token_ids"] for s in range(3)]
    narrow = [post(live, {**base, "temperature": 1.0, "seed": s, "min_p": 0.97})["choices"][0]["token_ids"]
              for s in range(3)]  # fmt: skip
    assert all(all(kept(out)) for out in narrow)
    assert not all(all(kept(out)) for out in wide)  # without min_p, tokens below the floor are drawn


# ---- stopping and lengths ---------------------------------------------------------------------------------
def test_stop_token_ids_ignore_eos_min_tokens(live, model):
    base = {"model": f"{NAME}:{DENSE}", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    greedy = greedy_ref(model, PROMPT, 8, DENSE, stop=(eos(model),))
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    c = post(live, {**base, "stop_token_ids": [stop_at]})["choices"][0]
    assert c["token_ids"] == greedy[:first] and c["finish_reason"] == "stop"
    force_eos = {"logit_bias": {str(eos(model)): 100}}  # EOS is then the greedy token at every step
    c = post(live, {**base, **force_eos})["choices"][0]
    assert c["token_ids"] == [] and c["finish_reason"] == "stop"
    c = post(live, {**base, **force_eos, "ignore_eos": True})["choices"][0]
    assert c["token_ids"] == [eos(model)] * 8 and c["finish_reason"] == "length"
    c = post(live, {**base, **force_eos, "min_tokens": 3})["choices"][0]
    want = greedy_ref(model, PROMPT, 8, DENSE, _bias({str(eos(model)): 100}), stop=(eos(model),), min_tokens=3)
    assert c["token_ids"] == want and len(want) == 3 and c["finish_reason"] == "stop"
    assert error(live, {**base, "min_tokens": 9})["param"] == "min_tokens"


def test_max_completion_tokens_everywhere(live):
    base = {"model": f"{NAME}:{DENSE}", "temperature": 0, "ignore_eos": True}
    c = post(live, {**base, "prompt": PROMPT, "max_completion_tokens": 5})
    assert c["usage"]["completion_tokens"] == 5 and c["choices"][0]["finish_reason"] == "length"
    chat = {**base, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
    assert post(live, chat, "chat/completions")["usage"]["completion_tokens"] == 4
    err = error(live, {**base, "prompt": PROMPT, "max_tokens": 3, "max_completion_tokens": 5})
    assert "max_completion_tokens" in err["message"]
    assert error(live, {**base, "prompt": PROMPT, "max_completion_tokens": 2000})["param"] == "max_completion_tokens"


# ---- refused fields ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, route",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}], "chat/completions"),
        ("tool_choice", "auto", "chat/completions"),
        ("functions", [{"name": "f"}], "chat/completions"),
        ("response_format", {"type": "xml"}, "chat/completions"),
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            "completions",
        ),
        ("response_format", {"type": "json_schema"}, "completions"),
        ("best_of", 2, "completions"),
        ("suffix", " the end", "completions"),
        ("n", 0, "completions"),
        ("n", 17, "chat/completions"),
        ("n", True, "completions"),
        ("echo", True, "chat/completions"),
        ("top_logprobs", 2, "chat/completions"),  # without logprobs: true
        ("logprobs", 21, "completions"),
        ("presence_penalty", 99, "completions"),
        ("repetition_penalty", 0, "completions"),
        ("logit_bias", {"fox": 1}, "completions"),
        ("logit_bias", {"5": 101}, "completions"),
        ("logit_bias", {"99999": 1}, "completions"),
        ("stop_token_ids", [99999], "completions"),
        ("top_k", -2, "completions"),
        ("min_p", 1.5, "completions"),
        ("max_token", 5, "completions"),  # a typo is not silently ignored
    ],
)
def test_unsupported_or_bad_fields_get_400_naming_them(live, field, value, route):
    body = {"model": NAME, "max_tokens": 2, field: value}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route.startswith("chat") else {"prompt": "hi"})
    err = error(live, body, route)
    assert err["param"].split(".")[0] == field and field in err["message"], err


def test_neutral_values_of_unsupported_fields_are_accepted(live):
    body = {"model": NAME, "prompt": "hi", "max_tokens": 2, "n": 1, "best_of": 1, "suffix": None, "user": "u-1",
            "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "response_format": {"type": "text"},
            "tools": None}  # fmt: skip
    assert post(live, body)["usage"]["completion_tokens"] >= 1


# ---- response_format: constrained decoding (llguidance) --------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 4}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("pattern", [DENSE, D16])
def test_response_format_json_schema_gives_valid_json(live, model, pattern):
    """This random model writes noise; under the schema, greedy and sampled, streamed and not, the
    text is JSON that the schema accepts, and it ends (EOS) when the value is complete."""
    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    base = {"model": f"{NAME}:{pattern}", "prompt": PROMPT, "max_tokens": 60, "response_format": fmt}
    free = post(live, {**base, "response_format": {"type": "text"}, "temperature": 0})["choices"][0]["text"]
    with pytest.raises(ValueError):
        json.loads(free)
    for extra in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.8, "seed": 9, "top_k": 20}):
        c = post(live, {**base, **extra})["choices"][0]
        value = json.loads(c["text"])
        assert set(value) == {"name", "ok"} and isinstance(value["ok"], bool) and len(value["name"]) <= 4
        assert c["finish_reason"] == "stop"
        streamed = "".join(x["text"] for ch in stream(live, {**base, **extra}) for x in ch["choices"])
        assert streamed == c["text"]
    chat = {"model": f"{NAME}:{pattern}", "messages": [{"role": "user", "content": "a thing"}], "max_tokens": 60,
            "temperature": 0, "response_format": {"type": "json_object"}}  # fmt: skip
    c = post(live, chat, "chat/completions")["choices"][0]
    assert c["message"]["content"].startswith("{")
    if c["finish_reason"] == "stop":
        assert isinstance(json.loads(c["message"]["content"]), dict)


def test_long_text_prompts_near_the_context_are_accepted(live, tokenizer):
    """The byte bound that refuses huge text prompts before tokenizing never refuses one that fits:
    prompts of 1,000+ tokens (the context is 1,024) made of the longest tokens and of multi-byte text."""
    longest = max(tokenizer.get_vocab(), key=lambda t: len(tokenizer.decode([tokenizer.token_to_id(t)])))
    unit = tokenizer.decode([tokenizer.token_to_id(longest)])
    for text in (unit * 2000, "日本語 🙂 naïve " * 400):
        ids = tokenizer.encode(text).ids
        n = 1020
        while len(ids) > n:  # trim to n tokens of text
            text = text[: int(len(text) * n / len(ids))]
            ids = tokenizer.encode(text).ids
        assert 900 < len(ids) <= 1020
        r = post(live, {"model": NAME, "prompt": text, "max_tokens": 1, "temperature": 0})
        assert r["usage"]["prompt_tokens"] == len(ids)
