"""`StructuredOutputsParams`: the constraint one request's output must satisfy (vLLM's field names).

Exactly one of json / regex / choice / grammar / json_object / structural_tag is set. The constraint is checked
when the params are made (types here, the grammar itself by the backend without a tokenizer), so a bad schema or
regex fails at admission with a message that names the field, never in the engine core mid-batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .json_schema import check_json_schema

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """One request's output constraint; exactly one of the first six fields is set."""

    json: str | dict | None = None
    """A JSON schema (a dict or its JSON text): the output is one JSON value valid against it."""
    regex: str | None = None
    """The output matches this regular expression (xgrammar's dialect: no lookaround, no named groups)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF (GBNF) grammar whose `root` rule the output matches."""
    json_object: bool | None = None
    """True: the output is any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    structural_tag: str | dict | None = None
    """An xgrammar structural tag ({"type": "structural_tag", "format": {...}}, or its JSON text)."""
    disable_any_whitespace: bool = False
    """JSON without optional whitespace (compact output; small models can otherwise loop on spaces)."""
    disable_in_reasoning: bool = True
    """Leave a thinking block (<think>...</think>) unconstrained: the grammar starts after it (vLLM's rule)."""

    def __post_init__(self) -> None:
        set_kinds = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(set_kinds) != 1:
            got = ", ".join(set_kinds) if set_kinds else "none"
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {got}")
        self.kind = set_kinds[0]
        for name in ("disable_any_whitespace", "disable_in_reasoning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be true or false, got {getattr(self, name)!r}")
        if self.json is not None:
            self.json = _as_json_object("json", self.json)
            check_json_schema(self.json, "json")
        elif self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"regex must be a string, got {type(self.regex).__name__}")
        elif self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
            self.choice = list(self.choice)
        elif self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be a string (EBNF), got {type(self.grammar).__name__}")
        elif self.json_object is not None and self.json_object is not True:
            raise ValueError(f"json_object must be true when set, got {self.json_object!r}")
        elif self.structural_tag is not None:
            self.structural_tag = _as_json_object("structural_tag", self.structural_tag)
        from .backend import default_backend

        default_backend().validate(self)

    @classmethod
    def of(cls, value: Any) -> StructuredOutputsParams:
        """From a StructuredOutputsParams or a dict of its fields (an API request's `structured_outputs`)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"structured_outputs has unknown field {unknown[0]!r}; fields are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**value)

    @property
    def cache_key(self) -> tuple[str, str, bool]:
        """Equal for constraints that compile to the same grammar (the compiled-grammar cache's key)."""
        spec = getattr(self, self.kind)
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, ensure_ascii=False)
        return self.kind, text, self.disable_any_whitespace


def _as_json_object(name: str, value: Any) -> Any:
    """A dict from a dict or from its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, (dict, bool)):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value
