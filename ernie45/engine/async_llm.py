"""Asyncio front of the engine for servers: add a request, stream its outputs, abort it.

The engine runs on one background thread and is touched only there: coroutines validate a request in place (so
bad input fails at once), then hand it over through a thread-safe inbox; outputs come back through each request's
asyncio.Queue via `call_soon_threadsafe`. The event loop never waits for a model step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shutdown or an unrecoverable error)."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", id, prompt, params) | ("abort", id)
        self._subscribers: dict[str, _Subscriber] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ernie45-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- public, asyncio
    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None,
                       extra_keys: tuple = ()) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput after every step that advanced the request; the last one has finished=True.
        Leaving the iteration early (client gone, task cancelled) aborts the request and frees its KV blocks."""
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        params.verify_token_ids(self.engine.model.config.vocab_size)  # bad input raises ValueError here
        text, ids = self.engine.validate_prompt(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        self._subscribers[request_id] = subscriber
        engine_prompt = {"prompt_token_ids": ids, "prompt": text}
        if isinstance(prompt, dict):  # VL media travel with the prompt
            engine_prompt.update({k: prompt[k] for k in ("multi_modal_data", "multi_modal_inputs") if prompt.get(k)})
        self._send(("add", request_id, engine_prompt, params, extra_keys))
        finished = False
        try:
            while True:
                item = await subscriber.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._subscribers.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def num_unfinished(self) -> int:
        return len(self._subscribers)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running are aborted and their streams end with EngineDeadError."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------- engine thread
    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                _, request_id, prompt, params, extra_keys = message
                if request_id not in self._subscribers:
                    continue  # the client left before the engine saw it
                try:
                    self.engine.add_request(request_id, prompt, params, extra_keys=extra_keys)
                except Exception as exc:  # e.g. a duplicate id: reported to that request only
                    self._deliver(request_id, exc)
            else:
                self.engine.abort_request(message[1])

    def _deliver(self, request_id: str, item) -> None:
        subscriber = self._subscribers.get(request_id)
        if subscriber is not None:
            subscriber.loop.call_soon_threadsafe(subscriber.outputs.put_nowait, item)

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step must not take the server down: fail its requests, go on
                logger.exception("engine step failed; aborting the running requests")
                for request_id in list(self._subscribers):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, RuntimeError(f"engine step failed: {exc}"))
                continue
            for output in outputs:
                self._deliver(output.request_id, output)
        for request_id in list(self._subscribers):
            self.engine.abort_request(request_id)
            self._deliver(request_id, EngineDeadError("the engine shut down"))
