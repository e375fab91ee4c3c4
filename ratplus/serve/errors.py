"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def _printable(text: Any) -> Any:
    """Text safe to encode as UTF-8 (lone surrogates from the request escaped), else as it is."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


class APIError(Exception):
    """An error the client sees as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        message, param = _printable(message), _printable(param)  # a lone surrogate could not be encoded
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def raw(self) -> bytes:
        """The body as bytes (the ASGI guard answers without FastAPI)."""
        return json.dumps(self.body()).encode()


#: Body-level checks raise ValueError("<field>: ..."); the field they name becomes ``param``.
_BODY_FIELDS = ("max_tokens", "max_completion_tokens", "top_logprobs", "logprobs", "echo")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field(part: Any) -> bool:
    """A field name or list index in an error's location, not a union member's tag
    (``function-after[...]``, ``list[int]``, a model's class name)."""
    if isinstance(part, int):
        return True
    return part.isidentifier() and not part[0].isupper() and part not in _TYPE_TAGS


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (``param``: its dotted path)."""
    errors = exc.errors()
    # a union (prompt, content) reports one error per member: our own checks (value_error: a lone
    # surrogate, a range) say more than "should be a valid list"
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    kind = first.get("type")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and _is_field(x)]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = "unknown field: this server does not implement it (docs/guides/serve.md lists the fields)"
    elif param is None and kind == "model_attributes_type":
        msg = "the body must be a JSON object"
    elif param is None and kind == "missing":
        msg = "the body is empty: send a JSON object"
    elif param is None:
        named = msg.split(":", 1)[0]
        if named in _BODY_FIELDS:
            param, msg = named, msg.split(":", 1)[1].strip()
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


__all__ = ["APIError", "validation_error"]
