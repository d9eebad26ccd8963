"""Framing of the KV transfer protocol and the byte layout of a run of KV blocks.

A frame is `!II` (header length, payload length), a JSON header, then the raw payload. A run of m blocks is the
K then the V slots of those blocks, [2, layers, m * block_size, kv heads, head dim] in the cache's dtype, so the
sender reads it with one index_select per tensor and the receiver writes it with one index_copy_.
"""

from __future__ import annotations

import json
import socket
import struct

import torch

_HEAD = struct.Struct("!II")
_MAX_HEADER = 64 << 20  # token ids of a long prompt fit many times over; anything larger is not our peer


def send_frame(sock: socket.socket, header: dict, payload=b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    view = memoryview(payload).cast("B")
    sock.sendall(_HEAD.pack(len(head), view.nbytes) + head)
    if view.nbytes:
        sock.sendall(view)


def recv_frame(sock: socket.socket) -> tuple[dict, bytearray]:
    head_len, payload_len = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if head_len > _MAX_HEADER:
        raise ConnectionError(f"a {head_len}-byte frame header: not a KV transfer peer")
    header = json.loads(_recv_exact(sock, head_len))
    return header, _recv_exact(sock, payload_len)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        got += k
    return buf


def layout_of(cache) -> dict:
    """What both sides must agree on for blocks to be copied as bytes."""
    L, _, K, D = cache.k.shape
    return {"num_layers": L, "block_size": cache.block_size, "num_kv_heads": K, "head_dim": D,
            "dtype": str(cache.k.dtype).removeprefix("torch.")}


def block_slots(block_ids: list[int], block_size: int, device) -> torch.Tensor:
    base = torch.tensor(block_ids, dtype=torch.long, device=device)[:, None] * block_size
    return (base + torch.arange(block_size, device=device)[None, :]).reshape(-1)


def pack_blocks(cache, block_ids: list[int]) -> torch.Tensor:
    """The blocks' K and V as one contiguous uint8 CPU tensor (empty for no blocks)."""
    if not block_ids:
        return torch.empty(0, dtype=torch.uint8)
    slots = block_slots(block_ids, cache.block_size, cache.k.device)
    kv = torch.stack([cache.k.index_select(1, slots), cache.v.index_select(1, slots)])
    return kv.cpu().contiguous().view(torch.uint8).reshape(-1)


def unpack_into(cache, block_ids: list[int], payload: bytearray, first: int = 0) -> None:
    """Write blocks `first .. first + len(block_ids)` of a packed run into the cache's `block_ids`."""
    if not block_ids:
        return
    L, _, K, D = cache.k.shape
    bs = cache.block_size
    dtype = cache.k.dtype
    total = len(payload) // (2 * L * bs * K * D * cache.k.element_size())
    kv = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(2, L, total * bs, K, D)
    kv = kv[:, :, first * bs:(first + len(block_ids)) * bs].to(cache.k.device)
    slots = block_slots(block_ids, bs, cache.k.device)
    cache.k.index_copy_(1, slots, kv[0])
    cache.v.index_copy_(1, slots, kv[1])
