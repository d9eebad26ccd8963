"""Settings of an instance's part in prefill/decode disaggregation (`ernie45 serve --role ...`)."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("prefill", "decode", "mixed")


@dataclass
class DisaggConfig:
    """What the engine core's `DisaggCore` needs (picklable: it travels in `CoreLaunch`)."""

    role: str = "mixed"
    """prefill: export every finished request's prompt KV; decode: serve requests whose KV it imported; mixed:
    both phases locally (imports are still accepted, so a router may switch the role at run time)."""
    kv_host: str = "127.0.0.1"
    """Address the KV transfer server listens on (the decode side connects to it)."""
    kv_port: int = 0
    """Its TCP port; 0 lets the OS pick one (GET /disagg/info tells the router)."""
    kv_transfer: str = "auto"
    """How this instance fetches blocks: auto (a shared-memory segment when the prefill instance is on this host,
    else the TCP stream), shm (shared memory only), tcp (the stream always). Control messages always go over TCP."""
    export_timeout_s: float = 30.0
    """An export nobody fetched within this many seconds is freed (its decode side died or never came)."""
    import_hold_s: float = 30.0
    """Imported blocks are held until the request that uses them is admitted, at most this many seconds."""
    fetch_timeout_s: float = 30.0
    """Socket timeout of one fetch from a prefill instance; a fetch that fails imports nothing (the decode side
    then recomputes the prompt itself, so a failed transfer costs time, never correctness)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.kv_transfer not in ("auto", "shm", "tcp"):
            raise ValueError(f"kv_transfer must be one of auto, shm, tcp, got {self.kv_transfer!r}")
        if not isinstance(self.kv_port, int) or not 0 <= self.kv_port < 65536:
            raise ValueError(f"kv_port must be an int in [0, 65535], got {self.kv_port!r}")
        for name in ("export_timeout_s", "import_hold_s", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
