"""From engine events to OpenAI response objects: text with stop strings, log-probabilities, echo.

``TextStream``: generated tokens -> text pieces (``ratplus.generation.IncrementalDetokenizer``, the
one ``ratplus generate`` uses), with stop strings: text that could be the start of a stop string
is held back until it is not; a stop string ends the text before it. Stop strings are looked for
once ``min_tokens`` tokens were generated (as vLLM does).

``Choice``: one prompt's request and what the client gets for it: text pieces, token ids, the
log-probabilities in the completions format (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``) or the chat one (``content``: token, logprob, bytes, top_logprobs), and the
prompt's own text and log-probabilities when ``echo`` asked for them. Its methods run in a worker
thread (the tokenizer's work stays off the event loop); the route hands them a batch of events.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from ratplus.generation import IncrementalDetokenizer


class TextStream:
    """Generated tokens -> text pieces, with stop strings (module docstring)."""

    def __init__(self, tokenizer, stops: list[str], min_tokens: int = 0):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops, self.min_tokens = list(stops), min_tokens
        self.text = ""  # what has been handed out
        self._held = ""  # decoded, held back: it may begin a stop string
        self.stopped = False

    @property
    def tokens(self) -> list[int]:
        return self.detok.tokens

    def push(self, token: int | None) -> str:
        """Add a token (None: the end) and return the text that can be handed out now."""
        if self.stopped:
            return ""
        new = self.detok.push(token) if token is not None else self.detok.flush()
        hay = self._held + new
        self._held = ""
        if self.stops and len(self.detok.tokens) >= self.min_tokens:
            hits = [i for i in (hay.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                piece = hay[: min(hits)]
                self.text += piece
                return piece
            if token is not None:  # hold back a tail that may begin a stop string
                hold = max((k for s in self.stops for k in range(1, len(s)) if hay.endswith(s[:k])), default=0)
                self._held, hay = hay[len(hay) - hold :], hay[: len(hay) - hold]
        self.text += hay
        return hay


def token_text(tokenizer, token: int) -> str:
    """A token's own text (special tokens by name; a piece of a multi-byte character as U+FFFD)."""
    return tokenizer.decode([token], skip_special_tokens=False)


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others (controls, space, ...) for 256 + their rank among them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for rank, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + rank)
    return {c: b for b, c in chars.items()}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token: int) -> list[int]:
    """A token's raw bytes (chat logprobs' ``bytes``): exact for byte-level vocabularies (GPT-2,
    Llama 3, SmolLM2) and byte-fallback pieces (``<0xE2>``), so a client can join the bytes of a
    character split across tokens; else the UTF-8 of its text."""
    piece = tokenizer.id_to_token(token) if hasattr(tokenizer, "id_to_token") else None
    if piece is not None:
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
        decoder = getattr(tokenizer, "decoder", None)
        if type(decoder).__name__ == "ByteLevel":
            table = _byte_level_table()
            if all(c in table for c in piece):
                return [table[c] for c in piece]
    return list(token_text(tokenizer, token).encode("utf-8"))


class Choice:
    """One prompt of a request: its engine request, its text and log-probabilities (module docstring)."""

    def __init__(self, index: int, request, tokenizer, stops: list[str], chat: bool, echo_text: str | None = None):
        self.index, self.req, self.tokenizer, self.chat = index, request, tokenizer, chat
        self.stream = TextStream(tokenizer, stops, request.sampling.min_tokens if request.sampling else 0)
        self.echo_text = echo_text  # the prompt's text, when echo
        self.echo_sent = False
        self.finish: str | None = None
        self.finish_sent = False  # streaming: the chunk with finish_reason went out
        self.error: str | None = None
        self.pieces: list[str] = []
        self.lp_sent = 0  # generated tokens whose log-probabilities went out (streaming)
        self.offset = 0  # text_offset of the next token

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None

    def on_event(self, kind: str, value: Any) -> str:
        """Take one engine event; the text piece it releases."""
        if self.done:
            return ""
        if kind == "token":
            piece = self.stream.push(value)
            if self.stream.stopped:
                self.finish = "stop"
        elif kind == "end":
            piece = self.stream.push(None)
            self.finish = "stop" if value == "cancelled" or self.stream.stopped else value
        else:
            self.error, piece = value, ""
        self.pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    # ---- log-probabilities ----------------------------------------------------------------------
    def _rows(self, start: int, stop: int | None = None) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, logprob, top) of the generated tokens [start, stop) the client got."""
        n = len(self.stream.tokens) if stop is None else stop
        rows = self.req.token_logprobs
        return [(self.stream.tokens[i], *rows[i]) for i in range(start, min(n, len(rows)))]

    def _prompt_rows(self) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        prompt = self.req.prompt
        rows = self.req.prompt_logprob_rows
        return [(prompt[0], None, None)] + [(t, *rows[i]) for i, t in enumerate(prompt[1:]) if i < len(rows)]

    def completion_logprobs(self, start: int = 0, stop: int | None = None, with_prompt: bool = False) -> dict:
        """The completions format for generated tokens [start, stop), after the prompt's when asked."""
        rows = (self._prompt_rows() if with_prompt else []) + self._rows(start, stop)
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in rows:
            text = token_text(self.tokenizer, token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            if top is None:
                out["top_logprobs"].append(None)
            else:  # the chosen token too, as vLLM does (it may be outside the top N)
                best = {text: lp}
                best.update({token_text(self.tokenizer, t): v for t, v in top})
                out["top_logprobs"].append(best)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def chat_logprobs(self, start: int = 0, stop: int | None = None) -> dict:
        """The chat format for generated tokens [start, stop)."""

        def entry(token: int, lp: float) -> dict:
            text = token_text(self.tokenizer, token)
            return {"token": text, "logprob": lp, "bytes": token_bytes(self.tokenizer, token)}

        content = [
            {**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in top]}
            for token, lp, top in self._rows(start, stop)
        ]
        return {"content": content}


__all__ = ["Choice", "TextStream", "token_bytes", "token_text"]
