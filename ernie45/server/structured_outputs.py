"""A request's output constraint, from whichever dialect it uses, as one `StructuredOutputsParams`.

Three dialects are accepted (a request uses one): OpenAI's `response_format` (text, json_object, json_schema,
structural_tag), vLLM's `structured_outputs` {json, regex, choice, grammar, json_object, structural_tag, ...} and
FastDeploy's / older vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. `tool_choice`
"required" or a named function becomes a structural tag forcing ERNIE's `<tool_call>` blocks
(engine/structured_output/tool_calls.py).
Every error is a 400 naming the field the client sent.
"""

from __future__ import annotations

from typing import Any

from ..engine.structured_output import StructuredOutputsParams
from ..engine.structured_output.tool_calls import ToolChoiceError, forced_tool_call_tag
from .errors import bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _params(fields: dict[str, Any], param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except (TypeError, ValueError) as exc:
        raise bad_request(f"{param}: {exc}", param=param) from None


def _from_response_format(value: Any) -> StructuredOutputsParams | None:
    if not isinstance(value, dict):
        raise bad_request("response_format must be an object with a `type`", param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _params({"json_object": True}, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise bad_request('response_format.json_schema must be an object with a "schema" (and a "name")',
                              param="response_format.json_schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request("response_format.json_schema.strict must be true or false",
                              param="response_format.json_schema.strict")
        # strict or not, the output is constrained to the schema: a non-strict schema is only what OpenAI does
        # not promise to enforce, and enforcing it is what a user of this server asked for.
        return _params({"json": spec["schema"]}, "response_format.json_schema.schema")
    if kind == "structural_tag":
        tag = {k: v for k, v in value.items() if k != "type"}
        if "format" not in tag:
            raise bad_request('response_format structural_tag needs a "format" (xgrammar structural tag)',
                              param="response_format.format")
        return _params({"structural_tag": {"type": "structural_tag", **tag}}, "response_format")
    raise bad_request(f"response_format.type must be one of text, json_object, json_schema, structural_tag; "
                      f"got {kind!r}", param="response_format.type")


def structured_outputs_of(req, tools: list | None = None, tool_choice: Any = None,
                          parallel_tool_calls: bool | None = None) -> StructuredOutputsParams | None:
    """The constraint of a chat or completion request, or None when it has none."""
    found: list[tuple[str, StructuredOutputsParams | None]] = []
    if getattr(req, "response_format", None) is not None:
        found.append(("response_format", _from_response_format(req.response_format)))
    if req.structured_outputs is not None:
        value = req.structured_outputs
        try:
            found.append(("structured_outputs", StructuredOutputsParams.of(value)))
        except (TypeError, ValueError) as exc:
            raise bad_request(f"structured_outputs: {exc}", param="structured_outputs") from None
    for name, kind in _GUIDED.items():
        if getattr(req, name) is not None:
            found.append((name, _params({kind: getattr(req, name)}, name)))
    if tool_choice == "required" or isinstance(tool_choice, dict):
        try:
            tag = forced_tool_call_tag(tools, tool_choice, parallel_tool_calls is not False)
        except ToolChoiceError as exc:
            raise bad_request(str(exc), param=exc.param) from None
        found.append(("tool_choice", _params({"structural_tag": tag}, "tool_choice")))
    found = [(name, params) for name, params in found if params is not None]
    if len(found) > 1:
        raise bad_request(f"give one output constraint, got {' and '.join(name for name, _ in found)}",
                          param=found[1][0])
    return found[0][1] if found else None
