"""Speculative decoding: draft tokens cheaply, verify them in the same batched forward as the other rows."""

from .config import SpeculativeConfig
from .metrics import SpecDecodeStats
from .mtp_proposer import MtpProposer
from .ngram_proposer import propose_ngram
from .verifier import Verified, verify

__all__ = ["MtpProposer", "SpecDecodeStats", "SpeculativeConfig", "Verified", "propose_ngram", "verify"]
