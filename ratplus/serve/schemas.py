"""Request bodies of ``ratplus serve``: pydantic models, strict (the FastAPI way).

Strict means no coercion: ``max_tokens: "4"``, ``max_tokens: true`` and ``stream: "yes"`` are
errors, not 4 and True; numbers out of range, unknown fields and fields this server does not
implement (``tools``, ``best_of`` > 1, ``suffix``, ...) are errors too; ``response_format``
(``json_object``, ``json_schema``) is constrained decoding (``ratplus.serve.constrain``). Each
error is a 400 whose message and ``param`` name the field (``errors`` formats it). Every string
must be valid Unicode (a lone surrogate such as ``"\\ud800"`` cannot be tokenized).

Field semantics (vLLM's where OpenAI has none): see the module docstring of ``ratplus.generation``
for the order of the sampling transforms, and docs/guides/serve.md for the table of fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"holds a lone surrogate ({text[e.start]!r} at character {e.start}): not valid Unicode"
        ) from None
    return text


#: A string that can be encoded as UTF-8 (JSON's "\ud800" escapes decode to lone surrogates).
Text = Annotated[str, AfterValidator(_unicode)]

#: torch.Generator.manual_seed's range
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: most top log-probabilities per token (OpenAI's chat limit; vLLM's default cap is the same)
MAX_TOP_LOGPROBS = 20

#: Fields of the OpenAI API (and vLLM's extras) this server does not implement, with what would be
#: accepted (the neutral value); anything else is a 400 naming the field.
UNSUPPORTED = {
    "tools": "tools / function calling is not supported",
    "tool_choice": "tools / function calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tools / function calling is not supported",
    "suffix": "suffix (insertion) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "guided_json": "guided decoding is not supported",
    "guided_regex": "guided decoding is not supported",
    "guided_choice": "guided decoding is not supported",
    "guided_grammar": "guided decoding is not supported",
    "structured_outputs": "structured outputs are not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "beam search is not supported",
}

_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, usage comes in the last chunk only


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class _Sampling(_Strict):
    model: Text
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1 / 0 / None: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[Text, float] | None = None
    n: int = Field(default=1, ge=1, le=16)  # samples per prompt (choice index: prompt x n + sample)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted and not used: they change nothing in the output (an end-user id for abuse
    # monitoring, OpenAI's stored-completions flag and tags (nothing is stored here), a tier)
    user: Text | None = None
    store: bool | None = None
    metadata: dict[Text, Text] | None = None
    service_tier: Text | None = None
    response_format: ResponseFormat | None = None  # text, json_object, json_schema (ratplus.serve.constrain)
    pattern: Text | None = None  # extra: the attention pattern, when ``model`` names the model only
    return_token_ids: bool = False  # extra: each choice also carries the generated token ids
    # not implemented: any value but the neutral one is refused by _refuse
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None

    @field_validator(*[k for k in UNSUPPORTED if k != "suffix"])
    @classmethod
    def _refuse(cls, v: Any, info) -> Any:
        if any(v == ok and type(v) is type(ok) for ok in _NEUTRAL.get(info.field_name, (None,))):
            return v
        raise ValueError(UNSUPPORTED[info.field_name])

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (strings of digits), got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {value}")
        if v is not None and len(v) > 300:
            raise ValueError(f"at most 300 tokens, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _limits(self):
        both = "max_tokens" in self.model_fields_set and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: differs from max_tokens; give one of them")
        return self

    def new_tokens(self) -> int | None:
        """The cap on generated tokens (max_completion_tokens wins; None: the rest of the context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}


#: One prompt: text, or token ids; a batch: several of either (one choice each, with its index).
Prompt = Text | list[Annotated[int, Field(ge=0)]] | list[Text] | list[list[Annotated[int, Field(ge=0)]]]


class CompletionBody(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1)
    suffix: Text | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("best_of > 1 is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError(UNSUPPORTED["suffix"])
        return v

    @model_validator(mode="after")
    def _zero(self):
        if self.new_tokens() == 0 and not self.echo:
            raise ValueError("max_tokens: must be >= 1 (0 only with echo, to score the prompt)")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    # name (and other per-message fields) are accepted; their values do not reach the prompt
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        """The message's text; ValueError for a non-text part (an image, audio)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"only text content parts are supported, got type {p.type!r}")
            parts.append(p.text)
        return "".join(parts)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be >= 1")
        return self


__all__ = [
    "MAX_TOP_LOGPROBS",
    "UNSUPPORTED",
    "ChatBody",
    "ChatMessage",
    "CompletionBody",
    "ContentPart",
    "StreamOptions",
    "Text",
]
