"""OpenAI tools (function calling) as plain logic: which constraint a request's ``tool_choice``
puts on generation, and how the generated text becomes ``tool_calls``.

- a named function (or ``required`` with one function): the output is that function's
  arguments, grammar-constrained by its ``parameters`` schema, so they always parse and match;
- ``required`` with several: ``{"name": …, "arguments": {…}}``, one ``anyOf`` branch per function;
- ``auto``: the model decides. A model whose chat template defines tools writes calls in its
  own format; rbee reads the Hermes/Qwen ``<tool_call>{…}</tool_call>`` form. Otherwise the
  answer is text, as from a model that chose not to call;
- ``none``: no tools are shown to the model.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from rbee.errors import RequestError
from rbee.link.bounds import refuse_schema

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: the Hermes/Qwen form, written by models whose template describes tools that way
TAGGED_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    functions: tuple[Function, ...]
    mode: Literal["named", "required", "auto"]
    name: str | None = None  # the function a named choice (or a lone required one) calls

    @property
    def forced(self) -> bool:
        """The answer is a call, whatever the model would rather say."""
        return self.mode != "auto"

    @property
    def streams_arguments(self) -> bool:
        """The call's name is known before generation, so its arguments can stream as they come."""
        return self.name is not None

    def response_format(self) -> dict[str, Any] | None:
        if self.name is not None:
            return {"type": "json_schema", "schema": self.function(self.name).parameters}
        if self.mode == "required":
            return {"type": "json_schema", "schema": {"anyOf": [
                {"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                 "required": ["name", "arguments"]} for f in self.functions]}}
        return None

    def function(self, name: str) -> Function:
        return next(f for f in self.functions if f.name == name)

    def tools(self) -> list[dict[str, Any]]:
        """What the worker shows the model (its chat template's ``tools``)."""
        return [{"type": "function", "function": {"name": f.name, "description": f.description,
                                                  "parameters": f.parameters}} for f in self.functions]

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The answer as OpenAI ``tool_calls``, or None when it is text (auto only)."""
        if self.name is not None:
            return [call(self.name, text)]
        if self.mode == "required":
            chosen = json.loads(text)
            return [call(chosen["name"], json.dumps(chosen["arguments"], ensure_ascii=False))]
        found = []
        for match in TAGGED_CALL.finditer(text):
            try:
                chosen = json.loads(match.group(1))
                name, arguments = chosen["name"], chosen.get("arguments", {})
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            if any(f.name == name for f in self.functions):
                found.append(call(name, arguments if isinstance(arguments, str) else json.dumps(arguments)))
        return found or None


def answer_calls(tools: ToolPlan | None, text: str, finish: str) -> list[dict[str, Any]] | None:
    """An answer's tool calls, or None for a text answer (or a forced call cut off by the token
    budget before its JSON was whole: it is returned as text, with finish "length")."""
    if tools is None:
        return None
    try:
        return tools.calls(text)
    except (ValueError, KeyError, TypeError):
        if finish == "length":
            return None
        raise


def call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_" + secrets.token_urlsafe(12), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def plan(tools: list[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """The plan for a request's ``tools`` and ``tool_choice``, or None when no tool may be called.
    Every problem is a :class:`RequestError` naming the field."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice: there are no tools to choose from; send `tools` too")
        return None
    if not isinstance(tools, list) or len(tools) > 128:
        raise RequestError("tools: a list of up to 128 {\"type\": \"function\", \"function\": {…}}")
    functions = tuple(_function(index, tool) for index, tool in enumerate(tools))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise RequestError(f"tools: function names must be unique; got {', '.join(names)}")
    if tool_choice in (None, "auto"):
        return ToolPlan(functions, "auto")
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolPlan(functions, "required", functions[0].name if len(functions) == 1 else None)
    spec = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise RequestError('tool_choice: "none", "auto", "required" or {"type": "function", "function": '
                           '{"name": …}}')
    if name not in names:
        raise RequestError(f"tool_choice: no tool is named {name!r}; tools has {', '.join(names)}")
    return ToolPlan(functions, "named", name)


def _function(index: int, tool: Any) -> Function:
    where = f"tools[{index}]"
    spec = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(spec, dict):
        raise RequestError(f'{where}: must be {{"type": "function", "function": {{"name": …, "parameters": …}}}}')
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise RequestError(f"{where}.function.name: 1 to 64 letters, digits, _ or -; got {name!r}")
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise RequestError(f"{where}.function.parameters: must be a JSON schema object")
    refuse_schema(parameters, "the arguments' schema", f"{where}.function.parameters")
    if parameters.get("type", "object") != "object":
        raise RequestError(f"{where}.function.parameters: the arguments must be an object (type: object)")
    return Function(name, str(spec.get("description") or ""), {"type": "object", **parameters})
