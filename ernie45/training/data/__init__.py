"""Training data: ERNIEKit-format readers, chat-template encoding with assistant-only loss, packing, batching."""

from .dataset import EvalData, TrainData
from .encode import Encoder, PairSample, Sample
from .packing import Packed, collate, collate_pairs, pack
from .readers import Conversation, DataError, Preference, ReadStats, TextDoc, read_records

__all__ = [
    "Conversation", "DataError", "Encoder", "EvalData", "Packed", "PairSample", "Preference", "ReadStats", "Sample",
    "TextDoc", "TrainData", "collate", "collate_pairs", "pack", "read_records",
]
