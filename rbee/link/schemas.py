"""The job request every tier accepts, validated the same way at each of them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rbee.errors import RequestError

MAX_PROMPT_CHARS = 200_000
MAX_TOKENS_LIMIT = 32_768


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class JobRequest(BaseModel):
    """``POST /v1/jobs`` at queen, hive and worker: a raw ``prompt`` or chat ``messages``
    (formatted by the worker, which knows the model's chat template)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=256)
    model: str | None = Field(default=None, min_length=1, max_length=500)
    node: str | None = Field(default=None, min_length=1, max_length=100)
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=100_000)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    #: a llama.cpp GBNF grammar (rule ``root``) the output must match
    grammar: str | None = Field(default=None, min_length=1, max_length=100_000)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stop: list[str] = Field(default_factory=list, max_length=8)
    #: engine: auto (the hive decides), mlx or llama-cpp
    backend: Literal["auto", "mlx", "llama-cpp"] | None = None
    #: context length in tokens; omitted = the model's trained length, as far as memory allows
    ctx: int | None = Field(default=None, ge=256, le=1_048_576)
    #: layers llama.cpp offloads to the GPU: -1 all (the default where the build supports it), 0 none, N
    gpu_layers: int | None = Field(default=None, ge=-1, le=10_000)
    #: may a model too big for any one GPU be split over several (the hive's `gpu_split =`)
    gpu_split: bool | None = None
    #: sequences a new worker decodes together, and how many may wait (the model's `parallel =`, `queue =`)
    parallel: int | None = Field(default=None, ge=1, le=64)
    queue: int | None = Field(default=None, ge=0, le=10_000)
    #: a logical model's forms, e.g. {"gguf": "hf:…", "mlx": "hf:…"}; the hive picks one for its engine
    forms: dict[Literal["gguf", "mlx"], str] | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(not item for item in value):
            raise ValueError("stop sequences must not be empty strings")
        return value

    def downstream(self, **changes: Any) -> dict[str, Any]:
        """The body to send one tier down (routing fields the next tier doesn't need removed)."""
        body = self.model_dump(exclude_none=True, mode="json")
        body.update(changes)
        return {key: value for key, value in body.items() if value is not None}


def parse_job_request(body: dict[str, Any]) -> JobRequest:
    try:
        return JobRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise RequestError(f"invalid job request: {problems}") from exc
