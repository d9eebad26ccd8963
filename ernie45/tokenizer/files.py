"""Reading and writing the tokenizer files of a released ERNIE 4.5 checkpoint directory.

The released layout is `tokenizer.model` (SentencePiece BPE), `tokenizer_config.json`, `special_tokens_map.json`,
`added_tokens.json`, sometimes `tokenizer.json` and `chat_template.jinja`. This module only knows the file formats;
it builds no backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"

# The named special-token attributes of a Hugging Face tokenizer, in the order they are written.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# What ERNIE 4.5 uses when a checkpoint's files do not name a token (the released tokenizer_config.json does, but
# some converted checkpoints ship only special_tokens_map.json or nothing at all). Applied only if the token exists.
ERNIE_DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "cls_token": "<|begin_of_sentence|>",
    "sep_token": "<|end_of_sentence|>",
    "mask_token": "<mask:1>",
}


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole in the input text before the backend tokenizes the rest."""

    content: str
    """The token's text, e.g. `<|IMAGE_PLACEHOLDER|>`."""
    id: int
    """Its id."""
    special: bool = True
    """Special tokens are dropped by `decode(..., skip_special_tokens=True)`."""
    lstrip: bool = False
    """When matching, also consume the whitespace on its left."""
    rstrip: bool = False
    """When matching, also consume the whitespace on its right."""
    normalized: bool = False
    """Kept for writing the file back; matching is always on the raw text."""
    single_word: bool = False
    """Kept for writing the file back; not used for matching."""

    def to_json(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
            "special": self.special,
        }


@dataclass
class TokenizerFiles:
    """Everything the JSON/Jinja files of a tokenizer directory say, parsed but not yet tied to a vocabulary."""

    directory: Path
    """The directory the files were read from."""
    config: dict[str, Any] = field(default_factory=dict)
    """tokenizer_config.json as read (keys this module does not interpret are kept for writing back)."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Named special tokens (`bos_token` -> `<s>` ...), from tokenizer_config.json, else special_tokens_map.json."""
    additional_special_tokens: list[str] = field(default_factory=list)
    """`additional_special_tokens` / `extra_special_tokens` contents."""
    added_tokens_decoder: dict[int, AddedToken] = field(default_factory=dict)
    """tokenizer_config.json `added_tokens_decoder`."""
    added_tokens_json: dict[str, int] = field(default_factory=dict)
    """added_tokens.json (content -> id)."""
    chat_template: str | None = None
    """chat_template.jinja if present, else tokenizer_config.json `chat_template`."""


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file in the error if it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON file ({err})") from err


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(value: Any, path: Path, key: str) -> str | None:
    # Hugging Face writes special tokens either as plain strings or as serialized AddedToken dicts.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: `{key}` must be a string or an object with a `content` string, got {value!r}")


def _token_list(value: Any, path: Path, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        # transformers 5 also allows a dict of named extra tokens ({"image_token": "<|IMAGE_PLACEHOLDER|>"}).
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"{path}: `{key}` must be a list of tokens, got {value!r}")
    contents = [_token_content(item, path, key) for item in items]
    return [c for c in contents if c]


def _parse_special_tokens(data: dict[str, Any], path: Path) -> tuple[dict[str, str], list[str]]:
    named = {}
    for name in SPECIAL_TOKEN_NAMES:
        content = _token_content(data.get(name), path, name)
        if content:  # "" and None both mean "not set"
            named[name] = content
    extra = _token_list(data.get("additional_special_tokens"), path, "additional_special_tokens")
    extra += _token_list(data.get("extra_special_tokens"), path, "extra_special_tokens")
    return named, list(dict.fromkeys(extra))


def _parse_added_tokens_decoder(value: Any, path: Path) -> dict[int, AddedToken]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: `added_tokens_decoder` must be an object mapping ids to tokens")
    decoder = {}
    for key, entry in value.items():
        try:
            token_id = int(key)
        except ValueError as err:
            raise ValueError(f"{path}: `added_tokens_decoder` key {key!r} is not an integer id") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{path}: `added_tokens_decoder[{key}]` must be an object with a `content` string")
        decoder[token_id] = AddedToken(
            content=entry["content"],
            id=token_id,
            special=bool(entry.get("special", True)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", False)),
            single_word=bool(entry.get("single_word", False)),
        )
    return decoder


def _parse_chat_template(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # Some checkpoints store several named templates: [{"name": "default", "template": "..."}, ...].
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        if isinstance(template, str):
            return template
    raise ValueError(f"{path}: `chat_template` must be a string or a list with a template named 'default'")


def read_tokenizer_files(directory: Path) -> TokenizerFiles:
    """Read the JSON/Jinja tokenizer files of `directory` (all optional; the caller checks the model files)."""
    files = TokenizerFiles(directory=directory)
    config_path = directory / TOKENIZER_CONFIG
    if config_path.is_file():
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
        files.config = config
        files.special_tokens, files.additional_special_tokens = _parse_special_tokens(config, config_path)
        files.added_tokens_decoder = _parse_added_tokens_decoder(config.get("added_tokens_decoder"), config_path)
        files.chat_template = _parse_chat_template(config.get("chat_template"), config_path)

    map_path = directory / SPECIAL_TOKENS_MAP
    if map_path.is_file():
        data = read_json(map_path)
        if not isinstance(data, dict):
            raise ValueError(f"{map_path}: expected a JSON object")
        named, extra = _parse_special_tokens(data, map_path)
        # tokenizer_config.json is what transformers writes last, so it wins where both name a token.
        files.special_tokens = {**named, **files.special_tokens}
        files.additional_special_tokens = list(dict.fromkeys(files.additional_special_tokens + extra))

    added_path = directory / ADDED_TOKENS
    if added_path.is_file():
        data = read_json(added_path)
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise ValueError(f"{added_path}: expected a JSON object mapping token strings to integer ids")
        files.added_tokens_json = dict(data)

    jinja_path = directory / CHAT_TEMPLATE_JINJA
    if jinja_path.is_file():
        # transformers prefers the standalone file over the config entry when both exist.
        files.chat_template = jinja_path.read_text(encoding="utf-8")
    return files
