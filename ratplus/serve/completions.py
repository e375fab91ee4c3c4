"""The two generating routes' shared body: submit one engine request per prompt, collect events,
answer as one JSON object or as server-sent events (OpenAI's chunk format).

Several prompts in one completions request (OpenAI's batched prompts, lm-eval's ``batch_size``)
become one engine request each, batched with everything else that runs; the response has one
choice per prompt with its ``index``. Events are handled in a worker thread, a batch at a time
(detokenizing is the tokenizer's work and stays off the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ratplus.serve.engine import QueueFull, ShuttingDown
from ratplus.serve.errors import APIError
from ratplus.serve.responses import Choice

if TYPE_CHECKING:
    from ratplus.serve.app import ServeState
    from ratplus.serve.schemas import _Sampling

_GONE = -1  # the "client left" marker in the event queue


def _take(
    choices: list[Choice], batch: list[tuple[int, tuple[str, Any]]], engine
) -> list[tuple[Choice, str, int, int]]:
    """Apply a batch of events (worker thread): (choice, text piece, its tokens before and after)."""
    out = []
    for i, (kind, value) in batch:
        c = choices[i]
        before = len(c.stream.tokens)
        piece = c.on_event(kind, value)
        if c.stream.stopped and not c.req.done:
            engine.cancel(c.req)  # a stop string: no more tokens needed
        out.append((c, piece, before, len(c.stream.tokens)))
    return out


async def _next_batch(events: asyncio.Queue) -> list[tuple[int, tuple[str, Any]]]:
    batch = [await events.get()]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


async def generate(
    state: ServeState,
    body: _Sampling,
    prompts: list[list[int]],
    request: Request,
    chat: bool,
    echo_texts: list[str | None] | None = None,
):
    """Run the prompts and answer (module docstring)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink_for(i: int):
        def sink(event) -> None:  # engine thread -> this request's queue
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, (i, event))

        return sink

    # a worker thread: compiling a response_format schema can take a while
    # n samples per prompt: choice index = prompt index x n + sample (OpenAI's order)
    n = body.n

    def build() -> list:
        return [state.build(body, ids, sink_for(i * n + j), chat, j) for i, ids in enumerate(prompts) for j in range(n)]

    reqs = await run_in_threadpool(build)
    submitted = []
    try:
        for r in reqs:
            state.engine.submit(r)
            submitted.append(r)
    except (QueueFull, ShuttingDown) as e:
        for r in submitted:
            state.engine.cancel(r)
        if isinstance(e, QueueFull):
            raise APIError(
                429, f"the server is at capacity: {e}; retry later", "rate_limit_error", code="queue_full"
            ) from e
        raise APIError(503, str(e), "server_error", code="shutting_down") from e
    echo_texts = echo_texts or [None] * len(prompts)
    choices = [Choice(k, r, state.tokenizer, body.stop or [], chat, echo_texts[k // n]) for k, r in enumerate(reqs)]
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    model_id = f"{state.name}:{reqs[0].pattern}"
    if body.stream:
        return StreamingResponse(
            _sse(state, body, choices, events, rid, model_id, chat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def hang_up() -> None:  # the body is read: the next ASGI message can only be the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for r in reqs:
            state.engine.cancel(r)
        events.put_nowait((_GONE, None))

    watcher = asyncio.create_task(hang_up())
    try:
        while not all(c.done for c in choices):
            batch = await _next_batch(events)
            if any(i == _GONE for i, _ in batch):
                return JSONResponse({}, status_code=499)  # nobody reads it
            await run_in_threadpool(_take, choices, batch, state.engine)
    finally:
        watcher.cancel()
        for r in reqs:
            if not r.done:
                state.engine.cancel(r)
    for c in choices:
        if c.error is not None:
            raise APIError(503 if "shutting down" in c.error else 500, c.error, "server_error")
    out = await run_in_threadpool(_whole, body, choices, chat)
    n_prompt = sum(len(p) for p in prompts)
    n_out = sum(len(c.stream.tokens) for c in choices)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": out,
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
    }


def _whole(body, choices: list[Choice], chat: bool) -> list[dict[str, Any]]:
    out = []
    for c in choices:
        choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            if body.logprobs:
                choice["logprobs"] = c.chat_logprobs()
        else:
            echo = bool(getattr(body, "echo", False))
            choice["text"] = (c.echo_text if echo else "") + c.text
            if body.logprobs is not None:
                choice["logprobs"] = c.completion_logprobs(with_prompt=echo)
        if body.return_token_ids:
            choice["token_ids"] = list(c.stream.tokens)
        out.append(choice)
    return out


def _chunks(body, batch: list[tuple[Choice, str, int, int]], chat: bool) -> list[dict[str, Any]]:
    """The chunk choices a batch of events releases (worker thread)."""
    out = []
    echo = bool(getattr(body, "echo", False))
    for c, piece, before, after in batch:
        choice: dict[str, Any] = {"index": c.index, "finish_reason": None, "logprobs": None}
        with_prompt = echo and not c.echo_sent
        if with_prompt:
            piece = (c.echo_text or "") + piece
            c.echo_sent = True
        new_ids = c.stream.tokens[before:after]
        if chat:
            choice["delta"] = {"content": piece} if piece else {}
            if body.logprobs and after > before:
                choice["logprobs"] = c.chat_logprobs(before, after)
        else:
            choice["text"] = piece
            if body.logprobs is not None and (after > before or with_prompt):
                choice["logprobs"] = c.completion_logprobs(before, after, with_prompt=with_prompt)
        if body.return_token_ids and new_ids:
            choice["token_ids"] = new_ids
        if piece or choice["logprobs"] is not None or "token_ids" in choice:
            out.append(choice)
    return out


async def _sse(
    state: ServeState, body, choices: list[Choice], events: asyncio.Queue, rid: str, model_id: str, chat: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def data(choice_list: list[dict[str, Any]], **extra) -> str:
        obj = {"id": rid, "object": kind_name, "created": created, "model": model_id, "choices": choice_list, **extra}
        return f"data: {json.dumps(obj)}\n\n"

    try:
        if chat:
            yield data([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        for c in choices])  # fmt: skip
        while not all(c.done for c in choices):
            batch = await _next_batch(events)
            taken = await run_in_threadpool(_take, choices, batch, state.engine)
            failed = next((t[0] for t in taken if t[0].error is not None), None)
            if failed is not None:  # an error after the stream began: an error event, as OpenAI-compatible servers send
                err = {"error": {"message": failed.error, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            for choice in await run_in_threadpool(_chunks, body, taken, chat):
                yield data([choice])
            for c, *_ in taken:
                if c.finish is not None and not c.finish_sent:
                    c.finish_sent = True
                    last = {"index": c.index, "finish_reason": c.finish, "logprobs": None}
                    last.update({"delta": {}} if chat else {"text": ""})
                    yield data([last])
        if body.stream_options and body.stream_options.include_usage:
            n_prompt = sum(len(c.req.prompt) for c in choices[:: body.n])  # each prompt once, as for n = 1
            n = sum(len(c.stream.tokens) for c in choices)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
            yield data([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        for c in choices:
            if not c.req.done:  # the client went away (or the stream was cut): free its row
                state.engine.cancel(c.req)


__all__ = ["generate"]
