"""Checks on a request's JSON schema before it is compiled: is it a valid schema, and does the backend enforce it.

xgrammar (0.2.9) accepts some keywords without enforcing them: output would look constrained but could violate
the schema. Those are refused with the keyword and its location, as vLLM's xgrammar backend does. The list was
found by compiling a schema with each keyword and feeding the grammar a string that violates only that keyword
(tests/engine/test_structured_output_backend.py re-checks it against the installed xgrammar).
"""

from __future__ import annotations

from typing import Any

# Keyword -> why it cannot be enforced by a context-free grammar over the output text.
UNENFORCED_KEYWORDS = {
    "uniqueItems": "comparing array items with each other",
    "contains": "an array item matching a sub-schema somewhere",
    "minContains": "counting the items that match `contains`",
    "maxContains": "counting the items that match `contains`",
    "not": "the complement of a sub-schema",
    "if": "conditional sub-schemas",
    "dependentRequired": "properties required by other properties",
    "dependentSchemas": "sub-schemas applied when a property is present",
}

# Keywords whose values are sub-schemas (dicts) or lists / maps of sub-schemas: where the walk descends.
_SCHEMA_VALUED = ("items", "additionalProperties", "unevaluatedProperties", "propertyNames", "contains", "not",
                  "if", "then", "else", "additionalItems", "unevaluatedItems")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def check_json_schema(schema: Any, field: str) -> None:
    """Raise ValueError naming `field` and the location when `schema` is not a valid JSON schema, or uses a
    keyword the grammar backend cannot enforce."""
    import jsonschema  # the JSON Schema validator the tests also use; imported here to keep engine import light

    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{field} must be a JSON schema object, got {type(schema).__name__}")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise ValueError(f"{field} is not a valid JSON schema: at {where}: {exc.message}") from None
    _refuse_unenforced(schema, field, "#")


def _refuse_unenforced(schema: Any, field: str, where: str) -> None:
    if not isinstance(schema, dict):
        return
    for keyword, reason in UNENFORCED_KEYWORDS.items():
        if keyword in schema:
            raise ValueError(f"{field} uses {keyword!r} at {where}, which constrained decoding cannot enforce "
                             f"({reason}); remove it or validate the output afterwards")
    if len(schema.get("allOf", ())) > 1:
        raise ValueError(f"{field} uses 'allOf' with several sub-schemas at {where}, which the grammar backend "
                         "does not intersect; merge them into one schema")
    for keyword in _SCHEMA_VALUED:
        if isinstance(schema.get(keyword), dict):
            _refuse_unenforced(schema[keyword], field, f"{where}/{keyword}")
    for keyword in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(keyword) or ()):
            _refuse_unenforced(sub, field, f"{where}/{keyword}/{i}")
    for keyword in _SCHEMA_MAPS:
        sub_schemas = schema.get(keyword)
        if isinstance(sub_schemas, dict):
            for name, sub in sub_schemas.items():
                _refuse_unenforced(sub, field, f"{where}/{keyword}/{name}")
