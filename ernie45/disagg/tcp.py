"""The TCP KV connector: a threaded server in the prefill instance's engine core, a blocking client in the decode
instance's (run on a fetch thread, never on the core's step loop).

One connection per fetch:  D -> P {"op": "meta", "transfer_id"}   P -> D {"ok", "token_ids", "layout"}
                           D -> P {"op": "get", "first": k}       P -> D {"ok", "num_blocks"} + packed blocks k..
The export is marked consumed once the blocks are sent; a connection that drops earlier leaves it to its timeout.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable

from .connector import Fetched, KVConnector, TransferError
from .exports import ExportTable
from .wire import layout_of, pack_blocks, recv_frame, send_frame

logger = logging.getLogger("ernie45.disagg")


class TcpConnector(KVConnector):
    def __init__(self, cache, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0):
        self.cache = cache
        self.layout = layout_of(cache)
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
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
            send_frame(sock, {"ok": True, "token_ids": export.token_ids, "layout": layout_of(cache)})
            header, _ = recv_frame(sock)
            first = int(header.get("first", 0))
            if header.get("op") != "get" or not 0 <= first <= len(export.block_ids):
                send_frame(sock, {"ok": False, "error": f"bad get request {header!r}"})
                return
            payload = pack_blocks(cache, export.block_ids[first:])
            send_frame(sock, {"ok": True, "num_blocks": len(export.block_ids) - first}, payload.numpy())
            consumed = True
        finally:
            exports.end_read(export, consumed)

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
                first = num_held(token_ids)
                send_frame(sock, {"op": "get", "first": first})
                reply, payload = recv_frame(sock)
                if not reply.get("ok"):
                    raise TransferError(reply.get("error", "the prefill instance refused the blocks"))
        except (OSError, ConnectionError, ValueError, KeyError) as exc:
            raise TransferError(f"fetching {transfer_id} from {source} failed: {exc}") from exc
        return Fetched(token_ids, first, int(reply["num_blocks"]), payload, time.perf_counter() - start)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
