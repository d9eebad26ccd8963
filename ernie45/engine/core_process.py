"""The engine core's own process: load the model, then loop { take requests and aborts from the client, step,
send the outputs back }.

Messages are pickled tuples over two ZeroMQ sockets (client -> core: input; core -> client: output), ipc:// in a
private temporary directory. Both ends are our own processes on one host, and a message holds engine dataclasses
and, for VL prompts, processed pixel tensors, which pickle (protocol 5) carries without conversion.

    client -> core: ("add", request_id, EnginePrompt, SamplingParams, arrival_time, extra_keys)
                    ("abort", request_id)  ("shutdown",)
    core -> client: ("ready", ModelInfo, stats)  ("failed", error type, message)
                    ("outputs", [RequestOutput], stats)  ("stats", stats)  ("error", request_id, kind, message)

The core stops on "shutdown", when the client's process disappears (it polls its parent's pid while idle and between
steps), or never on its own: a failed step fails the requests it held and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from dataclasses import dataclass, field

from .client import ModelInfo
from .engine_config import EngineConfig

logger = logging.getLogger("ernie45.engine.core")

_IDLE_POLL_MS = 500  # how often an idle core checks that its client is still alive
_CONNECTOR_POLL_MS = 2  # how often a core with a KV fetch in flight looks for its result


@dataclass
class CoreLaunch:
    """What the core process needs to build its engine (picklable: it crosses the process boundary)."""

    model: str
    """A checkpoint directory or hub id (already resolved: the embedded default model's path when none)."""
    dtype: str = "auto"
    device: str = "cpu"
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    threads: int | None = None
    """torch CPU threads of the core (None: torch's choice)."""
    tokenizer: str | None = None
    log_level: str = "INFO"
    disagg: object | None = None
    """Prefill/decode disaggregation settings (`ernie45.disagg.DisaggConfig`); None: a plain mixed instance."""


def encode(message: tuple) -> bytes:
    return pickle.dumps(message, protocol=5)


def decode(data: bytes) -> tuple:
    return pickle.loads(data)  # both ends are this package's processes (module docstring)


def build_engine(launch: CoreLaunch):
    import torch

    from ..parallel import load_engine_model
    from ..tokenizer import load_tokenizer
    from .llm_engine import LLMEngine

    if launch.threads:
        torch.set_num_threads(launch.threads)
    model = load_engine_model(launch.model, launch.dtype, launch.device, launch.engine_config)
    tokenizer = load_tokenizer(launch.tokenizer or model.source_dir)
    return LLMEngine(model, tokenizer, launch.engine_config)


def run_engine_core(launch: CoreLaunch, input_address: str, output_address: str, parent_pid: int) -> None:
    """The process's entry point (multiprocessing, spawn)."""
    import zmq

    # Ctrl-C reaches the whole process group; the client decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=launch.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_address)
    try:
        try:
            engine = build_engine(launch)
            connector = None
            if launch.disagg is not None:
                from ..disagg.core import DisaggCore

                connector = DisaggCore(engine, launch.disagg, lambda message: outbox.send(encode(message)))
        except Exception as exc:  # reported to the client, which raises it where the user sees it
            logger.exception("the engine core could not start")
            outbox.send(encode(("failed", type(exc).__name__, str(exc))))
            return
        outbox.send(encode(("ready", ModelInfo.of_engine(engine), engine.stats())))
        try:
            EngineCoreLoop(engine, inbox, outbox, parent_pid, connector).run()
        finally:
            if connector is not None:
                connector.close()
    finally:
        outbox.close(linger=2000)
        inbox.close(linger=0)
        context.term()


class EngineCoreLoop:
    def __init__(self, engine, inbox, outbox, parent_pid: int, connector=None):
        self.engine = engine
        self.connector = connector
        """ernie45.disagg.core.DisaggCore (KV export / import, role) or None."""
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            busy = self.engine.has_unfinished_requests()
            fetching = self.connector is not None and self.connector.busy
            self._take_messages(wait_ms=0 if busy else _CONNECTOR_POLL_MS if fetching else _IDLE_POLL_MS)
            if self.connector is not None and self.connector.poll():
                self.outbox.send(encode(("stats", self._stats())))  # freed blocks show on /metrics while idle
            if os.getppid() != self.parent_pid:
                logger.warning("the client process is gone; the engine core exits")
                return
            if self.stopping or not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails its requests; the core keeps serving
                logger.exception("engine step failed; aborting the running requests")
                self._fail_running(f"engine step failed: {exc}")
                if getattr(exc, "engine_unusable", False):  # a tensor-parallel worker died: exit, /health fails
                    return
                continue
            if self.connector is not None:
                self.connector.after_step(outputs)
            self.outbox.send(encode(("outputs", outputs, self._stats())))
        for request_id in list(self.engine.outputs.groups):
            self.engine.abort_request(request_id)

    def _take_messages(self, wait_ms: int) -> None:
        """Handle every waiting message; when there is none, wait up to `wait_ms` for the first."""
        handled = False
        while self.inbox.poll(0 if handled else wait_ms):
            self._handle(decode(self.inbox.recv()))
            handled = True
        if handled and not self.stopping:
            self.outbox.send(encode(("stats", self._stats())))

    def _stats(self) -> dict:
        stats = self.engine.stats()
        if self.connector is not None:
            stats.update(self.connector.stats())
        return stats

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params, arrival_time, extra_keys = message
            try:
                self.engine.add_request(request_id, prompt, params, arrival_time, extra_keys)
            except Exception as exc:  # noqa: BLE001 (bad input fails that request only)
                self.outbox.send(encode(("error", request_id, type(exc).__name__, str(exc))))
        elif kind == "abort":
            self.engine.abort_request(message[1])
        elif kind == "shutdown":
            self.stopping = True
        elif self.connector is not None and self.connector.handles(kind):
            self.connector.handle(message)
        else:
            logger.error("unknown message %r from the client", kind)

    def _fail_running(self, message: str) -> None:
        for request_id in list(self.engine.outputs.groups):
            self.engine.abort_request(request_id)
            self.outbox.send(encode(("error", request_id, "RuntimeError", message)))
