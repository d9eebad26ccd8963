"""The KV connector interface: how exported blocks get from a prefill instance to a decode instance.

The engine core owns the block pool; a connector only moves bytes. Serving side: `start(exports, cache)` serves
the `ExportTable`'s exports and returns the address a decode instance fetches from. Fetching side:
`fetch(source, transfer_id, num_held)` asks for an export's tokens, lets `num_held(token_ids)` say how many
leading blocks the caller already holds (its prefix cache), and returns only the rest. Implementation:
`tcp.TcpConnector`, whose blocks travel in the TCP stream or, between two processes on one host, in a
shared-memory segment (shm.py) while the stream carries only the control messages; an RDMA one would implement
the same three methods.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

TRANSFERS = ("auto", "shm", "tcp")

from .exports import ExportTable


class TransferError(RuntimeError):
    """A fetch failed (unknown or expired export, a layout mismatch, a dead peer)."""


@dataclass
class Fetched:
    """What a fetch brought back: blocks `first ..` of the export's token ids, packed (wire.pack_blocks) in a
    buffer (a bytearray, or a shared-memory mapping: then `close` must be called once the import is done)."""

    token_ids: list[int]
    first: int
    num_blocks: int
    payload: bytearray
    seconds: float
    transport: str = "tcp"
    release: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def close(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None
        self.payload = bytearray()


class KVConnector(abc.ABC):
    @abc.abstractmethod
    def start(self, exports: ExportTable, cache) -> str:
        """Start serving `exports` (read from `cache`); returns the address to fetch from ("host:port")."""

    @abc.abstractmethod
    def fetch(self, source: str, transfer_id: str, num_held: Callable[[list[int]], int]) -> Fetched:
        """Blocks of export `transfer_id` at `source` past the first `num_held(token_ids)`; raises TransferError.
        The export is released on the serving side once this returns."""

    @abc.abstractmethod
    def close(self) -> None: ...
