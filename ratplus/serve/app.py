"""The HTTP side of ``ratplus serve``: FastAPI routes, the shared state, Prometheus text.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events in OpenAI's chunk format), ``GET /v1/models``, ``GET /v1/patterns``, ``GET
/health``, ``GET /metrics`` (Prometheus text), ``GET /`` (the playground page).

Around the routes: ``guard`` (ASGI: the API key on ``/v1``, the body size limit, JSON bodies
without a Content-Type), ``schemas`` (strict pydantic request bodies), ``completions`` (the two
generating routes: one engine request per prompt, JSON or server-sent events), ``responses``
(text with stop strings, log-probabilities, echo), ``errors`` (OpenAI-style error bodies).

Models: one loaded weight copy served under one id per loaded pattern, ``<name>:<pattern>``
(``demo:D16-W256-P4``); ``<name>`` alone means the first loaded pattern, and the body field
``pattern`` (an extra, e.g. ``extra_body={"pattern": "dense"}`` in the ``openai`` client) picks
another.

Errors are OpenAI-style JSON bodies ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed JSON, bad or unsupported fields and prompts that do not fit the context or the KV budget,
401 without the API key (when one is set), 404 for an unknown model or pattern, 413 for a body over
the size limit, 429 when the waiting queue is full, 503 while shutting down, 500 (with no
traceback) for anything else; the server keeps serving after each.

Chat prompts: the folder's ``tokenizer_config.json`` ``chat_template`` (a Jinja template, as in
Hugging Face folders) when it has one, else the plain format::

    System: <system message>\\n\\nUser: <message>\\n\\nAssistant: <message>\\n\\nUser: ...\\n\\nAssistant:
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ratplus.generation import SamplingParams
from ratplus.io.tokenizer import chat_prompt
from ratplus.io.tokenizer import load_chat_template as load_chat_template  # re-exported: the CLI imports it here
from ratplus.io.tokenizer import plain_chat_prompt as plain_chat_prompt  # re-exported: tests import it here
from ratplus.serve import completions
from ratplus.serve.constrain import Grammars
from ratplus.serve.engine import Engine
from ratplus.serve.engine import Request as EngineRequest
from ratplus.serve.errors import APIError, validation_error
from ratplus.serve.guard import DEFAULT_MAX_BODY, Guard
from ratplus.serve.page import PAGE
from ratplus.serve.responses import TextStream as TextStream  # re-exported: tests import it here
from ratplus.serve.schemas import ChatBody, ChatMessage, CompletionBody, _Sampling

logger = logging.getLogger("ratplus")


# ---- the app ---------------------------------------------------------------------------------------
class ServeState:
    """What the routes share: engine, tokenizer, names, limits."""

    def __init__(self, engine: Engine, tokenizer, name: str, chat_template: str | None = None):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.config = engine.model.config
        self.patterns = list(engine.pools)
        self.chat_template = chat_template
        self.created = int(time.time())
        # A token covers at most as many bytes of text as its vocabulary string has in UTF-8 (byte
        # level: one character, 1-2 bytes, per byte; "<0x0A>", "##ing", "▁the" are longer than what
        # they cover), so text longer than this (x2: normalizers may shrink text, e.g. strip
        # accents) cannot fit the context: refused without tokenizing megabytes.
        vocab = tokenizer.get_vocab(with_added_tokens=True) if hasattr(tokenizer, "get_vocab") else {}
        longest = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=64)
        self.max_prompt_bytes = 2 * self.config.max_seq_len * longest
        self.grammars = Grammars(tokenizer, self.config.vocab_size, self.config.eos_token_id)

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

    def _ids(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside [0, {self.config.vocab_size})", param="prompt")
        return ids

    def encode(self, prompt: str | list[int]) -> list[int]:
        """One prompt (text or token ids) -> token ids (a worker thread: the tokenizer's work)."""
        if isinstance(prompt, str):
            size = len(prompt.encode("utf-8"))
            if size > self.max_prompt_bytes:
                raise APIError(
                    400,
                    f"prompt: {size:,} bytes of text cannot fit the model's context of {self.config.max_seq_len} "
                    f"tokens (at most {self.max_prompt_bytes:,} bytes)",
                    param="prompt",
                    code="context_length_exceeded",
                )
            # encode_batch releases the GIL while it works (encode holds it: the event loop would stall)
            batch = getattr(self.tokenizer, "encode_batch_fast", None) or getattr(self.tokenizer, "encode_batch", None)
            ids = batch([prompt])[0].ids if batch is not None else self.tokenizer.encode(prompt).ids
        else:
            ids = self._ids(list(prompt))
        if not ids:
            raise APIError(400, "prompt: the prompt is empty (no tokens)", param="prompt")
        return ids

    def encode_prompts(self, prompt: Any, echo: bool = False, n: int = 1) -> tuple[list[list[int]], list[str | None]]:
        """A completions ``prompt`` (text, token ids, or a batch of either) -> token ids per prompt,
        and each prompt's text when ``echo`` (worker thread)."""
        batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if len(batch) * n > self.engine.max_queue:
            raise APIError(
                400,
                f"prompt: {len(batch)} prompts x n={n} in one request; at most --max-queue ({self.engine.max_queue})",
                param="prompt",
            )
        ids = [self.encode(p) for p in batch]
        texts = [(p if isinstance(p, str) else self.tokenizer.decode(i)) if echo else None for p, i in zip(batch, ids)]
        return ids, texts

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The chat prompt's token ids (worker thread: a Jinja template and the tokenizer)."""
        try:
            pairs = [(m.role, m.text()) for m in messages]
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from e
        eos = None if self.config.eos_token_id is None else self.tokenizer.id_to_token(self.config.eos_token_id)
        try:
            text = chat_prompt(self.chat_template, pairs, eos)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from e
        return self.encode(text)

    def sampling(self, body: _Sampling, max_tokens: int) -> SamplingParams:
        vocab = self.config.vocab_size
        bias = body.logit_bias_ids()
        bad = [t for t in [*bias, *(body.stop_token_ids or [])] if t >= vocab]
        if bad:
            param = "logit_bias" if bad[0] in bias else "stop_token_ids"
            raise APIError(400, f"{param}: token id {bad[0]} is outside [0, {vocab})", param=param)
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
        return SamplingParams(
            temperature=body.temperature,
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=None if body.top_p >= 1 else body.top_p,
            min_p=body.min_p or None,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=bias,
            min_tokens=body.min_tokens,
        ).check(vocab)

    def build(self, body: _Sampling, ids: list[int], sink, chat: bool = False, sample: int = 0) -> EngineRequest:
        """One engine request: ``ids`` under ``body``'s settings; ``sample`` numbers the n samples of
        one prompt (its seed is ``seed + sample``, so the n samples differ and each is reproducible)."""
        pattern = self.resolve_pattern(body.model, body.pattern)
        limit = self.config.max_seq_len
        max_tokens = body.new_tokens()
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
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
                f"prompt ({len(ids)} tokens) + {param} ({max_tokens}) = {len(ids) + max_tokens} "
                f"exceeds the model's context of {limit} tokens",
                param=param,
                code="context_length_exceeded",
            )
        need = self.engine.request_bytes(pattern, max(1, len(ids) + max_tokens))
        if need > self.engine.budget.budget:
            raise APIError(
                400,
                f"this request needs {need:,} bytes of KV cache under {pattern}, more than the "
                f"server's --kv-memory of {self.engine.budget.budget:,} bytes; lower {param} or "
                "the prompt",
                param=param,
                code="kv_memory_exceeded",
            )
        eos = self.config.eos_token_id
        stop_ids = (() if eos is None or body.ignore_eos else (eos,)) + tuple(body.stop_token_ids or ())
        if chat:
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_logprobs = None
        else:
            logprobs = body.logprobs
            prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        return EngineRequest(
            prompt=ids,
            max_tokens=max_tokens,
            pattern=pattern,
            sink=sink,
            temperature=body.temperature,
            top_p=None if body.top_p >= 1 else body.top_p,
            seed=None if body.seed is None else (body.seed + sample) % 2**64,
            stop_ids=tuple(dict.fromkeys(stop_ids)),
            kv_bytes=need,
            sampling=self.sampling(body, max_tokens),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=self.grammars.constraint(body.response_format),
        )


def create_app(
    state: ServeState, shutdown_grace: float = 10.0, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY
) -> FastAPI:
    """The FastAPI app; the engine starts with the app and drains when it shuts down. ``api_key``:
    the ``/v1`` routes need ``Authorization: Bearer <api_key>``; ``max_body``: the largest request
    body in bytes (413 above it)."""

    async def lifespan(app: FastAPI):
        if state.engine.state == "new":
            state.engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.engine.stop, shutdown_grace + 5)

    # strict_content_type=False: a JSON body without a Content-Type header is read as JSON
    app = FastAPI(title="ratplus serve", lifespan=lifespan, docs_url=None, redoc_url=None, strict_content_type=False)
    app.state.serve = state
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

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
    async def patterns(
        prompt_tokens: int = Query(0, ge=0, le=state.config.max_seq_len),
        max_tokens: int = Query(0, ge=0, le=state.config.max_seq_len),
    ):
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
    async def completions_route(body: CompletionBody, request: Request):
        prompts, texts = await run_in_threadpool(state.encode_prompts, body.prompt, body.echo, body.n)
        return await completions.generate(state, body, prompts, request, chat=False, echo_texts=texts)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        ids = await run_in_threadpool(state.chat_ids, body.messages)
        return await completions.generate(state, body, [ids], request, chat=True)

    return app


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
        "bytes of the KV caches allocated now (never above the budget)",
        [("", s["kv_bytes_allocated"])],
    )
    metric(
        "kv_bytes_allocated_peak",
        "gauge",
        "most KV-cache bytes allocated at once since start, pool reshapes included",
        [("", s["kv_bytes_allocated_peak"])],
    )
    pc = s["prefix_cache"]
    metric("prefix_cache_bytes", "gauge", "bytes of the prefix snapshots", [("", pc["bytes"])])
    metric("prefix_cache_budget", "gauge", "the --prefix-cache-memory budget", [("", pc["budget"])])
    metric("prefix_cache_entries", "gauge", "prefix snapshots held", [("", pc["entries"])])
    metric("prefix_cache_lookups_total", "counter", "prompts looked up in the prefix cache", [("", pc["lookups"])])
    metric("prefix_cache_hits_total", "counter", "prompts that restored a snapshot", [("", pc["hits"])])
    metric(
        "prefix_cache_tokens_reused_total",
        "counter",
        "prompt tokens restored from snapshots instead of prefilled",
        [("", pc["tokens_reused"])],
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
    """Serve ``app`` on a bound socket with uvicorn until SIGTERM / SIGINT. The first signal drains:
    the engine takes no new requests (they get 503 with an OpenAI-style body, and ``/health`` 503,
    on new and kept-alive connections alike, since the server still listens and answers), running
    ones may finish within ``shutdown_grace`` seconds, then end with an error event. Once the engine
    is idle uvicorn stops listening, closes idle connections, lets open responses end, and the
    process exits by the signal. A second signal stops at once."""
    import threading

    import uvicorn

    engine = app.state.serve.engine

    class _Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining:  # a second signal: end the running requests and exit now
                engine.drain(0.0)
                super().handle_exit(sig, frame)
                return
            self.draining = True
            self._captured_signals.append(sig)  # uvicorn re-raises it after its shutdown
            engine.drain(shutdown_grace)
            threading.Thread(target=self._exit_when_idle, name="ratplus-drain", daemon=True).start()

        def _exit_when_idle(self) -> None:
            deadline = time.monotonic() + shutdown_grace + 5
            while engine.state != "stopped" and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True

    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=int(shutdown_grace) + 5, access_log=log_level == "debug"
    )
    _Server(config).run(sockets=[sock])


__all__ = [
    "APIError",
    "ChatBody",
    "CompletionBody",
    "ServeState",
    "TextStream",
    "create_app",
    "load_chat_template",
    "plain_chat_prompt",
    "prometheus_text",
    "run_server",
]
