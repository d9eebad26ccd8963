"""`ernie45 bench serve|throughput|latency`: vLLM's `vllm bench` commands, same flags and metric names.

    ernie45 bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --max-concurrency 16 \
        --random-input-len 128 --random-output-len 64 --result-file result.json
    ernie45 bench serve --dataset-name sharegpt --dataset-path ShareGPT_V3.json --request-rate 4
    ernie45 bench throughput [MODEL] --num-prompts 64 --random-input-len 128 --random-output-len 64
    ernie45 bench latency [MODEL] --batch-size 8 --input-len 32 --output-len 128 --num-iters 30

Bad arguments exit with status 2 and a message, as argparse's own errors do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

from ..bench.metrics import METRIC_NAMES
from ..engine.engine_config import add_engine_arguments, engine_config_from_args


class UsageError(Exception):
    """A flag value argparse's types could not check on their own (combinations, files): exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentiles must be in (0, 100], got {text!r}")
    return values


_BACKEND_ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def _metric_names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in METRIC_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(METRIC_NAMES)}, got {text!r}")
    return names


def _add_dataset_arguments(p: argparse.ArgumentParser, default_prompts: int, seed: bool = True) -> None:
    """seed=False where the engine's --seed (EngineConfig) is already a flag: one seed for both."""
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt"])
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format .json or .jsonl (for --dataset-name sharegpt)")
    p.add_argument("--num-prompts", type=_positive_int, default=default_prompts)
    p.add_argument("--random-input-len", type=_positive_int, default=1024)
    p.add_argument("--random-output-len", type=_positive_int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)], r in [0, 1)")
    p.add_argument("--random-prefix-len", type=_non_negative_int, default=0,
                   help="tokens of one random prefix every prompt shares")
    p.add_argument("--sharegpt-output-len", type=_positive_int, default=None,
                   help="output length of every ShareGPT request (default: the answer's length)")
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="the server, e.g. http://127.0.0.1:8000 (default: --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="openai", choices=sorted(_BACKEND_ENDPOINTS),
                   help="vLLM's names: openai / vllm stream /v1/completions, openai-chat /v1/chat/completions")
    p.add_argument("--endpoint", default=None,
                   help="/v1/completions (token-id prompts, exact lengths) or /v1/chat/completions (default: the "
                        "backend's)")
    p.add_argument("--model", default=None, help="the `model` field (default: the first model /v1/models lists)")
    p.add_argument("--tokenizer", default=None,
                   help="a local tokenizer directory for counting tokens (default: the server's /tokenize)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as `Authorization: Bearer KEY` (default: $OPENAI_API_KEY)")
    p.add_argument("--max-concurrency", type=_positive_int, default=None, help="most requests in flight")
    p.add_argument("--request-rate", type=_positive_float, default=math.inf,
                   help="requests/s with Poisson arrivals (gamma with --burstiness); inf: all at once (default)")
    p.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 is Poisson, lower is burstier")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly the requested output lengths")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--num-warmups", type=_non_negative_int, default=0,
                   help="requests sent (one at a time) before the measured ones, not counted")
    p.add_argument("--metric-percentiles", type=_percentiles, default=(99.0,), help='e.g. "50,90,99"')
    p.add_argument("--percentile-metrics", type=_metric_names, default=METRIC_NAMES,
                   help='which of ttft,tpot,itl,e2el the summary prints (the JSON has all; default: all)')
    p.add_argument("--result-file", default=None, help="write the JSON result here")
    p.add_argument("--save-result", action="store_true",
                   help="vLLM's spelling: write the JSON result to --result-dir/--result-filename")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)
    _add_dataset_arguments(p, default_prompts=1000)


def _add_offline_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output-json", default=None, help="write the JSON result here")
    add_engine_arguments(p)
    # repeated prompts would otherwise be served from the prefix cache after the first pass
    p.set_defaults(enable_prefix_caching=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{serve,throughput,latency}")
    serve = sub.add_parser("serve", help="load an OpenAI-compatible server with streaming requests")
    _add_serve_arguments(serve)
    throughput = sub.add_parser("throughput", help="the offline engine on a batch of prompts at once")
    _add_offline_model_arguments(throughput)
    throughput.add_argument("--n", type=_positive_int, default=1, help="samples per prompt")
    throughput.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                            help="stop at eos (default: generate exactly the requested lengths)")
    _add_dataset_arguments(throughput, default_prompts=1000, seed=False)
    latency = sub.add_parser("latency", help="wall time of one batch through the offline engine")
    _add_offline_model_arguments(latency)
    latency.add_argument("--input-len", type=_positive_int, default=32)
    latency.add_argument("--output-len", type=_positive_int, default=128)
    latency.add_argument("--batch-size", type=_positive_int, default=8)
    latency.add_argument("--n", type=_positive_int, default=1)
    latency.add_argument("--num-iters-warmup", type=_non_negative_int, default=10)
    latency.add_argument("--num-iters", type=_positive_int, default=30)
    latency.add_argument("--disable-tqdm", action="store_true")
    for cmd, name in ((serve, "serve"), (throughput, "throughput"), (latency, "latency")):
        cmd.set_defaults(bench_parser=cmd, bench_name=name)


def run(args: argparse.Namespace) -> int:
    runner = {"serve": _run_serve, "throughput": _run_throughput, "latency": _run_latency}[args.bench_command]
    try:
        return runner(args)
    except UsageError as exc:
        args.bench_parser.print_usage(sys.stderr)
        print(f"ernie45 bench {args.bench_name}: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _check_dataset_arguments(args: argparse.Namespace) -> None:
    if args.dataset_name == "sharegpt":
        if args.dataset_path is None:
            raise UsageError("--dataset-name sharegpt needs --dataset-path FILE (ShareGPT-format .json or .jsonl)")
        if not Path(args.dataset_path).is_file():
            raise UsageError(f"--dataset-path {args.dataset_path}: no such file")
    elif args.dataset_path is not None:
        raise UsageError("--dataset-path is read with --dataset-name sharegpt only")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise UsageError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")


def _requests(args: argparse.Namespace, tokenizer, as_text: bool):
    from ..bench.datasets import random_requests, sharegpt_requests

    try:
        if args.dataset_name == "sharegpt":
            return sharegpt_requests(args.dataset_path, tokenizer, args.num_prompts, args.sharegpt_output_len,
                                     args.seed)
        return random_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.random_prefix_len, args.seed, as_text=as_text)
    except ValueError as exc:  # a file that holds no usable conversation
        raise UsageError(str(exc)) from None


def _result_path(args: argparse.Namespace, model: str) -> Path | None:
    if args.result_file:
        return Path(args.result_file)
    if not args.save_result:
        return None
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    name = args.result_filename or (f"openai-{rate}qps{concurrency}-{Path(model).name}-"
                                    f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    return Path(args.result_dir) / name


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from ..bench.serve import ServeTarget, result_record, run_requests, served_model
    except ImportError as exc:
        raise SystemExit(f"error: ernie45 bench serve needs {exc.name}: pip install 'ernie45[serve]'") from None
    from ..bench import machine
    from ..bench.datasets import ServerTokenizer
    from ..bench.metrics import compute_metrics, format_summary

    _check_dataset_arguments(args)
    args.endpoint = args.endpoint or _BACKEND_ENDPOINTS[args.backend]
    if not args.endpoint.startswith("/"):
        raise UsageError(f"--endpoint must be a path such as /v1/completions, got {args.endpoint!r}")
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url must start with http:// or https://, got {base_url!r}")
    model = args.model or served_model(base_url, args.api_key)
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
                if v is not None}
    target = ServeTarget(base_url, model, args.endpoint, args.api_key, args.ignore_eos, sampling)
    if args.tokenizer:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = ServerTokenizer(base_url, model, target.headers)
    try:
        requests = _requests(args, tokenizer, as_text=target.chat)
    finally:
        if isinstance(tokenizer, ServerTokenizer):
            tokenizer.close()
    print(f"bench serve: {len(requests)} requests to {base_url}{args.endpoint} (model {model}), request rate "
          f"{args.request_rate}, max concurrency {args.max_concurrency}", file=sys.stderr)
    if args.num_warmups:
        asyncio.run(run_requests(target, requests[:1] * args.num_warmups, max_concurrency=1, progress=False))
    results, duration = asyncio.run(run_requests(
        target, requests, args.request_rate, args.burstiness, args.max_concurrency, args.seed,
        progress=not args.disable_tqdm))
    metrics = compute_metrics(results, duration, args.metric_percentiles)
    print(format_summary({**metrics, "max_concurrency": args.max_concurrency}, args.metric_percentiles,
                         args.percentile_metrics))
    for error in [r.error for r in results if not r.ok][:3]:
        print(f"failed request: {error}", file=sys.stderr)
    path = _result_path(args, model)
    if path is not None:
        record = result_record(metrics, results, target=target, num_prompts=len(requests),
                               request_rate=args.request_rate, burstiness=args.burstiness,
                               max_concurrency=args.max_concurrency,
                               extra={"dataset_name": args.dataset_name, "num_warmups": args.num_warmups,
                                      "percentiles": list(args.metric_percentiles), "cpu": machine.cpu_info()})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        print(f"result written to {path}", file=sys.stderr)
    return 0 if metrics["completed"] else 1


def _offline_llm(args: argparse.Namespace):
    import dataclasses

    import torch

    from ..engine import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    config = engine_config_from_args(args)
    return LLM(args.model, dtype=args.dtype, **dataclasses.asdict(config))


def _write_json(path: str | None, record: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2))
        print(f"result written to {path}", file=sys.stderr)


def _run_throughput(args: argparse.Namespace) -> int:
    from ..bench import machine
    from ..bench.throughput import run_throughput

    _check_dataset_arguments(args)
    llm = _offline_llm(args)
    requests = _requests(args, llm.tokenizer, as_text=False)
    result = run_throughput(llm, requests, n=args.n, ignore_eos=args.ignore_eos, progress=not args.disable_tqdm)
    print(f"Throughput: {result.requests_per_second:.2f} requests/s, {result.tokens_per_second:.2f} total tokens/s, "
          f"{result.output_tokens_per_second:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {result.total_num_tokens - result.total_output_tokens}")
    print(f"Total num output tokens:  {result.total_output_tokens}")
    _write_json(args.output_json, {**result.record(), "cpu": machine.cpu_info()})
    return 0


def _run_latency(args: argparse.Namespace) -> int:
    from ..bench import machine
    from ..bench.latency import run_latency

    llm = _offline_llm(args)
    result = run_latency(llm, args.batch_size, args.input_len, args.output_len, args.num_iters,
                         args.num_iters_warmup, n=args.n, seed=args.seed, progress=not args.disable_tqdm)
    print(f"Avg latency: {result.avg_latency} seconds")
    for q, value in result.percentiles().items():
        print(f"{q}% percentile latency: {value} seconds")
    _write_json(args.output_json, {**result.record(), "cpu": machine.cpu_info()})
    return 0
