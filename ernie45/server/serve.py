"""`ernie45 serve`: load the model, start the engine thread, run uvicorn until SIGINT/SIGTERM.

On SIGINT/SIGTERM uvicorn stops accepting connections; in-flight requests get `--shutdown-timeout` seconds to
finish, then the engine is shut down, which aborts what is left: streams end with an error event and `data: [DONE]`,
other requests get a 503. uvicorn then closes, the app's lifespan joins the engine thread, and the process exits
with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os

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
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget of one engine step")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: min(model, 8192))")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="answer 429 while this many sequences wait for a slot (default: unbounded)")
    p.add_argument("--seed", type=int, default=0, help="engine seed for requests that bring none")
    p.add_argument("--limit-images", type=int, default=8, help="VL models: most images per chat request")
    p.add_argument("--limit-videos", type=int, default=2, help="VL models: most videos per chat request")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="VL models: image/video parts may name local files under DIR (default: none; data: URIs "
                        "and http(s) URLs only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import build_app
        from .uvicorn_server import Server, stop_engine_later
    except ImportError as exc:
        raise SystemExit(f"error: ernie45 serve needs the serving dependencies ({exc.name} is missing): "
                         "pip install 'ernie45[serve]'") from None
    import torch

    from ..checkpoint import load_model
    from ..default_model import resolve_model_argument
    from ..engine import AsyncLLM, EngineConfig, LLMEngine
    from ..tokenizer import load_tokenizer

    if args.max_queue is not None and args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_arg = resolve_model_argument(args.model)
    model = load_model(model_arg, dtype=args.dtype)
    tokenizer = load_tokenizer(model.source_dir)
    engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks, seed=args.seed)
    engine = LLMEngine(model, tokenizer, engine_config)
    front = AsyncLLM(engine)
    try:
        app = build_app(front, tokenizer, args.served_model_name or args.model or "ernie45",
                        api_key=args.api_key, max_queue=args.max_queue, model_root=str(model.source_dir),
                        max_images_per_prompt=args.limit_images, max_videos_per_prompt=args.limit_videos,
                        allowed_local_media_path=args.allowed_local_media_path)
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, log_config=None,
            timeout_graceful_shutdown=args.shutdown_timeout + _BACKSTOP_SECONDS,
        )
        server = Server(config, drain=lambda loop: stop_engine_later(loop, front, args.shutdown_timeout))
        server.run()
        return 0 if server.started else 1
    finally:
        front.shutdown()
