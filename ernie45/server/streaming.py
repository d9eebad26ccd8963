"""Server-sent events: the `data: {...}` framing, a response that always closes its stream, a merge of several
request streams (a completions request with several prompts), and cancelling a non-streamed request whose client
has gone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that closes its iterator however the response ends.

    Starlette cancels the sending task when the client disconnects; if that happens while the task awaits `send`,
    the generator is left suspended and would only be closed by the garbage collector. Closing it here, at once,
    runs the handlers' `finally` blocks, which abort the request in the engine and free its KV blocks.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self._on_close is not None:
                    self._on_close()


async def merge(streams: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Yield (stream index, item) as items arrive from any stream; the first error is raised; leaving early (or an
    error) closes every stream."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()
            queue.put_nowait((index, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (closing its streams aborts the engine requests and
    frees their KV blocks) and raise ClientDisconnected. The request body must have been read already."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():  # the client went first
        raise ClientDisconnected()
    return task.result()
