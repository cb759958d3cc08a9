"""The gate every output constraint passes before llama.cpp sees it.

llama.cpp's grammar parser and sampler recurse once per nesting level of a grammar
and once per rule in a chain, on the worker's shared engine thread: a 211-byte schema
with ``maxLength: 50000`` became a grammar nested 50,000 deep and killed the worker
(SIGSEGV) with every stream on it. Schemas (``response_format``, a tool's
``parameters``) and raw GBNF (``grammar`` on ``/v1/jobs``) are therefore checked
here, at every tier that parses a request, without recursion of our own, and refused
with a 400 naming the path. The engine thread also runs on a stack sized for the
largest grammar this gate lets through (``ENGINE_STACK_BYTES``), so a construct the
gate does not know still cannot overflow it.
"""

from __future__ import annotations

from typing import Any

from rbee.errors import RequestError

#: minLength/maxLength/minItems/maxItems and GBNF {m,n}: the converter nests one level per unit
MAX_REPEAT = 256
#: nesting of a schema (objects in arrays in objects …)
MAX_SCHEMA_DEPTH = 32
#: sub-schemas in one schema
MAX_SCHEMA_NODES = 2_000
#: a grammar's own size, its parenthesis nesting, its rules and its alternatives
MAX_GRAMMAR_CHARS = 100_000
MAX_GRAMMAR_DEPTH = 400
MAX_GRAMMAR_RULES = 1_000
MAX_GRAMMAR_ALTERNATIVES = 4_000
#: the engine thread's stack: a 100 KB grammar nested as deep as its size allows parses in
#: about 40 MB of llama.cpp's stack; this leaves room to spare (virtual memory, touched only if used)
ENGINE_STACK_BYTES = 256 * 1024 * 1024

#: keywords llama-cpp-python's converter turns into grammar; others would be silently ignored
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "pattern", "format",
})
#: keywords that say nothing about which JSON is valid
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions",
    "deprecated", "readOnly", "writeOnly",
})
REPEATS = ("minLength", "maxLength", "minItems", "maxItems")
#: keywords whose value is a sub-schema or a list of them, and those whose value maps names to them
SUBSCHEMA = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties")
NAMED = ("properties", "$defs", "definitions")
#: marks a found problem on the walk's stack (a schema may itself be None)
PROBLEM = object()


def schema_problems(schema: Any, path: str = "schema") -> list[str]:
    """Where ``schema`` uses a keyword the grammar cannot enforce, or exceeds a bound
    (``schema.properties.zip.maximum``, ``schema.properties.name.maxLength: 50000 is not …``),
    in the schema's own order. Walks with its own stack: a schema nested 50,000 deep is
    refused, never a RecursionError."""
    found: list[str] = []
    #: (sub-schema, its path, its depth), or (PROBLEM, the problem, 0)
    pending: list[tuple[Any, str, int]] = [(schema, path, 0)]
    nodes = 0
    while pending:
        node, where, depth = pending.pop()
        if node is PROBLEM:
            found.append(where)
            continue
        steps: list[tuple[Any, str, int]] = []
        if isinstance(node, list):
            steps = [(item, f"{where}[{index}]", depth) for index, item in enumerate(node)]
        elif isinstance(node, dict):
            nodes += 1
            if depth > MAX_SCHEMA_DEPTH:
                return [f"{where}: nested deeper than {MAX_SCHEMA_DEPTH} levels"]
            if nodes > MAX_SCHEMA_NODES:
                return [f"{path}: more than {MAX_SCHEMA_NODES} sub-schemas"]
            for key, value in node.items():
                if key not in ENFORCED and key not in ANNOTATIONS:
                    steps.append((PROBLEM, f"{where}.{key}", 0))
                elif key in REPEATS and not (type(value) is int and 0 <= value <= MAX_REPEAT):
                    steps.append((PROBLEM, f"{where}.{key}: {value!r} is not a whole number from 0 to {MAX_REPEAT}",
                                  0))
                elif key in NAMED and isinstance(value, dict):
                    steps += [(sub, f"{where}.{key}.{name}", depth + 1) for name, sub in value.items()]
                elif key in SUBSCHEMA:
                    steps.append((value, f"{where}.{key}", depth + 1))
        pending.extend(reversed([step for step in steps if step[0] is PROBLEM or isinstance(step[0], dict | list)]))
    return found


def grammar_problems(grammar: str) -> list[str]:
    """What makes a GBNF grammar too big or too deep for the shared engine thread: its size,
    its parenthesis nesting, its number of rules and alternatives, and {m,n} repetitions.
    String literals, character classes and comments are skipped as llama.cpp's parser does."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        return [f"grammar: {len(grammar)} characters, more than {MAX_GRAMMAR_CHARS}"]
    depth = deepest = rules = alternatives = 0
    found: list[str] = []
    index, end = 0, len(grammar)
    while index < end:
        char = grammar[index]
        if char in "\"[":
            index = _skip_literal(grammar, index, '"' if char == '"' else "]")
            continue
        if char == "#":
            newline = grammar.find("\n", index)
            index = end if newline < 0 else newline
            continue
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
        elif char == "|":
            alternatives += 1
        elif grammar.startswith("::=", index):
            rules += 1
        elif char == "{":
            close = grammar.find("}", index)
            numbers = grammar[index + 1:close if close >= 0 else end].split(",")
            if any(part.strip().isdigit() and int(part.strip()) > MAX_REPEAT for part in numbers):
                found.append(f"grammar: a repetition {grammar[index:close + 1][:40]} over {MAX_REPEAT}")
        index += 1
    if deepest > MAX_GRAMMAR_DEPTH:
        found.append(f"grammar: parentheses nested {deepest} deep, more than {MAX_GRAMMAR_DEPTH}")
    if rules > MAX_GRAMMAR_RULES:
        found.append(f"grammar: {rules} rules, more than {MAX_GRAMMAR_RULES}")
    if alternatives > MAX_GRAMMAR_ALTERNATIVES:
        found.append(f"grammar: {alternatives} alternatives, more than {MAX_GRAMMAR_ALTERNATIVES}")
    return found


def _skip_literal(text: str, start: int, closing: str) -> int:
    """The index after the literal (``"…"`` or ``[…]``) that starts at ``start``, escapes honoured."""
    index = start + 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == closing:
            return index + 1
        index += 1
    return index


def refuse_schema(schema: Any, what: str, path: str = "schema") -> None:
    """A 400 naming every place ``schema`` cannot be enforced or is too big (rbee.link.bounds)."""
    refused = schema_problems(schema, path)
    if refused:
        raise RequestError(f"{what}: the JSON schema uses something rbee cannot enforce or bound: "
                           f"{', '.join(refused)}. Leave it out, or express it with enum, pattern or smaller lengths")


def refuse_grammar(grammar: str, what: str = "grammar") -> None:
    problems = grammar_problems(grammar)
    if problems:
        raise RequestError(f"{what} is too large or too deep for the engine: {'; '.join(problems)}")
