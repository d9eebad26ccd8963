"""The grammar of a forced tool call: `tool_choice` "required" (one or more calls to any offered tool) or a named
function (calls to that one), as an xgrammar structural tag over ERNIE's call format:

    <tool_call>
    {"name": "<tool name>", "arguments": {... valid against the tool's parameters schema ...}}
    </tool_call>

one block per call, blocks separated by a newline (the template's layout, which tool_calls.py parses). With
parallel_tool_calls false, exactly one block.
"""

from __future__ import annotations

from typing import Any

from .json_schema import check_json_schema
from .xgrammar_backend import MAX_JSON_WHITESPACE

# ERNIE's call markers (server/tool_calls.py parses the same ones).
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


class ToolChoiceError(ValueError):
    """A tools / tool_choice problem; `param` names the request field (an API server's 400 carries it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _function(tool: Any, index: int) -> tuple[str, dict]:
    """(name, parameters schema) of an OpenAI tool definition."""
    where = f"tools.{index}"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolChoiceError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                          param=where)
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object"}
    try:
        check_json_schema(parameters, f"{where}.function.parameters")
    except ValueError as exc:
        raise ToolChoiceError(str(exc), param=f"{where}.function.parameters") from None
    return function["name"], parameters


def _chosen_name(tool_choice: Any) -> str:
    function = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolChoiceError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                          '{"name": ...}}', param="tool_choice")
    return function["name"]


def forced_tool_call_tag(tools: list | None, tool_choice: Any, parallel: bool) -> dict:
    """The structural tag that admits only calls of the tools `tool_choice` allows."""
    if not tools:
        raise ToolChoiceError(f"tool_choice {tool_choice!r} needs a non-empty tools list", param="tool_choice")
    functions = dict(_function(tool, i) for i, tool in enumerate(tools))
    if isinstance(tool_choice, dict):
        name = _chosen_name(tool_choice)
        if name not in functions:
            raise ToolChoiceError(f"tool_choice names function {name!r}, which is not in tools "
                              f"({', '.join(functions)})", param="tool_choice")
        functions = {name: functions[name]}
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
              "required": ["name", "arguments"]} for name, parameters in functions.items()]
    call_schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    tag = {"type": "tag", "begin": TOOL_CALL_START + "\n",
           "content": {"type": "json_schema", "json_schema": call_schema, "max_whitespace_cnt": MAX_JSON_WHITESPACE},
           "end": "\n" + TOOL_CALL_END}
    return {"type": "structural_tag",
            "format": {"type": "tags_with_separator", "tags": [tag], "separator": "\n", "at_least_one": True,
                       "stop_after_first": not parallel}}
