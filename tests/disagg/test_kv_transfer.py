"""The engine core's side of disaggregation in one process: two engines, their DisaggCores and the real TCP
connector on loopback, the blocks in the stream (tcp) or in a shared-memory segment (shm). Blocks arrive bit-exact
and the continued generation equals the unsplit one; failed imports (unknown export, a full pool, a layout
mismatch, a write that raises) leave the decode pool as it was; exports expire; the block manager's invariants hold
throughout, and no segment is left in /dev/shm."""

from __future__ import annotations

import os
import time

import pytest
import torch

from ernie45.disagg import DisaggConfig
from ernie45.disagg import core as disagg_core
from ernie45.disagg.core import DisaggCore
from ernie45.engine import EngineConfig, SamplingParams
from ernie45.engine.core_process import CoreLaunch, build_engine

from ..tiny_checkpoint import make_tiny_checkpoint

PROMPT = list(range(5, 5 + 16 * 4 + 3))  # 4 full blocks and a 3-token tail


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kv") / "tiny")


def _engine(checkpoint, **config):
    return build_engine(CoreLaunch(model=str(checkpoint), engine_config=EngineConfig(
        max_model_len=256, num_kv_blocks=config.pop("num_kv_blocks", 64), **config)))


def _run(engine, core, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(max_tokens=max_tokens,
                                                                                 temperature=0, ignore_eos=True))
    tokens = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if core is not None:
            core.poll()
            core.after_step(outputs)
        for out in outputs:
            if out.request_id == request_id and out.finished:
                tokens = out.outputs[0].token_ids
        engine.block_manager.check_invariants()
    return tokens


def _import(core: DisaggCore, replies: list, source: str, transfer_id: str) -> dict:
    core.handle(("kv_import", f"k-{transfer_id}", source, transfer_id))
    deadline = time.monotonic() + 20
    while not replies and time.monotonic() < deadline:
        core.poll()
        time.sleep(0.002)
    core.engine.block_manager.check_invariants()
    return replies.pop()[2]


def our_segments() -> list[str]:
    """Shared-memory KV segments this process (both sides of every pair here) created and did not unlink."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"ernie45-kv-{os.getpid()}-")]


@pytest.fixture(scope="module", params=["tcp", "shm"])
def pair(checkpoint, request):
    p_engine, d_engine = _engine(checkpoint), _engine(checkpoint)
    p_replies, d_replies = [], []
    p = DisaggCore(p_engine, DisaggConfig(role="prefill", export_timeout_s=0.5), p_replies.append)
    d = DisaggCore(d_engine, DisaggConfig(role="decode", kv_transfer=request.param), d_replies.append)
    yield p, d, d_replies
    p.close()
    d.close()
    assert our_segments() == []


def test_imported_blocks_are_bit_exact_and_generation_continues(pair, checkpoint):
    p, d, replies = pair
    reference = _run(_engine(checkpoint), None, "ref", PROMPT, 10)
    _run(p.engine, p, "r1", PROMPT, 1)
    assert p.stats()["kv_exports_pending"] == 1 and p.stats()["kv_export_blocks"] == 4
    reply = _import(d, replies, p.kv_address, "r1")
    assert reply["ok"] and (reply["blocks_imported"], reply["blocks_cached"]) == (4, 0)
    assert reply["transport"] == d.config.kv_transfer and our_segments() == []
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V x layers x block slots x kv heads x head dim x fp32
    assert reply["bytes"] == 4 * block_bytes
    p_blocks, _ = p.engine.block_manager.get_computed_blocks(PROMPT, record_stats=False)
    d_blocks, _ = d.engine.block_manager.get_computed_blocks(PROMPT, record_stats=False)
    assert len(d_blocks) == 4
    bs = 16
    for pb, db in zip(p_blocks, d_blocks):
        for name in ("k", "v"):
            src, dst = getattr(p.engine.cache, name), getattr(d.engine.cache, name)
            assert torch.equal(src[:, pb * bs:(pb + 1) * bs], dst[:, db * bs:(db + 1) * bs])
    p.poll()  # the fetched export is released
    assert p.engine.block_manager.num_free_blocks == p.engine.num_kv_blocks
    assert _run(d.engine, d, "r1", PROMPT, 10) == reference
    assert d.engine.block_manager.prefix_cache_hits >= 64  # the four imported blocks served the prompt
    assert d.stats()["kv_imports_held"] == 0  # released once the request took the blocks
    assert d.engine.block_manager.num_free_blocks == d.engine.num_kv_blocks

    # The same prefix again: nothing is moved, the import finds every block cached.
    _run(p.engine, p, "r2", PROMPT + [7], 1)
    reply = _import(d, replies, p.kv_address, "r2")
    assert (reply["blocks_imported"], reply["blocks_cached"], reply["bytes"]) == (0, 4, 0)
    d.poll()
    p.poll()


def test_failed_imports_leave_the_pool_as_it_was(pair, checkpoint, monkeypatch):
    p, d, replies = pair
    bm = d.engine.block_manager
    free = bm.num_free_blocks
    reply = _import(d, replies, p.kv_address, "never-exported")
    assert not reply["ok"] and "no export" in reply["error"] and bm.num_free_blocks == free

    other = [t + 100 for t in PROMPT]
    _run(p.engine, p, "r3", other, 1)
    monkeypatch.setattr(disagg_core, "unpack_into", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk")))
    reply = _import(d, replies, p.kv_address, "r3")
    assert not reply["ok"] and "import failed" in reply["error"]
    assert bm.num_free_blocks == free and not bm.has_request("kv-import:k-r3")
    assert bm.get_computed_blocks(other, record_stats=False) == ([], 0)  # nothing half-imported is hittable
    monkeypatch.undo()

    # A full pool: the allocation is refused whole.
    small = _engine(checkpoint, num_kv_blocks=16)
    small_replies = []
    core = DisaggCore(small, DisaggConfig(role="decode"), small_replies.append)
    try:
        assert small.block_manager.allocate_slots("hog", 14 * 16)
        _run(p.engine, p, "r4", other, 1)
        reply = _import(core, small_replies, p.kv_address, "r4")
        assert not reply["ok"] and "pool is full" in reply["error"]
        assert small.block_manager.num_free_blocks == 2
    finally:
        core.close()

    # Another block size: the layouts differ, nothing is copied.
    odd = _engine(checkpoint, block_size=8, num_kv_blocks=64)
    odd_replies = []
    core = DisaggCore(odd, DisaggConfig(role="decode"), odd_replies.append)
    try:
        _run(p.engine, p, "r5", other, 1)
        reply = _import(core, odd_replies, p.kv_address, "r5")
        assert not reply["ok"] and "layouts differ" in reply["error"]
        assert odd.block_manager.num_free_blocks == 64
    finally:
        core.close()
    assert d.stats()["kv_imports_failed"] == 2
    assert our_segments() == []


def test_unfetched_exports_expire(pair):
    p, _, _ = pair
    _run(p.engine, p, "orphan", [t + 200 for t in PROMPT], 1)
    assert p.engine.block_manager.num_free_blocks < p.engine.num_kv_blocks
    time.sleep(0.6)
    assert p.poll()
    assert p.engine.block_manager.num_free_blocks == p.engine.num_kv_blocks
    assert p.stats()["kv_exports_expired"] >= 1 and p.stats()["kv_exports_pending"] == 0
    p.engine.block_manager.check_invariants()


def test_prefix_caching_is_required(checkpoint):
    engine = _engine(checkpoint, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="needs prefix caching"):
        DisaggCore(engine, DisaggConfig(role="decode"), print)
