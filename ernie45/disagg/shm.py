"""Same-host KV transfer through shared memory: the prefill side packs the blocks straight into a file on a tmpfs
(/dev/shm), the decode side maps it and writes the cache straight from the mapping. The TCP connection carries
only the control messages (tcp.py), so a run of blocks is copied twice (cache -> segment -> cache) instead of four
times through the loopback socket (cache -> packed tensor -> kernel -> receive buffer -> cache).

Lifetime of a segment (the prefill side owns its name):
  P creates `ernie45-kv-<pid>-<n>` (O_EXCL, mode 0600), packs, sends the name; D opens and maps it, then acks;
  P unlinks it on the ack, on a timeout or on a dropped connection (its `finally`), so the name never outlives
  the transfer; D's mapping stays valid after the unlink and is closed once the import wrote (or failed to write)
  the cache. A prefill process killed between create and unlink leaves its segment behind: the next connector
  started on the host removes segments whose creator pid is gone (`sweep_stale`).

"Same host" is decided by the decode side: both compute `host_id()` (boot id + the tmpfs's device and inode), so
two containers with their own /dev/shm never try to share one.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import threading
from pathlib import Path

import torch

from .wire import block_slots

SHM_DIR = Path("/dev/shm")
_PREFIX = "ernie45-kv-"
_NAME = re.compile(rf"^{_PREFIX}(\d+)-(\d+)$")
_counter = itertools.count()
_counter_lock = threading.Lock()


def host_id(shm_dir: Path = SHM_DIR) -> str | None:
    """Equal on two processes that see the same tmpfs on the same kernel; None: no shared memory here."""
    try:
        st = os.stat(shm_dir)
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def _new_name() -> str:
    with _counter_lock:
        return f"{_PREFIX}{os.getpid()}-{next(_counter)}"


def sweep_stale(shm_dir: Path = SHM_DIR) -> int:
    """Remove segments whose creating process no longer exists; returns how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for path in shm_dir.iterdir():
            match = _NAME.match(path.name)
            if not match or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _map(fd: int, nbytes: int) -> mmap.mmap:
    # MAP_POPULATE: the pages are mapped in one call rather than one fault per 4 KiB page.
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _view(buffer, cache, num_blocks: int) -> torch.Tensor:
    """The segment as [2 (K, V), layers, num_blocks * block_size, kv heads, head dim] in the cache's dtype."""
    L, _, K, D = cache.k.shape
    return torch.frombuffer(buffer, dtype=torch.uint8).view(cache.k.dtype).view(
        2, L, num_blocks * cache.block_size, K, D)


class Segment:
    """The prefill side's segment holding one packed run of blocks (the layout of wire.pack_blocks)."""

    def __init__(self, cache, block_ids: list[int], shm_dir: Path = SHM_DIR):
        self.name = _new_name()
        self.path = shm_dir / self.name
        self.nbytes = len(block_ids) * cache.k[:, :cache.block_size].numel() * 2 * cache.k.element_size()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)
            mapping = _map(fd, self.nbytes)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)
        try:
            kv = _view(mapping, cache, len(block_ids))
            slots = block_slots(block_ids, cache.block_size, cache.k.device)
            for i, src in enumerate((cache.k, cache.v)):
                if src.is_cpu:
                    torch.index_select(src, 1, slots, out=kv[i])  # straight into the segment: one copy
                else:
                    kv[i].copy_(src.index_select(1, slots))
            del kv
        except BaseException:
            self.unlink()
            raise
        finally:
            _close(mapping)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Mapped:
    """The decode side's mapping of a segment; the payload an import reads, closed by `release`."""

    def __init__(self, name: str, nbytes: int, shm_dir: Path = SHM_DIR):
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a KV segment name")
        fd = os.open(shm_dir / name, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != nbytes:
                raise ValueError(f"segment {name} holds {os.fstat(fd).st_size} bytes, expected {nbytes}")
            self.buffer = _map(fd, nbytes) if nbytes else bytearray()
        finally:
            os.close(fd)

    def release(self) -> None:
        if isinstance(self.buffer, mmap.mmap):
            _close(self.buffer)
        self.buffer = bytearray()


def _close(mapping: mmap.mmap) -> None:
    # A tensor still viewing the mapping (a traceback holding a frame) keeps it open; it unmaps when collected.
    with contextlib.suppress(BufferError):
        mapping.close()
