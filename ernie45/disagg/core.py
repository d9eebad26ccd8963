"""The engine core's side of disaggregation: exports on a prefill instance, imports on a decode instance, the
role, and the counters /metrics shows. Everything that touches the block pool or the KV cache's writes runs on the
core's own thread (`poll`, `after_step`, `handle`); fetches run on threads of their own and hand their bytes back.

Export (role prefill): when a request finishes, its prompt's full blocks (all but the one holding the last prompt
token, which the decode side recomputes, as vLLM's example connector does) are still in the prefix cache; they are
pinned under `kv-export:<request id>` and served until fetched or `export_timeout_s`.

Import (any role): the fetch asks how many leading blocks the prefix cache already holds and brings only the rest
(through a shared-memory segment when both instances are on one host, else in the TCP stream: tcp.py);
the core then allocates blocks for them, writes the bytes and registers them in the prefix cache under the chain
hashes of their tokens, held under `kv-import:<key>` until a request takes them (its admission adds a reference to
the last one) or `import_hold_s` passes. The request itself then goes through the normal scheduler: its prefix
hits the imported blocks. A fetch or import that fails leaves nothing allocated, and the request simply recomputes.

Replies to the serving process are ("reply", key, dict) messages (`MPEngineClient` delivers them by key).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from .config import ROLES, DisaggConfig
from .connector import Fetched, TransferError
from .exports import ExportTable
from .tcp import TcpConnector
from .wire import unpack_into

logger = logging.getLogger("ernie45.disagg")

MESSAGE_KINDS = ("kv_import", "set_role", "disagg_info")


class DisaggCore:
    def __init__(self, engine, config: DisaggConfig, send: Callable[[tuple], None]):
        if not engine.config.enable_prefix_caching:
            raise ValueError("prefill/decode disaggregation needs prefix caching (blocks are keyed by their chain "
                             "hashes): drop --no-enable-prefix-caching")
        self.engine = engine
        self.config = config
        self.role = config.role
        self._send = send
        self.exports = ExportTable(config.export_timeout_s)
        self.connector = TcpConnector(engine.cache, config.kv_host, config.kv_port, config.fetch_timeout_s,
                                      config.kv_transfer)
        self.kv_address = self.connector.start(self.exports, engine.cache)
        self._fetched: queue.SimpleQueue = queue.SimpleQueue()  # (key, Fetched | Exception) from fetch threads
        self._num_fetching = 0
        self._holders: dict[str, tuple[int, float]] = {}  # holder id -> (its last block, deadline)
        self.counters = dict.fromkeys((
            "kv_exports", "kv_exports_expired", "kv_export_blocks", "kv_imports", "kv_imports_failed",
            "kv_import_blocks", "kv_import_blocks_cached", "kv_import_bytes", "kv_import_bytes_shm"), 0)
        self.import_seconds = 0.0
        logger.info("disaggregation: role %s, KV transfer server on %s", self.role, self.kv_address)

    # ----------------------------------------------------------------------------------------- messages
    def handles(self, kind: str) -> bool:
        return kind in MESSAGE_KINDS

    def handle(self, message: tuple) -> None:
        kind, key = message[0], message[1]
        if kind == "kv_import":
            source, transfer_id = message[2], message[3]
            self._num_fetching += 1
            threading.Thread(target=self._fetch, args=(key, source, transfer_id), daemon=True,
                             name="ernie45-kv-fetch").start()
        elif kind == "set_role":
            role = message[2]
            if role not in ROLES:
                self._send(("reply", key, {"ok": False, "error": f"role must be one of {', '.join(ROLES)}"}))
                return
            logger.info("role %s -> %s", self.role, role)
            self.role = role
            self._send(("reply", key, {"ok": True, **self.info()}))
        elif kind == "disagg_info":
            self._send(("reply", key, {"ok": True, **self.info()}))

    def info(self) -> dict:
        return {"role": self.role, "kv_address": self.kv_address, **self.stats()}

    @property
    def busy(self) -> bool:
        """A fetch is in flight: the core loop should poll for its result often."""
        return self._num_fetching > 0

    def stats(self) -> dict:
        return {**self.counters, "kv_exports_pending": len(self.exports), "kv_imports_held": len(self._holders),
                "kv_import_seconds": self.import_seconds, "disagg_role": self.role}

    # ----------------------------------------------------------------------------------------- export
    def after_step(self, outputs) -> None:
        if self.role != "prefill":
            return
        for output in outputs:
            if output.finished and len(output.outputs) == 1 and output.outputs[0].finish_reason != "abort":
                self._export(output.request_id, output.prompt_token_ids)

    def _export(self, request_id: str, token_ids: list[int]) -> None:
        bm = self.engine.block_manager
        blocks, num_tokens = bm.get_computed_blocks(token_ids, record_stats=False)
        holder = f"kv-export:{request_id}"
        if bm.has_request(holder) or (blocks and not bm.allocate_slots(holder, num_tokens, blocks)):
            return
        # A prompt shorter than a block + 1 exports nothing, but its (empty) export still answers the fetch.
        self.exports.add(request_id, list(token_ids[:num_tokens]), blocks)
        self.counters["kv_exports"] += 1
        self.counters["kv_export_blocks"] += len(blocks)

    # ----------------------------------------------------------------------------------------- import
    def _num_held(self, token_ids: list[int]) -> int:
        """Leading blocks of `token_ids` the prefix cache holds now (read from the fetch thread: a lookup only,
        and the import re-checks on the core's thread)."""
        blocks, _ = self.engine.block_manager.get_computed_blocks([*token_ids, 0], record_stats=False)
        return len(blocks)

    def _fetch(self, key: str, source: str, transfer_id: str) -> None:
        try:
            result: Fetched | Exception = self.connector.fetch(source, transfer_id, self._num_held)
        except TransferError as exc:
            result = exc
        except Exception as exc:  # any failure of a fetch fails that import only
            logger.exception("KV fetch %s failed", transfer_id)
            result = exc
        self._fetched.put((key, result))

    def poll(self) -> bool:
        """Finish fetched imports, free consumed or expired exports and released import holds; True when
        anything changed."""
        changed = False
        while True:
            try:
                key, result = self._fetched.get_nowait()
            except queue.Empty:
                break
            self._num_fetching -= 1
            changed = True
            try:
                reply = self._import(key, result)
            finally:
                if isinstance(result, Fetched):
                    result.close()  # a shared-memory mapping is unmapped whether or not the import worked
            self._send(("reply", key, reply))
        bm = self.engine.block_manager
        for export in self.exports.take_releasable():
            bm.free(f"kv-export:{export.transfer_id}")
            changed = True
        self.counters["kv_exports_expired"] = self.exports.num_expired
        now = time.monotonic()
        for holder, (last_block, deadline) in list(self._holders.items()):
            # A request admitted onto these blocks holds the last one too; then the hold has done its job.
            if bm.blocks[last_block].ref_count > 1 or now >= deadline:
                bm.free(holder)
                del self._holders[holder]
                changed = True
        return changed

    def _import(self, key: str, fetched: Fetched | Exception) -> dict:
        if isinstance(fetched, Exception):
            self.counters["kv_imports_failed"] += 1
            return {"ok": False, "error": str(fetched)}
        bm, cache = self.engine.block_manager, self.engine.cache
        bs = cache.block_size
        tokens = fetched.token_ids
        total = len(tokens) // bs
        hits, _ = bm.get_computed_blocks([*tokens, 0], record_stats=False)
        num = total if len(hits) >= fetched.first else len(hits)  # a held block evicted meanwhile breaks the chain
        holder = f"kv-import:{key}"
        reply = {"ok": True, "num_blocks": total, "blocks_cached": min(len(hits), num),
                 "blocks_imported": 0, "bytes": fetched.nbytes, "fetch_seconds": fetched.seconds,
                 "transport": fetched.transport}
        if num == 0 or bm.has_request(holder):
            return reply
        if not bm.allocate_slots(holder, num * bs, hits[:num]):
            self.counters["kv_imports_failed"] += 1
            return {**reply, "ok": False, "error": "the decode instance's KV pool is full"}
        try:
            new_blocks = bm.block_table(holder)[len(hits):num]
            unpack_into(cache, new_blocks, fetched.payload, first=len(hits) - fetched.first)
            bm.cache_full_blocks(holder, tokens, num * bs)
        except Exception as exc:  # a failed import frees what it allocated; the request recomputes
            logger.exception("KV import %s failed", key)
            bm.free(holder)
            self.counters["kv_imports_failed"] += 1
            return {**reply, "ok": False, "error": f"import failed: {exc}"}
        self._holders[holder] = (bm.block_table(holder)[-1], time.monotonic() + self.config.import_hold_s)
        self.counters["kv_imports"] += 1
        self.counters["kv_import_blocks"] += len(new_blocks)
        self.counters["kv_import_blocks_cached"] += min(len(hits), num)
        self.counters["kv_import_bytes"] += fetched.nbytes
        if fetched.transport == "shm":
            self.counters["kv_import_bytes_shm"] += fetched.nbytes
        self.import_seconds += fetched.seconds
        return {**reply, "blocks_imported": len(new_blocks)}

    def close(self) -> None:
        self.connector.close()
