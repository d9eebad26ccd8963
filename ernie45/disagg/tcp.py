"""The TCP KV connector: a threaded server in the prefill instance's engine core, a blocking client in the decode
instance's (run on a fetch thread, never on the core's step loop).

One connection per fetch:
    D -> P {"op": "meta", "transfer_id"}                P -> D {"ok", "token_ids", "layout", "host_id"}
    D -> P {"op": "get", "first": k, "transport": "tcp"} P -> D {"ok", "num_blocks"} + packed blocks k..
or, when the decode side sees the same host_id (shm.py) and its --kv-transfer is auto or shm:
    D -> P {"op": "get", "first": k, "transport": "shm"} P -> D {"ok", "num_blocks", "shm": name, "nbytes"}
    D maps the segment -> P {"op": "mapped"}              P unlinks it (also on a timeout or a dropped connection)
The export is marked consumed once the blocks are sent (over shm: once D mapped them); a connection that drops
earlier leaves it to its timeout.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import shm
from .connector import TRANSFERS, Fetched, KVConnector, TransferError
from .exports import ExportTable
from .wire import layout_of, pack_blocks, recv_frame, send_frame

logger = logging.getLogger("ernie45.disagg")


class TcpConnector(KVConnector):
    def __init__(self, cache, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0,
                 transfer: str = "auto", shm_dir: Path = shm.SHM_DIR):
        """`transfer`: how this side fetches: auto (shared memory when the peer shares this host's tmpfs, else
        the TCP stream), shm (shared memory only: a peer elsewhere fails the fetch), tcp (the stream always)."""
        if transfer not in TRANSFERS:
            raise ValueError(f"kv transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
        self.cache = cache
        self.layout = layout_of(cache)
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.transfer = transfer
        self.shm_dir = shm_dir
        self.host_id = shm.host_id(shm_dir)
        if transfer == "shm" and self.host_id is None:
            raise ValueError(f"--kv-transfer shm: {shm_dir} is not usable here; use tcp")
        self._server: socketserver.ThreadingTCPServer | None = None

    # ----------------------------------------------------------------------------------------- serving side
    def start(self, exports: ExportTable, cache) -> str:
        connector = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(connector.timeout_s)
                try:
                    connector._serve_one(self.request, exports, cache)
                except (OSError, ConnectionError, ValueError) as exc:
                    logger.warning("a KV transfer connection failed: %s", exc)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        if self.host_id is not None:
            removed = shm.sweep_stale(self.shm_dir)
            if removed:
                logger.warning("removed %d KV segments left in %s by processes that are gone", removed, self.shm_dir)
        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="ernie45-kv-server", daemon=True).start()
        return f"{self.host}:{self.port}"

    def _serve_one(self, sock: socket.socket, exports: ExportTable, cache) -> None:
        header, _ = recv_frame(sock)
        if header.get("op") != "meta":
            send_frame(sock, {"ok": False, "error": f"expected op meta, got {header.get('op')!r}"})
            return
        export = exports.begin_read(str(header.get("transfer_id")))
        if export is None:
            send_frame(sock, {"ok": False, "error": f"no export {header.get('transfer_id')!r} (unknown, expired "
                                                    "or already fetched)"})
            return
        consumed = False
        try:
            send_frame(sock, {"ok": True, "token_ids": export.token_ids, "layout": layout_of(cache),
                              "host_id": self.host_id})
            header, _ = recv_frame(sock)
            first = int(header.get("first", 0))
            if header.get("op") != "get" or not 0 <= first <= len(export.block_ids):
                send_frame(sock, {"ok": False, "error": f"bad get request {header!r}"})
                return
            block_ids = export.block_ids[first:]
            if header.get("transport") == "shm" and block_ids:
                consumed = self._serve_shm(sock, cache, block_ids)
                return
            payload = pack_blocks(cache, block_ids)
            send_frame(sock, {"ok": True, "num_blocks": len(block_ids)}, payload.numpy())
            consumed = True
        finally:
            exports.end_read(export, consumed)

    def _serve_shm(self, sock: socket.socket, cache, block_ids: list[int]) -> bool:
        """The blocks in a fresh segment; True once the decode side mapped it. The segment is unlinked here
        whatever happens: the decode side's mapping outlives the name."""
        try:
            segment = shm.Segment(cache, block_ids, self.shm_dir)
        except OSError as exc:  # /dev/shm full or gone: say so, the decode side recomputes
            send_frame(sock, {"ok": False, "error": f"no shared-memory segment: {exc}"})
            return False
        try:
            send_frame(sock, {"ok": True, "num_blocks": len(block_ids), "shm": segment.name,
                              "nbytes": segment.nbytes})
            header, _ = recv_frame(sock)
            return header.get("op") == "mapped"
        finally:
            segment.unlink()

    # ----------------------------------------------------------------------------------------- fetching side
    def fetch(self, source: str, transfer_id: str, num_held: Callable[[list[int]], int]) -> Fetched:
        host, _, port = source.rpartition(":")
        start = time.perf_counter()
        try:
            with socket.create_connection((host, int(port)), timeout=self.timeout_s) as sock:
                send_frame(sock, {"op": "meta", "transfer_id": transfer_id})
                meta, _ = recv_frame(sock)
                if not meta.get("ok"):
                    raise TransferError(meta.get("error", "the prefill instance refused the fetch"))
                if meta["layout"] != self.layout:
                    raise TransferError(f"KV layouts differ: prefill {meta['layout']}, decode {self.layout}")
                token_ids = meta["token_ids"]
                transport = self._transport(meta.get("host_id"))
                first = num_held(token_ids)
                send_frame(sock, {"op": "get", "first": first, "transport": transport})
                reply, payload = recv_frame(sock)
                if not reply.get("ok"):
                    raise TransferError(reply.get("error", "the prefill instance refused the blocks"))
                release = None
                if "shm" in reply:
                    mapped = shm.Mapped(str(reply["shm"]), int(reply["nbytes"]), self.shm_dir)
                    payload, release = mapped.buffer, mapped.release
                    try:
                        send_frame(sock, {"op": "mapped"})
                    except BaseException:
                        release()
                        raise
                else:
                    transport = "tcp"  # nothing to map (no blocks past the held ones)
        except (OSError, ConnectionError, ValueError, KeyError) as exc:
            raise TransferError(f"fetching {transfer_id} from {source} failed: {exc}") from exc
        return Fetched(token_ids, first, int(reply["num_blocks"]), payload, time.perf_counter() - start,
                       transport, release)

    def _transport(self, peer_host_id: str | None) -> str:
        same_host = self.host_id is not None and peer_host_id == self.host_id
        if self.transfer == "shm" and not same_host:
            raise TransferError("--kv-transfer shm, but the prefill instance does not share this host's "
                                f"{self.shm_dir} (use auto or tcp)")
        return "shm" if same_host and self.transfer != "tcp" else "tcp"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
