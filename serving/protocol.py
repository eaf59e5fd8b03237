"""The wire formats of `adaptloop serve`: OpenAI's chat completions and models, vLLM's LoRA endpoints, feedback.

Field names are OpenAI's exactly, so every OpenAI client works unchanged.
Fields adaptloop does not support are refused by name (422), never ignored
silently; the few that clients send by habit with their neutral value
(penalties of 0, `logprobs: false`) are accepted.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.common import MAX_TEXT_CHARS, UserId

ShortString = Annotated[str, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- chat completions ------------------------------------------------------------------ #


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=4 * MAX_TEXT_CHARS)
    name: ShortString | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: ShortString
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: UserId | None = Field(None, description="the end user: answered with this user's active adapter")
    frequency_penalty: Literal[0, 0.0] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    logprobs: Literal[False] | None = None
    ignore_eos: bool = Field(False, description="vLLM's extra sampling field: generate max_tokens whatever the model says")

    @model_validator(mode="after")
    def _stops_are_bounded(self) -> ChatCompletionRequest:
        stops = self.stop_list()
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop: at most 4 sequences of 1-64 characters")
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's")
        return self

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self) -> bytes:
        """One server-sent event, as OpenAI streams them."""
        return b"data: " + self.model_dump_json(exclude_none=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# ---- models -------------------------------------------------------------------------- #


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaptloop"
    root: str | None = None  # an adapter's base model (vLLM's field)
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- feedback ------------------------------------------------------------------------ #


class FeedbackRequest(_Strict):
    completion_id: ShortString
    rating: float | None = Field(None, ge=-1.0, le=1.0, description="-1 (bad) .. 1 (good)")
    correction: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS, description="the answer that was right")
    comment: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        if (self.rating is None) == (self.correction is None):
            raise ValueError("give exactly one of `rating` and `correction`")
        return self


class FeedbackAccepted(BaseModel):
    event_id: str
    topic: str
    kind: Literal["rating", "correction"]


# ---- vLLM's runtime LoRA endpoints ----------------------------------------------------- #


class LoadLoraRequest(_Strict):
    lora_name: ShortString
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False  # vLLM's flag; adaptloop never reloads a name in place


class UnloadLoraRequest(_Strict):
    lora_name: ShortString
    lora_int_id: int | None = None


def error_body(message: str, kind: str = "invalid_request_error", detail: Any = None) -> dict[str, Any]:
    """adaptloop's JSON error (`error`, `detail`), which OpenAI clients also read: `error` is a string."""
    return {"error": message, "detail": detail, "type": kind}
