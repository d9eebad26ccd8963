"""Resolve a model argument (local directory or hub id) to a local checkpoint directory."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What a text checkpoint needs; weights of other frameworks (Paddle, .bin) are not fetched.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_model_path(model: str | Path) -> Path:
    """A local directory as is; an `org/name` id downloaded (or taken from the cache) with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise NotADirectoryError(f"{text}: expected a checkpoint directory (config.json + *.safetensors), got a file")
    if not _HUB_ID.match(text):
        raise FileNotFoundError(f"{text}: no such directory, and it is not a hub id of the form 'org/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{text}: not a local directory and huggingface_hub is not installed") from exc
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=_ALLOW_PATTERNS))
    except Exception as exc:  # hub errors (offline, 404, auth) are many classes; all mean "cannot get it"
        raise FileNotFoundError(
            f"{text}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline, download the checkpoint "
            f"elsewhere and pass its directory, or set HF_HUB_OFFLINE=1 after `hf download {text}`."
        ) from exc
