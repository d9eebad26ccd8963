"""Prefill/decode disaggregation: a prefill instance exports a finished prompt's KV blocks, a decode instance
imports the ones it lacks into its paged cache (keyed by the prefix cache's block chain hashes) and continues.

`config.DisaggConfig` (roles, timeouts, transport), `connector.KVConnector` (how blocks move; `tcp.TcpConnector` is
the implementation: blocks in the TCP stream, or in a shared-memory segment (`shm`) between processes on one host), `exports.ExportTable` (pinned exports and their timeouts), `core.DisaggCore` (the engine core's
side: export, import, role), `routes.mount_disagg` (the HTTP endpoints of `ernie45 serve --role`).
"""

from .config import ROLES, DisaggConfig

__all__ = ["ROLES", "DisaggConfig"]
