"""Structured output: a JSON object, or JSON matching a schema, as a llama.cpp grammar.

The schema is turned into GBNF by llama-cpp-python's own converter (the port of
llama.cpp's ``json_schema_to_grammar``), so what the sampler allows is exactly what
the schema allows; a schema feature it cannot express is a 400 naming it.
"""

from __future__ import annotations

import json
from typing import Any

from rbee.errors import RequestError
from rbee.link.bounds import refuse_grammar, refuse_schema


def grammar_for(response_format: dict[str, Any]) -> str:
    """GBNF for ``{"type": "json_object"}`` or ``{"type": "json_schema", "schema": {...}}``."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf  # lazy: loads llama.cpp

    kind = response_format.get("type")
    if kind == "json_object":
        return str(JSON_GBNF)
    schema = response_format.get("schema")
    if kind != "json_schema" or not isinstance(schema, dict):
        raise RequestError('response_format must be {"type": "json_object"} or {"type": "json_schema", "schema": {…}}')
    refuse_schema(schema, "response_format")
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        raise RequestError(f"response_format: the JSON schema uses something rbee cannot enforce: {exc}") from exc
    refuse_grammar(grammar, "response_format: the JSON schema's grammar")
    return strict_strings(grammar)


#: the converter's string character: anything but a quote or a backslash, raw control characters included
LOOSE_CHAR = 'char ::= [^"\\\\] |'
#: JSON's: no raw control characters (nor DEL); they must be written as escapes
STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def strict_strings(grammar: str) -> str:
    """The grammar with JSON's own string characters: llama-cpp-python's schema converter lets a
    raw tab, newline or other control character into a string, which no JSON parser accepts."""
    lines = grammar.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(LOOSE_CHAR):
            lines[index] = STRICT_CHAR + line[len(LOOSE_CHAR):]
    return "\n".join(lines) + "\n"
