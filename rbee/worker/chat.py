"""Chat messages → one prompt for the engine.

The model's own chat template (GGUF ``tokenizer.chat_template``) when it has one;
otherwise a fallback chosen by model family (``general.architecture``). Each
choice also gives the stop strings that end an assistant turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from rbee.errors import RequestError
from rbee.link.schemas import ChatMessage


@dataclass(frozen=True)
class ChatPrompt:
    prompt: str
    stop: tuple[str, ...]
    template: str  # which template made it, for narration


def render(messages: Sequence[ChatMessage], metadata: Mapping[str, str],
           tools: list[dict[str, Any]] | None = None) -> ChatPrompt:
    template = metadata.get("tokenizer.chat_template")
    if template:
        return _jinja(template, messages, metadata, tools)
    messages = as_text_turns(messages, tools)
    family = metadata.get("general.architecture", "")
    if family.startswith("gemma"):
        return _gemma(messages)
    if family.startswith("qwen"):
        return _chatml(messages)
    return _plain(messages)


def as_text_turns(messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None) -> list[ChatMessage]:
    """For a fallback format, which knows no tools: the functions as a system note, calls and
    results as plain text, so the model still sees what happened."""
    turns: list[ChatMessage] = []
    if tools:
        listed = "\n".join(f"- {t['function']['name']}: {t['function'].get('description', '')} "
                           f"arguments: {json.dumps(t['function'].get('parameters', {}))}" for t in tools)
        turns.append(ChatMessage(role="system", content=f"Functions you can call, with JSON arguments:\n{listed}"))
    for message in messages:
        if message.role == "tool":
            turns.append(ChatMessage(role="user", content=f"Result of {message.tool_call_id or 'the call'}: "
                                                         f"{message.content}"))
        elif message.tool_calls:
            calls = "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in message.tool_calls)
            turns.append(ChatMessage(role="assistant", content=f"{message.content}\nCalled: {calls}".strip()))
        else:
            turns.append(message)
    return turns


def _jinja(template: str, messages: Sequence[ChatMessage], metadata: Mapping[str, str],
           tools: list[dict[str, Any]] | None = None) -> ChatPrompt:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        prompt = env.from_string(template).render(
            messages=[m.model_dump(exclude_none=True) for m in messages],
            tools=tools,
            add_generation_prompt=True,
            bos_token="",  # llama.cpp adds BOS itself when it tokenizes
            eos_token=metadata.get("rbee.eos_text", ""),
        )
    except Exception as exc:  # a template error is the model's, reported with the request
        raise RequestError(f"the model's chat template failed on these messages: {exc}") from exc
    eos = metadata.get("rbee.eos_text")
    return ChatPrompt(prompt, (eos,) if eos else (), "the model's own chat template")


def _gemma(messages: Sequence[ChatMessage]) -> ChatPrompt:
    """Gemma's turn format; Gemma has no system role, so a system message leads the first user turn."""
    parts: list[str] = []
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    for message in (m for m in messages if m.role != "system"):
        content = message.content
        if system and message.role == "user":
            content, system = f"{system}\n\n{content}", ""
        role = "model" if message.role == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return ChatPrompt("".join(parts), ("<end_of_turn>",), "gemma fallback (the model has no chat template)")


def _chatml(messages: Sequence[ChatMessage]) -> ChatPrompt:
    parts = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    parts.append("<|im_start|>assistant\n")
    return ChatPrompt("".join(parts), ("<|im_end|>",), "chatml fallback (the model has no chat template)")


def _plain(messages: Sequence[ChatMessage]) -> ChatPrompt:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    parts = [f"{names[m.role]}: {m.content}\n" for m in messages]
    parts.append("Assistant:")
    return ChatPrompt("".join(parts), ("\nUser:", "\nSystem:"), "plain fallback (the model has no chat template)")
