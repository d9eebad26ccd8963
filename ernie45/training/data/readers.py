"""Readers for ERNIEKit's data formats -> canonical records.

Every format becomes one of three records: `TextDoc` (PT), `Conversation` (SFT: chat messages, each assistant turn
with a train flag) or `Preference` (DPO: prompt messages, chosen and rejected assistant text). A malformed line
raises `DataError` naming file:line, or is skipped and counted when `skip_bad_lines` is set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A malformed data record; the message starts with file:line."""


@dataclass
class TextDoc:
    text: str


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    """Chat messages (role/content[/tool_calls]); roles system, user, assistant, tool."""
    train: list[bool] = field(default_factory=list)
    """One flag per assistant message: whether its tokens carry loss (ERNIEKit `label`)."""
    tools: list | None = None


@dataclass
class Preference:
    prompt: list[dict[str, Any]]
    """Messages before the compared assistant turn."""
    chosen: str
    rejected: str


@dataclass
class ReadStats:
    lines: int = 0
    skipped: int = 0


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _str_list(obj: dict, key: str) -> list[str]:
    value = obj.get(key)
    if isinstance(value, str):
        value = [value]
    _require(isinstance(value, list) and value and all(isinstance(v, str) for v in value),
             f"field {key!r} must be a non-empty list of strings")
    return value


def _erniekit(obj: dict, stage: str):
    system = obj.get("system")
    _require(system is None or isinstance(system, str), "field 'system' must be a string")
    src = _str_list(obj, "src")
    head = [{"role": "system", "content": system}] if system else []
    if stage == "DPO":
        tgt = obj.get("tgt", [])
        _require(isinstance(tgt, list) and len(tgt) == len(src) - 1, "field 'tgt' must have one entry fewer than 'src'")
        response = obj.get("response")
        _require(isinstance(response, list) and len(response) == 2, "field 'response' must be [[chosen], [rejected]]")
        sort = obj.get("sort", [1, 0])
        _require(isinstance(sort, list) and len(sort) == 2 and sort[0] != sort[1], "field 'sort' must be two different scores")
        texts = ["".join(r) if isinstance(r, list) else r for r in response]
        _require(all(isinstance(t, str) for t in texts), "field 'response' must hold strings")
        chosen, rejected = (texts[0], texts[1]) if sort[0] > sort[1] else (texts[1], texts[0])
        msgs = head + _interleave(src, tgt)
        return Preference(msgs, chosen, rejected)
    tgt = _str_list(obj, "tgt")
    _require(len(src) == len(tgt), f"fields 'src' ({len(src)}) and 'tgt' ({len(tgt)}) must have the same length")
    label = obj.get("label", [1] * len(tgt))
    _require(isinstance(label, list) and len(label) == len(tgt), "field 'label' must have one 0/1 per turn")
    return Conversation(head + _interleave(src, tgt), [bool(x) for x in label])


def _interleave(src: list[str], tgt: list[str]) -> list[dict]:
    msgs = []
    for i, user in enumerate(src):
        msgs.append({"role": "user", "content": user})
        if i < len(tgt):
            msgs.append({"role": "assistant", "content": tgt[i]})
    return msgs


def _alpaca(obj: dict, stage: str):
    system = obj.get("system")
    head = [{"role": "system", "content": system}] if system else []
    if stage == "DPO":
        for key in ("question", "chosen", "rejected"):
            _require(isinstance(obj.get(key), str), f"field {key!r} must be a string")
        return Preference(head + [{"role": "user", "content": obj["question"]}], obj["chosen"], obj["rejected"])
    _require(isinstance(obj.get("instruction"), str), "field 'instruction' must be a string")
    _require(isinstance(obj.get("output"), str), "field 'output' must be a string")
    query = obj["instruction"] + ("\n" + obj["input"] if obj.get("input") else "")
    msgs = list(head)
    history = obj.get("history") or []
    _require(isinstance(history, list), "field 'history' must be a list of [query, response] pairs")
    for pair in history:
        _require(isinstance(pair, list) and len(pair) == 2, "field 'history' must be a list of [query, response] pairs")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    msgs += [{"role": "user", "content": query}, {"role": "assistant", "content": obj["output"]}]
    return Conversation(msgs, [True] * (len(history) + 1))


_ROLES = ("system", "user", "assistant", "tool")


def _chatml(obj: dict, stage: str):
    messages = obj.get("messages")
    _require(isinstance(messages, list) and messages, "field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        _require(isinstance(m, dict) and m.get("role") in _ROLES, f"messages[{i}].role must be one of {', '.join(_ROLES)}")
        _require(isinstance(m.get("content", ""), str), f"messages[{i}].content must be a string")
    if stage == "DPO":
        for key in ("chosen", "rejected"):
            value = obj.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            _require(isinstance(value, str), f"field {key!r} must be a string or an assistant message")
            obj = {**obj, key: value}
        return Preference(messages, obj["chosen"], obj["rejected"])
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    _require(n_assistant > 0, "'messages' has no assistant turn to train on")
    train = [bool(m.get("loss", True)) for m in messages if m["role"] == "assistant"]
    return Conversation(messages, train, obj.get("tools"))


def _text(obj: dict, stage: str):
    _require(isinstance(obj.get("text"), str), "field 'text' must be a string")
    return TextDoc(obj["text"])


PARSERS = {"erniekit": _erniekit, "alpaca": _alpaca, "chatml": _chatml, "text": _text}


def read_records(path: str | Path, fmt: str, stage: str, skip_bad_lines: bool = False,
                 stats: ReadStats | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) from a .jsonl/.json/.txt file; `where` is 'file:line'."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    parse = PARSERS[fmt]
    if path.suffix == ".txt":
        if fmt != "text":
            raise DataError(f"{path}: .txt files are plain text; use train_dataset_type: text")
        text = path.read_text(encoding="utf-8")
        # Documents are separated by blank lines.
        for i, doc in enumerate(d.strip() for d in text.split("\n\n")):
            if doc:
                stats.lines += 1
                yield f"{path}:doc{i}", TextDoc(doc)
        return
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
        if not isinstance(items, list):
            raise DataError(f"{path}:1: a .json data file must hold a list of records")
        lines = [(i + 1, item) for i, item in enumerate(items)]
        where_fmt = "{path}: record {n}"
    else:
        lines = _jsonl_lines(path)
        where_fmt = "{path}:{n}"
    for n, item in lines:
        where = where_fmt.format(path=path, n=n)
        stats.lines += 1
        try:
            if isinstance(item, Exception):
                raise ValueError(f"not valid JSON: {item}")  # noqa: TRY004 (reported as a data error)
            if not isinstance(item, dict):
                raise ValueError("expected a JSON object")  # noqa: TRY004 (reported as a data error)
            record = parse(item, stage)
        except ValueError as exc:
            if skip_bad_lines:
                stats.skipped += 1
                continue
            raise DataError(f"{where}: {exc} (format {fmt}; set skip_bad_lines: true to skip such lines)") from None
        yield where, record


def _jsonl_lines(path: Path):
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, exc
