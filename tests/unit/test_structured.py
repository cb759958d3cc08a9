"""Which JSON-schema keywords the grammar enforces, and the refusal for the rest."""

from __future__ import annotations

import pytest

from rbee.errors import RequestError
from rbee.link.bounds import schema_problems as unenforceable
from rbee.worker.structured import grammar_for


def test_enforced_and_annotation_keywords_pass() -> None:
    schema = {"title": "t", "type": "object", "description": "d", "properties": {
        "a": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 2},
        "b": {"anyOf": [{"type": "string", "maxLength": 3}, {"const": 1}]}}, "required": ["a"],
        "$defs": {"c": {"type": "string", "pattern": "^c$"}}}
    assert unenforceable(schema) == []
    assert "root ::=" in grammar_for({"type": "json_schema", "schema": schema})


def test_every_unenforceable_keyword_is_named_with_its_path() -> None:
    schema = {"type": "object", "minProperties": 1, "properties": {
        "n": {"type": "number", "minimum": 0, "multipleOf": 2},
        "l": {"type": "array", "items": [{"type": "integer", "exclusiveMaximum": 3}]}}}
    assert unenforceable(schema) == ["schema.minProperties", "schema.properties.n.minimum",
                                     "schema.properties.n.multipleOf", "schema.properties.l.items[0].exclusiveMaximum"]
    with pytest.raises(RequestError, match=r"schema.minProperties, schema.properties.n.minimum"):
        grammar_for({"type": "json_schema", "schema": schema})


def test_json_object_and_bad_shapes() -> None:
    assert "object" in grammar_for({"type": "json_object"})
    with pytest.raises(RequestError, match="json_schema"):
        grammar_for({"type": "json_schema"})


def test_strings_in_a_schema_grammar_admit_no_raw_control_characters() -> None:
    """The converter's `char` rule allows a raw tab or newline inside a string: invalid JSON."""
    from llama_cpp.llama_grammar import LlamaGrammar

    from rbee.worker.structured import LOOSE_CHAR, STRICT_CHAR

    grammar = grammar_for({"type": "json_schema", "schema": {"type": "object", "properties": {
        "name": {"type": "string"}}, "required": ["name"]}})
    rules = [line for line in grammar.splitlines() if line.startswith("char ::=")]
    assert rules and all(rule.startswith(STRICT_CHAR) for rule in rules), rules
    assert LOOSE_CHAR not in grammar
    LlamaGrammar.from_string(grammar, verbose=False)  # llama.cpp accepts it
