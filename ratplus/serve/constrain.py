"""``response_format``: JSON output by constrained decoding, through llguidance.

Why llguidance (docs/DESIGN.md): one small abi3 wheel with no Python dependencies that installs in
seconds on CPU, builds its token tables straight from a ``tokenizer.json`` string (the server's
``tokenizers.Tokenizer``, no transformers object needed), compiles a JSON schema into a grammar
lazily (no up-front automaton over the whole vocabulary), and is what vLLM and SGLang use for the
same field. xgrammar and outlines-core would do; llguidance needed the least glue.

Per request a ``Constraint`` holds an ``LLMatcher``: before each sampled token the engine asks it
for the allowed tokens (a bitmask, one bit per token id) and sets every other logit to -inf, then
hands it the token that was chosen. When the JSON value is complete the matcher allows only EOS,
so the request ends with ``finish_reason: "stop"``; ``max_tokens`` can still cut it short
(``"length"``, and the text is then not valid JSON, as with OpenAI).

``json_object``: any JSON object (the schema ``{"type": "object"}``). ``json_schema``: the
``json_schema.schema`` of the request (its ``x-guidance`` options apply). The JSON is laid out
as ``json.dumps`` lays it out: ", " and ": ", no other whitespace.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from ratplus.serve.errors import APIError


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


#: The JSON's layout: json.dumps' separators and no other whitespace (llguidance allows any amount
#: between tokens by default, which a weak model fills with newlines until max_tokens)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Constraint:
    """One request's grammar state (module docstring); used by the engine thread only."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) with every token the grammar does not allow now at -inf (a new tensor)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        if allowed.shape[0] < self.vocab_size:  # ids past the tokenizer's table are never allowed
            allowed = np.concatenate([allowed, np.zeros(self.vocab_size - allowed.shape[0], dtype=bool)])
        if not allowed.any():  # the matcher is in an error state: end the request (EOS decides)
            return logits
        keep = torch.from_numpy(allowed).to(logits.device)
        return logits.float().masked_fill(~keep, float("-inf"))

    def consume(self, token: int) -> None:
        self.matcher.consume_token(int(token))


class Grammars:
    """Builds per-request constraints from ``response_format`` (the tokenizer table once, lazily)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None):
        self.tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, eos_token_id
        self._lltok = None
        self._lock = threading.Lock()

    def _table(self):
        import llguidance

        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(
                    self.tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.eos
                )
        return self._lltok

    def constraint(self, response_format: Any) -> Constraint | None:
        """None for ``text``; a Constraint for ``json_object`` / ``json_schema``; APIError 400 when
        llguidance is missing, the model has no EOS (the end of the value could not end the text),
        or the schema is not one it can compile."""
        kind = None if response_format is None else response_format.type
        if kind in (None, "text"):
            return None
        if not available():
            raise APIError(
                400,
                f"response_format: {kind} needs llguidance (pip install 'ratplus[serve]')",
                param="response_format",
            )
        if self.eos is None:
            raise APIError(400, "response_format: the model has no EOS token to end the JSON", param="response_format")
        import llguidance

        if kind == "json_object":
            schema: Any = {"type": "object"}
        else:
            spec = (response_format.model_extra or {}).get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(
                    400,
                    "response_format: json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                    param="response_format",
                )
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from e
        matcher = llguidance.LLMatcher(self._table(), grammar, log_level=0)
        if matcher.is_error():
            raise APIError(
                400, f"response_format: the schema cannot be used: {matcher.get_error()}", param="response_format"
            )
        return Constraint(matcher, self.vocab_size)


__all__ = ["Constraint", "Grammars", "available"]
