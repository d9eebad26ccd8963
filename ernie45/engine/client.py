"""`EngineClient`: what a server (or any asyncio caller) needs from an engine core, wherever the core runs.

generate / abort / stats / model info, plus the input processing that runs on the caller's side (tokenize, check,
process media) so the core only schedules, runs the model and samples. Two implementations: `AsyncLLM` (the core
on a thread of this process: notebooks, tests) and `MPEngineClient` (the core in its own process: `ernie45
serve`). Outputs come back through one asyncio.Queue per request; leaving a `generate` iteration early aborts the
request in the core, which frees its KV blocks.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .input_processor import EnginePrompt, InputProcessor
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine core stopped (shutdown, a crash of its process, or an unrecoverable error)."""


@dataclass
class ModelInfo:
    """What the client side knows about the served model (sent by the core once it has loaded it)."""

    model_config: object
    """The model's config object (vocab size, VL token ids and vision settings, ...)."""
    max_model_len: int
    source_dir: str | Path | None
    """The checkpoint directory (tokenizer, processors)."""
    num_kv_blocks: int
    is_multimodal: bool

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @classmethod
    def of_engine(cls, engine) -> ModelInfo:
        """From an `LLMEngine`."""
        return cls(model_config=engine.model.config, max_model_len=engine.max_model_len,
                   source_dir=getattr(engine.model, "source_dir", None), num_kv_blocks=engine.num_kv_blocks,
                   is_multimodal=engine.inputs.is_multimodal)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


class EngineClient(abc.ABC):
    """The common half of both clients: subscribers, the generate loop, input processing."""

    model_info: ModelInfo
    inputs: InputProcessor

    def __init__(self) -> None:
        self._subscribers: dict[str, _Subscriber] = {}
        self._ids = itertools.count()
        self._dead: EngineDeadError | None = None

    # ------------------------------------------------------------------------------------- to implement
    @abc.abstractmethod
    def _send_add(self, request_id: str, prompt: EnginePrompt, params: SamplingParams, arrival_time: float,
                  extra_keys: tuple) -> None: ...

    @abc.abstractmethod
    def _send_abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def stats(self) -> dict[str, float | int]:
        """Gauges and counters for metrics (the core's latest, read without waiting for it)."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core; requests still running end with EngineDeadError."""

    # ------------------------------------------------------------------------------------- public, asyncio
    @property
    def is_running(self) -> bool:
        return self._dead is None

    def validate_prompt(self, prompt) -> tuple[str | None, list[int]]:
        return self.inputs.validate_prompt(prompt)

    def prepare_multimodal(self, ids: list[int], data: dict):
        return self.inputs.prepare_multimodal(ids, data)

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None,
                       extra_keys: tuple = ()) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput after every step that advanced the request; the last one has finished=True.
        Leaving the iteration early (client gone, task cancelled) aborts the request and frees its KV blocks."""
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        params.verify_token_ids(self.model_info.vocab_size)  # bad input raises ValueError here, not in the core
        engine_prompt = self.inputs.process(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._subscribers:
            raise ValueError(f"request id {request_id!r} is already in use")
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        self._subscribers[request_id] = subscriber
        finished = False
        try:
            self._send_add(request_id, engine_prompt, params, time.time(), extra_keys)
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
            if not finished and self._dead is None:
                self._send_abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send_abort(request_id)

    def num_unfinished(self) -> int:
        return len(self._subscribers)

    # ------------------------------------------------------------------------------------- delivery
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """From any thread: hand an output (or the error that ends the request) to its subscriber."""
        subscriber = self._subscribers.get(request_id)
        if subscriber is not None:
            try:
                subscriber.loop.call_soon_threadsafe(subscriber.outputs.put_nowait, item)
            except RuntimeError:  # its event loop is closed: nobody is waiting any more
                self._subscribers.pop(request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._subscribers):
            self._deliver(request_id, error)
