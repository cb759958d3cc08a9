"""What a client may ask of the queen, validated once: OpenAI's request bodies, which the Ollama
routes build too (``rbee.queen.api.ollama`` maps its options onto these fields), and the job
request each becomes. Parameters rbee cannot honour are refused with a 400 naming them, never
ignored silently."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rbee.errors import RequestError
from rbee.link.schemas import MAX_TOKENS_LIMIT
from rbee.queen.api.errors import ApiError
from rbee.queen.tools import ToolPlan, plan

#: content parts rbee cannot read yet, and what they would need
UNREADABLE_PARTS = {"image_url": "a vision model (a GGUF with its multimodal projector)",
                    "input_audio": "an audio model", "file": "a model that reads files"}


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise ApiError(400, f"messages[{index}].content: missing; only an assistant turn with tool_calls "
                           "may leave it out", param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        texts = []
        for number, part in enumerate(self.content):
            kind = part.get("type")
            where = f"messages[{index}].content[{number}]"
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in UNREADABLE_PARTS:
                raise ApiError(400, f"{where}: rbee serves text models only so far; a {kind} part needs "
                               f"{UNREADABLE_PARTS[kind]}. Send text parts", param=where,
                               code="unsupported_content")
            else:
                raise ApiError(400, f"{where}: a content part is {{\"type\": \"text\", \"text\": …}}; got "
                               f"type {kind!r}", param=where)
        return "".join(texts)

    def job_message(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text(index)}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints share. Unknown fields are ignored (clients send many);
    known fields rbee cannot honour are refused in ``refuse_unsupported``."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=500)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    n: int | None = Field(default=1, ge=1, le=8)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # llama.cpp's samplers, as llama-server and Ollama accept them beside OpenAI's fields
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    #: Ollama's: how long the model stays loaded once idle (seconds or "5m"; 0 unload after, -1 keep)
    keep_alive: float | str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 8 or any(not item for item in items):
            raise ValueError("stop takes up to 8 non-empty strings")
        return value

    def refuse_unsupported(self) -> None:
        if (self.n or 1) > 1 and self.tools:
            raise ApiError(400, "n > 1 with tools: ask for one choice per request", param="n")

    def job_logprobs(self) -> int | None:
        """Alternatives per token the job reports, or None for no logprobs (chat: ``logprobs``
        true with ``top_logprobs``; the completions API: ``logprobs`` is the count)."""
        if self.top_logprobs is not None and self.logprobs is not True:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs is True:
            return self.top_logprobs or 0
        if self.logprobs is False or self.logprobs is None:
            return None
        if not 0 <= self.logprobs <= 20:
            raise ApiError(400, "logprobs: 0 to 20 alternatives per token", param="logprobs")
        return int(self.logprobs)

    def job_logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            biases = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        except ValueError as exc:
            raise ApiError(400, "logit_bias: keys are token ids (\"1234\"), values -100 to 100",
                           param="logit_bias") from exc
        if any(not -100 <= bias <= 100 for bias in biases.values()):
            raise ApiError(400, "logit_bias: values are -100 to 100", param="logit_bias")
        return biases

    def job_fields(self, max_tokens: int | None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "max_tokens": max_tokens or self.max_tokens, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "top_k": self.top_k, "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty, "keep_alive": self.keep_alive,
            "logprobs": self.job_logprobs(), "logit_bias": self.job_logit_bias(),
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
        }
        fields["response_format"] = self.structured()
        return {key: value for key, value in fields.items() if value is not None}

    def structured(self) -> dict[str, Any] | None:
        """OpenAI's response_format as the job's: json_object, or json_schema with its schema."""
        fmt = self.response_format
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return {"type": "json_object"}
        spec = fmt.get("json_schema")
        if fmt.get("type") == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return {"type": "json_schema", "schema": spec["schema"]}
        raise ApiError(400, 'response_format must be {"type": "text" | "json_object"} or {"type": "json_schema", '
                       '"json_schema": {"name": …, "schema": {…}}}', param="response_format")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    tool_choice: Any = None

    def tool_plan(self) -> ToolPlan | None:
        try:
            planned = plan(self.tools, self.tool_choice)
        except RequestError as exc:
            raise ApiError(400, exc.message, param="tools") from exc
        if planned is not None and planned.forced and self.structured() is not None:
            raise ApiError(400, "a forced tool call and a response_format both shape the answer; send one",
                           param="response_format")
        return planned


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "rbee takes one prompt per request", param="prompt")
            return self.prompt[0]
        return self.prompt


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=500)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    keep_alive: float | str | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts or len(texts) > 2048:
            raise ApiError(400, "input: one string, or a list of 1 to 2048 strings", param="input")
        if not all(isinstance(text, str) for text in texts):
            raise ApiError(400, "input: rbee embeds text; send strings, not token ids", param="input")
        if any(not text for text in texts):
            raise ApiError(400, "input: empty strings have no embedding", param="input")
        if self.dimensions is not None:
            raise ApiError(400, "dimensions: rbee returns the model's own dimension; leave it out",
                           param="dimensions")
        return [str(text) for text in texts]


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from exc
    if isinstance(parsed, SamplingFields):
        parsed.refuse_unsupported()
    return parsed


def chat_job(req: ChatCompletionRequest, node: str | None, model: str) -> tuple[dict[str, Any], ToolPlan | None]:
    """The job body of a chat request, and its tool plan: the one translation both dialects use."""
    messages = [message.job_message(number) for number, message in enumerate(req.messages)]
    tools = req.tool_plan()
    job_body = {"messages": messages, "model": model, "node": node, **req.job_fields(req.max_completion_tokens)}
    if tools is not None:
        job_body["tools"] = tools.tools()
        if tools.forced:
            job_body["response_format"] = tools.response_format()
    return job_body, tools

