"""The shared-memory transport's own guarantees (tcp.py's shm branch, shm.py): a decode side that never acks leaves
no segment behind and the export to its timeout; a segment gone before it is mapped fails the fetch cleanly;
segments of dead processes are swept; --kv-transfer shm refuses a peer on another host; a failed import still
unmaps its segment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from ernie45.disagg import DisaggConfig, shm
from ernie45.disagg import core as disagg_core
from ernie45.disagg.connector import TransferError
from ernie45.disagg.core import DisaggCore
from ernie45.disagg.wire import recv_frame, send_frame

from .test_kv_transfer import PROMPT, _engine, _import, _run, checkpoint, our_segments  # noqa: F401 (fixture)


@pytest.fixture
def prefill(checkpoint):  # noqa: F811 (the fixture above)
    core = DisaggCore(_engine(checkpoint), DisaggConfig(role="prefill", export_timeout_s=0.5), print)
    yield core
    core.close()
    assert our_segments() == []


def _connect(core: DisaggCore) -> socket.socket:
    host, _, port = core.kv_address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_a_decode_side_that_never_acks_leaves_no_segment(prefill):
    _run(prefill.engine, prefill, "r1", PROMPT, 1)
    with _connect(prefill) as sock:
        send_frame(sock, {"op": "meta", "transfer_id": "r1"})
        meta, _ = recv_frame(sock)
        assert meta["ok"] and meta["host_id"] == shm.host_id()
        send_frame(sock, {"op": "get", "first": 1, "transport": "shm"})
        reply, payload = recv_frame(sock)
        assert reply["ok"] and reply["num_blocks"] == 3 and not payload
        assert our_segments() == [reply["shm"]]  # created, the name sent; then the peer goes away
    deadline = time.monotonic() + 10
    while our_segments() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert our_segments() == []
    # Not consumed: the export stays until its timeout, then its blocks are free.
    assert prefill.stats()["kv_exports_pending"] == 1
    time.sleep(0.6)
    prefill.poll()
    assert prefill.engine.block_manager.num_free_blocks == prefill.engine.num_kv_blocks
    assert prefill.stats()["kv_exports_expired"] == 1


def test_a_segment_gone_before_it_is_mapped_fails_the_fetch(prefill, checkpoint, monkeypatch):  # noqa: F811
    decode = DisaggCore(_engine(checkpoint), DisaggConfig(role="decode", kv_transfer="shm"), print)
    try:
        _run(prefill.engine, prefill, "r2", PROMPT, 1)
        real = shm.Mapped.__init__

        def late(self, name, nbytes, shm_dir=shm.SHM_DIR):
            (shm_dir / name).unlink()
            real(self, name, nbytes, shm_dir)

        monkeypatch.setattr(shm.Mapped, "__init__", late)
        with pytest.raises(TransferError, match="No such file"):
            decode.connector.fetch(prefill.kv_address, "r2", lambda tokens: 0)
        assert decode.engine.block_manager.num_free_blocks == decode.engine.num_kv_blocks
    finally:
        decode.close()


def test_a_failed_import_unmaps_its_segment(prefill, checkpoint, monkeypatch):  # noqa: F811
    replies = []
    decode = DisaggCore(_engine(checkpoint), DisaggConfig(role="decode", kv_transfer="shm"), replies.append)
    released = []
    real_release = shm.Mapped.release
    monkeypatch.setattr(shm.Mapped, "release", lambda self: (released.append(1), real_release(self)))
    monkeypatch.setattr(disagg_core, "unpack_into", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk")))
    try:
        _run(prefill.engine, prefill, "r3", PROMPT, 1)
        reply = _import(decode, replies, prefill.kv_address, "r3")
        assert not reply["ok"] and "import failed" in reply["error"] and released == [1]
        assert decode.engine.block_manager.num_free_blocks == decode.engine.num_kv_blocks
    finally:
        decode.close()


def test_shm_only_refuses_a_peer_on_another_host(prefill, checkpoint):  # noqa: F811
    decode = DisaggCore(_engine(checkpoint), DisaggConfig(role="decode", kv_transfer="shm"), print)
    try:
        decode.connector.host_id = "another-host"
        _run(prefill.engine, prefill, "r4", PROMPT, 1)
        with pytest.raises(TransferError, match="does not share"):
            decode.connector.fetch(prefill.kv_address, "r4", lambda tokens: 0)
    finally:
        decode.close()
    with pytest.raises(ValueError, match="kv_transfer"):
        DisaggConfig(kv_transfer="rdma")


def test_segments_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f"ernie45-kv-{int(dead.stdout)}-0"
    live = tmp_path / f"ernie45-kv-{os.getpid()}-7"
    other = tmp_path / "someone-else"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert shm.sweep_stale(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
