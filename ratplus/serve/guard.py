"""The ASGI guard in front of every route: API key, body size, Content-Type.

* API key (``--api-key`` / ``RATPLUS_API_KEY``): every ``/v1`` path needs ``Authorization: Bearer
  <key>``, else 401 with an OpenAI-style body, before the body is read. The key is compared with
  ``hmac.compare_digest`` (constant time) and never logged. ``/``, ``/health`` and ``/metrics`` stay
  open (docs/guides/serve.md says what they show).
* Body size: a body larger than ``max_body`` bytes gets 413, from its Content-Length at once, or
  as soon as the bytes read pass the limit (chunked bodies): nothing larger is buffered.
* Content-Type: the API takes JSON only, so a POST body is read as JSON whatever its Content-Type
  says (``curl -d`` sends ``application/x-www-form-urlencoded``; a missing header is also fine).
"""

from __future__ import annotations

import hmac

from ratplus.serve.errors import APIError

#: Default request body limit: 4 MiB holds a prompt of hundreds of thousands of tokens.
DEFAULT_MAX_BODY = 4 * 2**20


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    values = [v for k, v in headers if k == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Guard:
    """ASGI middleware (module docstring)."""

    def __init__(self, app, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY):
        if api_key is not None and not api_key:
            raise ValueError("--api-key must not be empty")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ValueError(f"--max-body must be a positive number of bytes, got {max_body!r}")
        self.app, self.max_body = app, max_body
        self._key = None if api_key is None else api_key.encode()

    async def _refuse(self, send, error: APIError, headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = error.raw()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope["headers"])
        if self._key is not None and scope["path"].startswith("/v1"):
            given = _bearer(headers)
            # compare_digest on bytes of any length: no early exit that would time the key out
            if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._key):
                message = (
                    "missing or malformed Authorization header: send 'Authorization: Bearer <key>'"
                    if given is None
                    else "invalid API key"
                )
                await self._refuse(
                    send,
                    APIError(401, message, "authentication_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in headers if k == b"content-length"), None)
        try:
            declared = None if length is None else int(length)
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_body:
            await self._refuse(send, self._too_large(declared))
            return
        # read the body here (at most max_body bytes), then hand it to the app in one message
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._refuse(send, self._too_large(size))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [
            (b"content-type", b"application/json")
        ]
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client leaving (http.disconnect)

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> APIError:
        return APIError(
            413,
            f"the request body has {size:,}+ bytes; the limit is {self.max_body:,} (--max-body)",
            code="request_too_large",
        )


__all__ = ["DEFAULT_MAX_BODY", "Guard"]
