"""uvicorn's Server with the shutdown `ernie45 serve` wants: the first SIGINT/SIGTERM also starts the drain (stop the
engine after a grace period, which ends the requests still running), and a clean shutdown exits with status 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
logger = logging.getLogger("ernie45.server")


def stop_engine_later(loop: asyncio.AbstractEventLoop, front, delay: float) -> None:
    logger.info("shutting down: in-flight requests have %.1fs to finish", delay)
    loop.call_later(delay, lambda: loop.run_in_executor(None, front.shutdown))


class Server(uvicorn.Server):
    """uvicorn's Server, plus: the first signal also schedules `drain(loop)` on the event loop, and the signal is
    not re-raised after the graceful shutdown (uvicorn does, so the process would die of SIGTERM instead of
    exiting with status 0)."""

    def __init__(self, config: uvicorn.Config, drain=None):
        super().__init__(config)
        self._drain = drain
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        if self._drain is None or self._draining:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving yet
            return
        self._draining = True
        loop.call_soon_threadsafe(self._drain, loop)  # signal handlers must not touch the loop's state directly

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
