"""ernie45: ERNIE 4.5 in PyTorch."""

from .checkpoint import load_model, save_model
from .models import Ernie45Config, Ernie45ForCausalLM

__version__ = "0.1.0"


def __getattr__(name):
    # The engine imports more than the model core needs; load it on first use of `ernie45.LLM` and friends.
    if name in ("LLM", "SamplingParams", "AsyncLLM"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'ernie45' has no attribute {name!r}")


def load_tokenizer(path):
    """Load a checkpoint directory's tokenizer (SentencePiece or tokenizer.json) with its chat template."""
    from .tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = [
    "AsyncLLM", "Ernie45Config", "Ernie45ForCausalLM", "LLM", "SamplingParams", "__version__", "load_model",
    "load_tokenizer", "save_model",
]
