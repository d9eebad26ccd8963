"""Loss curves of a run directory: `loss_curve.png` with matplotlib when installed, else `loss_curve.svg`
(drawn here, no dependency). Train curves: every logged loss term; eval: loss."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics

_SKIP = {"step", "lr", "grad_norm", "tokens_per_s", "tokens", "epoch", "elapsed_s", "ppl"}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def curves(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        split = r.get("split", "train")
        for k, v in r.items():
            if k in _SKIP or k == "split" or not isinstance(v, (int, float)) or not k.endswith("loss"):
                continue
            out.setdefault(f"{split}/{k}", []).append((float(r["step"]), float(v)))
    return out


def plot_run(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    series = curves(read_metrics(run_dir))
    if not series:
        raise ValueError(f"{run_dir}: metrics.jsonl has no loss values to plot")
    try:
        import matplotlib
    except ImportError:
        return _write_svg(series, run_dir / "loss_curve.svg")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker="o" if name.startswith("eval") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out = run_dir / "loss_curve.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def _write_svg(series: dict[str, list[tuple[float, float]]], out: Path) -> Path:
    W, H, pad = 800, 480, 60
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (W - 2 * pad)

    def sy(y):
        return H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle">step ({x0:g} .. {x1:g})</text>',
             f'<text x="10" y="{pad - 10}">loss ({y0:.4g} .. {y1:.4g})</text>']
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{W - pad - 150}" y="{pad + 16 * i}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    out.write_text("\n".join(parts) + "\n")
    return out
