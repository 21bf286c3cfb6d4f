"""Request shapes of the OpenAI API routes, as pydantic models.

Every model forbids unknown fields (``extra="forbid"``) and coerces nothing
(``strict=True``: ``"1.0"`` is not a temperature, ``true`` is not a token count), so a
request the server would misread is a 400 naming the field. Fields the OpenAI API
defines but this server does not implement (log-probabilities, penalties, tools) are
accepted only at their neutral value, and refused otherwise: a client never gets an
answer that silently ignored what it asked for.

Extensions beyond the OpenAI API, as vLLM names them: ``top_k``, ``min_p``,
``ignore_eos``, ``stop_token_ids``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "StreamOptions",
    "TextPart",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _prompt_shape(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids, or a list "
            "of token-id lists"
        ) from None


Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WrapValidator(_prompt_shape),
]

Stop = str | list[str] | None


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both routes share."""

    model: str | None = Field(
        default=None, description="the served model name (see GET /v1/models)"
    )
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(
        default=None, ge=-1, description="extension: keep the k most likely tokens (0 or -1: off)"
    )
    min_p: float | None = Field(
        default=None, ge=0.0, le=1.0, description="extension: min-p filtering"
    )
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    stop: Stop = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(
        default=False, description="extension: keep generating past end-of-sequence tokens"
    )
    stop_token_ids: list[int] | None = Field(
        default=None,
        description="extension: token ids that end a choice (kept in its tokens), besides "
        "the end-of-sequence ids",
    )
    user: str | None = Field(default=None, description="accepted and ignored (OpenAI field)")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0.0):
            raise ValueError("penalties are not supported by this server (only 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Stop) -> Stop:
        if value == "" or isinstance(value, list) and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _budgets_agree(self) -> _Sampling:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        return self

    @property
    def token_budget(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs is not supported by this server")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this server")
        return value

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported by this server (only best_of == n)")
        return self


class TextPart(_Strict):
    """A text part of a message's content (``{"type": "text", "text": ...}``)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One turn. ``developer`` is the OpenAI API's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_dict(self) -> dict[str, str]:
        """The message as the chat template expects it: role and plain-text content."""
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value not in (None, {"type": "text"}):
            raise ValueError("only the text response format is supported by this server")
        return value

    @field_validator("tools", "tool_choice")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if value not in (None, [], "none"):
            raise ValueError("tools are not supported by this server")
        return value
