"""`ernie45 serve`: start the engine core in its own process (it loads the model), run uvicorn in this one until
SIGINT/SIGTERM.

On SIGINT/SIGTERM uvicorn stops accepting connections; in-flight requests get `--shutdown-timeout` seconds to
finish, then the engine is shut down, which aborts what is left: streams end with an error event and `data: [DONE]`,
other requests get a 503. uvicorn then closes, the app's lifespan stops the core process, and the process exits
with status 0. If the core process dies, requests in flight end with a 503 and /health answers 503.
"""

from __future__ import annotations

import argparse
import logging
import os

from ..engine.engine_config import add_engine_arguments, engine_config_from_args

# A backstop only: the engine shutdown after --shutdown-timeout ends every request well before it.
_BACKSTOP_SECONDS = 5.0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The serve flags (MODEL and --dtype come from the CLI's shared model arguments)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as `model` (default: the MODEL argument as given)")
    p.add_argument("--api-key", default=os.environ.get("ERNIE45_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 and /tokenize (default: $ERNIE45_API_KEY)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="answer 429 while this many sequences wait for a slot (default: unbounded)")
    p.add_argument("--limit-images", type=int, default=8, help="VL models: most images per chat request")
    p.add_argument("--limit-videos", type=int, default=2, help="VL models: most videos per chat request")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="VL models: image/video parts may name local files under DIR (default: none; data: URIs "
                        "and http(s) URLs only)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the engine core (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM before they are aborted")
    p.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                   help="do not serve the chat page at GET / (then / is a 404 like any unknown path)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_disagg_arguments(p)
    add_engine_arguments(p)


def add_disagg_arguments(p: argparse.ArgumentParser) -> None:
    from ..disagg import ROLES

    g = p.add_argument_group("disaggregation", "prefill/decode roles behind `ernie45 router` (ernie45.disagg)")
    g.add_argument("--role", default="mixed", choices=ROLES,
                   help="prefill: compute prompts and export their KV; decode: import KV and generate; mixed: both "
                        "(default; no KV transfer server unless --kv-port is given)")
    g.add_argument("--kv-host", default="127.0.0.1", help="address of the KV transfer server")
    g.add_argument("--kv-port", type=int, default=None, help="its TCP port (default: one the OS picks)")
    g.add_argument("--kv-transfer", default="auto", choices=("auto", "shm", "tcp"),
                   help="how a decode instance fetches KV blocks: auto (a shared-memory segment when the prefill "
                        "instance is on this host, else TCP), shm, tcp; control messages always use TCP")
    g.add_argument("--kv-export-timeout", type=float, default=30.0,
                   help="seconds an exported KV waits to be fetched before its blocks are freed")


def disagg_config_from_args(args: argparse.Namespace):
    """A DisaggConfig for prefill / decode instances (and a mixed one given --kv-port), else None."""
    from ..disagg import DisaggConfig

    if args.role == "mixed" and args.kv_port is None:
        return None
    return DisaggConfig(role=args.role, kv_host=args.kv_host, kv_port=args.kv_port or 0,
                        kv_transfer=args.kv_transfer, export_timeout_s=args.kv_export_timeout)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import build_app
        from .uvicorn_server import Server, stop_engine_later
    except ImportError as exc:
        raise SystemExit(f"error: ernie45 serve needs the serving dependencies ({exc.name} is missing): "
                         "pip install 'ernie45[serve]'") from None
    from ..default_model import resolve_model_argument
    from ..engine import CoreLaunch

    if args.max_queue is not None and args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch = CoreLaunch(model=str(resolve_model_argument(args.model)), dtype=args.dtype,
                        engine_config=engine_config_from_args(args), threads=args.threads,
                        log_level=args.log_level, disagg=disagg_config_from_args(args))
    if launch.engine_config.node_rank > 0:  # a tensor-parallel node other than 0: its workers only, no server
        from ..parallel import run_node

        return run_node(launch.model, launch.dtype, launch.device, launch.engine_config, launch.threads)
    from ..parallel.data_parallel import start_engine_client

    front = start_engine_client(launch, startup_timeout=900.0)  # MPEngineClient, or D of them (data parallel)
    tokenizer = front.inputs.tokenizer
    model_root = str(front.model_info.source_dir)
    try:
        app = build_app(front, tokenizer, args.served_model_name or args.model or "ernie45",
                        api_key=args.api_key, max_queue=args.max_queue, model_root=model_root,
                        max_images_per_prompt=args.limit_images, max_videos_per_prompt=args.limit_videos,
                        allowed_local_media_path=args.allowed_local_media_path, web_ui=args.web_ui)
        if launch.disagg is not None:
            from ..disagg.routes import mount_disagg

            mount_disagg(app, front, args.served_model_name or args.model or "ernie45")
        if args.web_ui:
            logging.getLogger("ernie45.server").info("chat page: http://%s:%d/ (--no-web-ui turns it off)",
                                                     args.host, args.port)
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, log_config=None,
            timeout_graceful_shutdown=args.shutdown_timeout + _BACKSTOP_SECONDS,
        )
        server = Server(config, drain=lambda loop: stop_engine_later(loop, front, args.shutdown_timeout))
        server.run()
        return 0 if server.started else 1
    finally:
        front.shutdown()
