"""Speculative decoding: draft tokens cheaply, verify them in the same batched forward as the other rows."""

from .config import SpeculativeConfig
from .metrics import SpecDecodeStats
from .ngram_proposer import propose_ngram
from .verifier import Verified, verify

__all__ = ["SpecDecodeStats", "SpeculativeConfig", "Verified", "propose_ngram", "verify"]
