"""Exports of a prefill instance: a finished request's prompt blocks, pinned in the block pool until a decode
instance fetched them or the export timed out.

The engine core's thread adds exports and frees them (the block manager is single-threaded); the transfer
server's threads read them. A read marks its export busy, so the core never frees blocks being copied; a read
that ends consumed (the decode side got its bytes) or an expired export is handed back to the core by
`take_releasable`, which the core then frees.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Export:
    transfer_id: str
    token_ids: list[int]
    """The tokens the exported blocks cover (whole blocks: len = blocks * block_size)."""
    block_ids: list[int]
    deadline: float
    reading: bool = False
    consumed: bool = False


class ExportTable:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}
        self.num_expired = 0

    # ----------------------------------------------------------------------------------- engine core's thread
    def add(self, transfer_id: str, token_ids: list[int], block_ids: list[int]) -> None:
        with self._lock:
            self._exports[transfer_id] = Export(transfer_id, token_ids, block_ids,
                                                time.monotonic() + self.timeout_s)

    def take_releasable(self, now: float | None = None) -> list[Export]:
        """Exports to free now: consumed ones, and expired ones no transfer is reading."""
        now = time.monotonic() if now is None else now
        done = []
        with self._lock:
            for tid, export in list(self._exports.items()):
                if export.reading:
                    continue
                if export.consumed or now >= export.deadline:
                    if not export.consumed:
                        self.num_expired += 1
                    done.append(self._exports.pop(tid))
        return done

    def __len__(self) -> int:
        with self._lock:
            return len(self._exports)

    # ----------------------------------------------------------------------------------- transfer threads
    def begin_read(self, transfer_id: str) -> Export | None:
        """The export, marked busy, or None when it is unknown, expired or being read by another transfer."""
        with self._lock:
            export = self._exports.get(transfer_id)
            if export is None or export.reading or export.consumed or time.monotonic() >= export.deadline:
                return None
            export.reading = True
            return export

    def end_read(self, export: Export, consumed: bool) -> None:
        with self._lock:
            export.reading = False
            export.consumed = export.consumed or consumed
