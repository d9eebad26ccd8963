"""Where the embedded default model lives (shipped inside the package, so commands work offline)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def default_model_path() -> Path | None:
    """The embedded checkpoint directory, or None while the package ships none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def resolve_model_argument(model: str | None) -> str:
    """MODEL as given, or the embedded default model when omitted."""
    if model:
        return model
    path = default_model_path()
    if path is None:
        raise SystemExit(
            "error: no MODEL given and this ernie45 build ships no embedded default model yet; pass a checkpoint "
            "directory (config.json + *.safetensors + tokenizer files) or a hub id such as baidu/ERNIE-4.5-0.3B-PT"
        )
    return str(path)
