"""The HTTP side of ``ratplus serve``: FastAPI routes, OpenAI request/response schemas, errors.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events in OpenAI's chunk format), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text), ``GET /`` (the playground page).

Models: one loaded weight copy served under one id per loaded pattern, ``<name>:<pattern>``
(``demo:D16-W256-P4``); ``<name>`` alone means the first loaded pattern, and the body field
``pattern`` (an extra, e.g. ``extra_body={"pattern": "dense"}`` in the ``openai`` client) picks
another.

Errors are OpenAI-style JSON bodies ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed JSON, bad fields and prompts that do not fit the context or the KV budget, 404 for an
unknown model or pattern, 429 when the waiting queue is full, 503 while shutting down, 500 (with no
traceback) for anything else; the server keeps serving after each.

Chat prompts: the folder's ``tokenizer_config.json`` ``chat_template`` (a Jinja template, as in
Hugging Face folders) when it has one, else the plain format::

    System: <system message>\\n\\nUser: <message>\\n\\nAssistant: <message>\\n\\nUser: ...\\n\\nAssistant:
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ratplus.io.tokenizer import chat_prompt
from ratplus.io.tokenizer import load_chat_template as load_chat_template  # re-exported: the CLI imports it here
from ratplus.io.tokenizer import plain_chat_prompt as plain_chat_prompt  # re-exported: tests import it here
from ratplus.serve.engine import Engine, QueueFull, ShuttingDown
from ratplus.serve.engine import Request as EngineRequest
from ratplus.serve.page import PAGE

logger = logging.getLogger("ratplus")


# ---- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client sees as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if param is None and first.get("type") == "model_attributes_type":
        msg = "the body must be a JSON object"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


# ---- request schemas --------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, as other servers do
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    pattern: str | None = None  # extra: the attention pattern, when ``model`` names the model only
    return_token_ids: bool = False  # extra: each choice also carries the generated token ids

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, "messages: only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


# ---- text ------------------------------------------------------------------------------------------
class TextStream:
    """Generated tokens -> text pieces, with stop strings: text that could be the start of a stop
    string is held back until it is not; a stop string ends the text before it. Each piece is the
    difference of the decoded continuation (tokens may complete each other's characters)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""  # what has been handed out
        self.stopped = False

    def push(self, token: int | None) -> str:
        """Add a token (None: the end) and return the text that can be handed out now."""
        if token is not None:
            self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens)
        if token is not None and full.endswith("\ufffd"):
            return ""  # an unfinished multi-byte character
        hits = [full.find(s, max(0, len(self.text) - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.stopped = True
            full = full[: min(hits)]
        elif token is not None:
            # hold back a tail that may begin a stop string
            hold = max([k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])], default=0)
            full = full[: len(full) - hold]
        if not full.startswith(self.text):  # a later token re-spelled earlier text: hand out the rest
            return ""
        piece, self.text = full[len(self.text) :], full
        return piece


# ---- the app ---------------------------------------------------------------------------------------
class ServeState:
    """What the routes share: engine, tokenizer, names, limits."""

    def __init__(self, engine: Engine, tokenizer, name: str, chat_template: str | None = None):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.config = engine.model.config
        self.patterns = list(engine.pools)
        self.chat_template = chat_template
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        return [f"{self.name}:{p}" for p in self.patterns]

    def resolve_pattern(self, model: str, pattern: str | None) -> str:
        name, _, spec = model.partition(":")
        if name != self.name:
            raise APIError(
                404,
                f"model {model!r} not found; available: {', '.join(self.model_ids())}",
                param="model",
                code="model_not_found",
            )
        if spec and pattern:
            raise APIError(
                400, "give the pattern either in model ('name:pattern') or in pattern, not both", param="pattern"
            )
        spec = spec or pattern
        if not spec:
            return self.patterns[0]
        try:
            canonical = self.config.canonical_pattern(spec)
        except ValueError as e:
            raise APIError(
                404, f"pattern {spec!r} is not a valid pattern: {e}", param="model", code="model_not_found"
            ) from e
        if canonical not in self.patterns:
            raise APIError(
                404,
                f"pattern {canonical!r} is not loaded; available: {', '.join(self.model_ids())}",
                param="model",
                code="model_not_found",
            )
        return canonical

    def encode(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise APIError(
                    400, f"prompt: token id {bad[0]} is outside [0, {self.config.vocab_size})", param="prompt"
                )
        if not ids:
            raise APIError(400, "prompt: the prompt is empty (no tokens)", param="prompt")
        return ids

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        pairs = [(m.role, m.text()) for m in messages]
        eos = None if self.config.eos_token_id is None else self.tokenizer.id_to_token(self.config.eos_token_id)
        try:
            return chat_prompt(self.chat_template, pairs, eos)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from e

    def build(self, body: _Sampling, ids: list[int], max_tokens: int | None, sink) -> EngineRequest:
        pattern = self.resolve_pattern(body.model, body.pattern)
        limit = self.config.max_seq_len
        if len(ids) >= limit:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {limit} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise APIError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} "
                f"exceeds the model's context of {limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        need = self.engine.request_bytes(pattern, len(ids) + max_tokens)
        if need > self.engine.budget.budget:
            raise APIError(
                400,
                f"this request needs {need:,} bytes of KV cache under {pattern}, more than the "
                f"server's --kv-memory of {self.engine.budget.budget:,} bytes; lower max_tokens or "
                "the prompt",
                param="max_tokens",
                code="kv_memory_exceeded",
            )
        eos = self.config.eos_token_id
        return EngineRequest(
            prompt=ids,
            max_tokens=max_tokens,
            pattern=pattern,
            sink=sink,
            temperature=body.temperature,
            top_p=None if body.top_p >= 1 else body.top_p,
            seed=body.seed,
            stop_ids=() if eos is None else (eos,),
            kv_bytes=need,
        )


def create_app(state: ServeState, shutdown_grace: float = 10.0) -> FastAPI:
    """The FastAPI app; the engine starts with the app and drains when it shuts down."""

    async def lifespan(app: FastAPI):
        if state.engine.state == "new":
            state.engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.engine.stop, shutdown_grace + 5)

    app = FastAPI(title="ratplus serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("ratplus serve: unhandled error in %s", request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__})", "server_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.get("/health")
    async def health():
        s = state.engine.snapshot()
        ok = s["state"] in ("new", "running")
        return JSONResponse(
            {"status": "ok" if ok else s["state"], "running": s["running"], "queued": s["queued"]},
            status_code=200 if ok else 503,
        )

    @app.get("/v1/models")
    async def models():
        data = [
            {"id": m, "object": "model", "created": state.created, "owned_by": "ratplus"} for m in state.model_ids()
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/patterns")
    async def patterns(prompt_tokens: int = 0, max_tokens: int = 0):
        """Per loaded pattern: its model id and the KV bytes of a request of this size (the playground)."""
        n = max(1, prompt_tokens + max_tokens)
        return {
            "data": [
                {
                    "id": f"{state.name}:{p}",
                    "pattern": p,
                    "kv_bytes": state.engine.request_bytes(p, min(n, state.config.max_seq_len)),
                }
                for p in state.patterns
            ]
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return prometheus_text(state.engine.snapshot())

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        ids = state.encode(body.prompt)
        return await _generate(state, body, ids, body.max_tokens, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        text = state.chat_prompt(body.messages)
        ids = state.encode(text)
        return await _generate(state, body, ids, body.max_completion_tokens or body.max_tokens, request, chat=True)

    return app


async def _generate(state: ServeState, body: _Sampling, ids: list[int], max_tokens, request: Request, chat: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(event) -> None:  # engine thread -> this request's queue
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(events.put_nowait, event)

    req = state.build(body, ids, max_tokens, sink)
    try:
        state.engine.submit(req)
    except QueueFull as e:
        raise APIError(
            429, f"the server is at capacity: {e}; retry later", "rate_limit_error", code="queue_full"
        ) from e
    except ShuttingDown as e:
        raise APIError(503, str(e), "server_error", code="shutting_down") from e
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    model_id = f"{state.name}:{req.pattern}"
    text = TextStream(state.tokenizer, body.stop or [])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(state, req, events, text, rid, model_id, chat, include_usage, body.return_token_ids),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    pieces: list[str] = []
    finish, error = None, None

    async def hang_up() -> None:  # the body is read: the next ASGI message can only be the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass
        state.engine.cancel(req)
        events.put_nowait(("gone", None))

    watcher = asyncio.create_task(hang_up())
    try:
        while finish is None and error is None:
            kind, value = await events.get()
            if kind == "gone":
                return JSONResponse({}, status_code=499)  # nobody reads it
            if kind == "token":
                pieces.append(text.push(value))
                if text.stopped:
                    state.engine.cancel(req)
                    finish = "stop"
            elif kind == "end":
                pieces.append(text.push(None))
                finish = "stop" if value == "cancelled" or text.stopped else value
            else:
                error = value
    finally:
        watcher.cancel()
        if not req.done:
            state.engine.cancel(req)
    if error is not None:
        raise APIError(503 if "shutting down" in error else 500, error, "server_error")
    out = "".join(pieces)
    n_out = len(text.tokens)
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": out}
    else:
        choice["text"] = out
    if body.return_token_ids:
        choice["token_ids"] = list(text.tokens)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out},
    }


async def _sse(
    state, req, events, text: TextStream, rid, model_id, chat, include_usage, token_ids
) -> AsyncIterator[str]:
    created = int(time.time())
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None, ids: list[int] | None = None) -> str:
        if chat:
            delta = {} if piece is None else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        if ids is not None and token_ids:
            choice["token_ids"] = ids
        body = {"id": rid, "object": kind_name, "created": created, "model": model_id, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield (
                "data: "
                + json.dumps(
                    {"id": rid, "object": kind_name, "created": created, "model": model_id, "choices": [first]}
                )
                + "\n\n"
            )
        finish = None
        while finish is None:
            kind, value = await events.get()
            if kind == "token":
                piece = text.push(value)
                if text.stopped:
                    state.engine.cancel(req)
                    finish = "stop"
                    if piece:
                        yield chunk(piece, None)
                    break
                if piece or token_ids:
                    yield chunk(piece, None, [value])
            elif kind == "end":
                piece = text.push(None)
                if piece:
                    yield chunk(piece, None)
                finish = "stop" if value == "cancelled" or text.stopped else value
            else:  # an error after the stream began: an error event, as OpenAI-compatible servers send
                err = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
        yield chunk(None, finish)
        if include_usage:
            n = len(text.tokens)
            usage = {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": rid,
                        "object": kind_name,
                        "created": created,
                        "model": model_id,
                        "choices": [],
                        "usage": usage,
                    }
                )
                + "\n\n"
            )
        yield "data: [DONE]\n\n"
    finally:
        if not req.done:  # the client went away (or the stream was cut): free its row
            state.engine.cancel(req)


def prometheus_text(s: dict[str, Any]) -> str:
    """The engine's figures in Prometheus' text format."""
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP ratplus_{name} {help_}")
        lines.append(f"# TYPE ratplus_{name} {kind}")
        lines.extend(f"ratplus_{name}{labels} {value}" for labels, value in samples)

    metric("requests_running", "gauge", "requests admitted (prefilling or decoding)", [("", s["running"])])
    metric(
        "requests_running_by_pattern",
        "gauge",
        "requests decoding, per attention pattern",
        [(f'{{pattern="{p}"}}', n) for p, n in s["running_per_pattern"].items()],
    )
    metric("requests_queued", "gauge", "requests waiting for memory or a row", [("", s["queued"])])
    metric("requests_running_peak", "gauge", "most requests admitted at once since start", [("", s["peak_running"])])
    metric(
        "kv_bytes_in_use",
        "gauge",
        "KV-cache bytes reserved by admitted requests (cache formula)",
        [("", s["kv_bytes_in_use"])],
    )
    metric("kv_bytes_budget", "gauge", "the --kv-memory budget", [("", s["kv_bytes_budget"])])
    metric(
        "kv_bytes_allocated",
        "gauge",
        "bytes of the caches allocated now (pools and prefills)",
        [("", s["kv_bytes_allocated"])],
    )
    metric("generated_tokens_total", "counter", "tokens generated", [("", s["tokens_total"])])
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [("", s["prompt_tokens_total"])])
    metric(
        "tokens_per_second",
        "gauge",
        "generated tokens per second over the last 10 s",
        [("", round(s["tokens_per_second"], 3))],
    )
    metric(
        "time_to_first_token_seconds",
        "summary",
        "time from arrival to the first token",
        [("_sum", round(s["ttft_seconds_sum"], 6)), ("_count", s["ttft_seconds_count"])],
    )
    metric(
        "requests_finished_total",
        "counter",
        "finished requests by reason",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(s["finished"].items())],
    )
    return "\n".join(lines) + "\n"


def run_server(app: FastAPI, sock, shutdown_grace: float = 10.0, log_level: str = "info") -> None:
    """Serve ``app`` on a bound socket with uvicorn until SIGTERM / SIGINT. The first signal drains
    the engine (no new requests; running ones may finish within ``shutdown_grace`` seconds, then end
    with an error event), uvicorn stops accepting connections and exits once they are closed."""
    import uvicorn

    engine = app.state.serve.engine

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.drain(shutdown_grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=int(shutdown_grace) + 5, access_log=log_level == "debug"
    )
    _Server(config).run(sockets=[sock])


__all__ = [
    "APIError",
    "ServeState",
    "TextStream",
    "create_app",
    "load_chat_template",
    "plain_chat_prompt",
    "prometheus_text",
    "run_server",
]
