"""A tiny SentencePiece tokenizer in ERNIE 4.5's released layout, trained once per test session."""

from pathlib import Path

import pytest

from ernie45.tokenizer import ErnieTokenizer
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_sentencepiece_tokenizer(tmp_path_factory.mktemp("tiny_ernie_tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir) -> ErnieTokenizer:
    return ErnieTokenizer.from_pretrained(tiny_tokenizer_dir)
