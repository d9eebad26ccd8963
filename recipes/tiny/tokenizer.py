"""The default model's tokenizer: SentencePiece BPE trained on the recipe's own text, in ERNIE 4.5's released layout
(same special pieces, byte fallback, no normalization), with digits split one per token so that numbers are
spelled the same way in every task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ernie45.tokenizer.training import train_sentencepiece_model, write_tokenizer_dir

from .tasks import Problem

CHAT_TEMPLATE_FILE = Path(__file__).parent / "chat_template.jinja"


def chat_template() -> str:
    """The model's chat template (see recipes/tiny/README.md); a trailing newline would be rendered, so none."""
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8").removesuffix("\n")


def tokenizer_sentences(texts: Sequence[str], problems: Sequence[Problem]) -> list[str]:
    """Training text for the tokenizer: the pretraining quotes plus task wording and the chat scaffolding."""
    task_text = [f"User: {p.question}\nAssistant: {p.reasoning}\n\n{p.answer_text}" for p in problems]
    return [*texts, *task_text, *(p.statement for p in problems)]


def build_tokenizer(out_dir: Path, texts: Sequence[str], problems: Sequence[Problem], vocab_size: int) -> Path:
    """Train and write the tokenizer directory (deterministic: fixed input order, one thread)."""
    model = train_sentencepiece_model(
        tokenizer_sentences(texts, problems),
        vocab_size=vocab_size,
        character_coverage=0.9995,  # the rarest Chinese characters go to byte fallback
        split_digits=True,
        max_sentence_length=16384,
    )
    return write_tokenizer_dir(out_dir, model, chat_template())
