"""Per-request timings of a serving benchmark and the summary vLLM's `vllm bench serve` prints, under its names.

TTFT: request sent -> first streamed token. ITL: the gaps between successive streamed chunks that carry tokens.
TPOT: (E2EL - TTFT) / (output tokens - 1) per request, so a chunk that carries several tokens is not one long ITL
in it. E2EL: request sent -> last byte. All summaries in milliseconds, as vLLM's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    """One request's outcome; times in seconds."""

    ok: bool = False
    prompt_len: int = 0
    """Prompt tokens: the server's usage when it reports one, else the dataset's count."""
    output_tokens: int = 0
    """Completion tokens: the server's usage when it reports one, else the streamed chunks that carried text."""
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def percentile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear interpolation between closest ranks), which vLLM's summaries use."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize_ms(name: str, seconds: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    """mean_/median_/std_/pNN_{name}_ms; zeros when there is nothing to summarize (vLLM reports 0 then too)."""
    ms = sorted(s * 1000.0 for s in seconds)
    out = {f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
           f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
           f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0}
    for q in percentiles:
        out[f"p{_format_q(q)}_{name}_ms"] = percentile(ms, q)
    return out


def _format_q(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else str(q)


def compute_metrics(results: list[RequestResult], duration: float,
                    percentiles: tuple[float, ...] = (99.0,)) -> dict[str, float]:
    """vLLM's BenchmarkMetrics fields (vllm/benchmarks/serve.py) from the finished requests."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    done = [r for r in results if r.ok]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration": duration,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        **summarize_ms("ttft", [r.ttft for r in done], percentiles),
        **summarize_ms("tpot", [t for r in done if (t := r.tpot) is not None], percentiles),
        **summarize_ms("itl", [gap for r in done for gap in r.itl], percentiles),
        **summarize_ms("e2el", [r.e2el for r in done], percentiles),
    }


def format_summary(metrics: dict, percentiles: tuple[float, ...] = (99.0,), names: tuple[str, ...] = METRIC_NAMES,
                   title: str = "Serving Benchmark Result") -> str:
    """The block `vllm bench serve` prints at the end, same labels; `names`: which latencies it lists."""
    width = 50
    lines = [f"{' ' + title + ' ':=^{width}}"]

    def row(label: str, value, fmt: str = "") -> None:
        lines.append(f"{label:<40}{value:<10{fmt}}")

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    if metrics.get("max_concurrency") is not None:
        row("Maximum request concurrency:", metrics["max_concurrency"])
    row("Benchmark duration (s):", metrics["duration"], ".2f")
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", metrics["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", metrics["total_token_throughput"], ".2f")
    headings = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in names:
        lines.append(f"{headings[name]:-^{width}}")
        row(f"Mean {name.upper()} (ms):", metrics[f"mean_{name}_ms"], ".2f")
        row(f"Median {name.upper()} (ms):", metrics[f"median_{name}_ms"], ".2f")
        for q in percentiles:
            row(f"P{_format_q(q)} {name.upper()} (ms):", metrics[f"p{_format_q(q)}_{name}_ms"], ".2f")
    lines.append("=" * width)
    return "\n".join(lines)
