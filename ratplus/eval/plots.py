"""Figures for evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ratplus.runtime import atomic_write_bytes, make_dir

COST_AXES = (
    ("attn_flop_frac", "attention FLOPs (fraction of dense)"),
    ("kv_frac", "KV-cache slots (fraction of dense)"),
)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported on first use:
    matplotlib costs about a second to import and only the plotting paths need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int, layout: bool = True) -> Path:
    """Lay out (``layout``), write the PNG atomically (rendered in memory, then renamed into place: an
    interrupted run never leaves a half-written image), free the figure; returns the path."""
    if layout:
        fig.tight_layout()
    out = Path(path)
    make_dir(out.parent)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def plot_ppl(rows: list[dict[str, Any]], path: str | Path, metric: str = "ppl") -> Path:
    """Two panels, ``metric`` against attention FLOPs and against KV-cache size (log x, both relative
    to dense), one line per model, each point labelled with its pattern. Returns the PNG path."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    plt = _pyplot()

    if not rows:
        raise ValueError("no results to plot")
    models: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        models.setdefault(r["model"], []).append(r)
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(6 * len(COST_AXES), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], COST_AXES):
        for name, rs in models.items():
            rs = sorted(rs, key=lambda r: r[key])
            (line,) = ax.plot([r[key] for r in rs], [r[metric] for r in rs], marker="o", label=name)
            # patterns that cost the same and score the same share one label
            labels: dict[tuple[float, float], list[str]] = {}
            for r in rs:
                labels.setdefault((r[key], r[metric]), []).append(r["pattern"])
            for (x, y), names in labels.items():
                ax.annotate(
                    " = ".join(names),
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel(label)
        ax.set_ylabel(metric.upper() if metric == "ppl" else metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    seq_len = rows[0].get("seq_len")
    fig.suptitle(f"held-out {metric} vs attention cost" + (f" (context {seq_len})" if seq_len else ""))
    return save_figure(fig, path, dpi=120)


def plot_budget(rows: list[dict[str, Any]], path: str | Path, metric: str = "ppl") -> Path:
    """``metric`` against KV-cache bytes per token (log x), one line per model and method (rows of
    ``ratplus.eval.budget``), each point labelled with its pattern. Returns the PNG path."""
    plt = _pyplot()

    if not rows:
        raise ValueError("no results to plot")
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault(f"{r['model']}: {r['method']}", []).append(r)
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["kv_bytes_per_token"])
        xs, ys = [r["kv_bytes_per_token"] for r in rs], [r[metric] for r in rs]
        (line,) = ax.plot(xs, ys, marker="o", label=name, linestyle="-" if len(rs) > 1 else "none")
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(
                r["pattern"], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=line.get_color()
            )
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache bytes per token of context")
    ax.set_ylabel(metric.upper() if metric == "ppl" else metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    seq_len, score = rows[0].get("seq_len"), rows[0].get("score_tokens")
    fig.suptitle(f"held-out {metric} vs KV-cache bytes (context {seq_len}, last {score} tokens scored)")
    return save_figure(fig, path, dpi=120)


def plot_recall(rows: list[dict[str, Any]], path: str | Path, control: str | None, title: str = "") -> Path:
    """Accuracy against D (dense = 1) for each model, zero-shot dashed and adapted solid; the local-only
    ``control`` pattern drawn as a horizontal line per model. Rows with an ``adapt_curve`` (accuracy
    during adaptation) get a second panel: accuracy against adaptation steps. Returns the PNG path."""
    plt = _pyplot()

    curves = [r for r in rows if r.get("adapt_curve")]
    if curves:
        fig, (ax, cax) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in curves:
            steps = [0] + [c["step"] for c in r["adapt_curve"]]
            (line,) = cax.plot(steps, [100 * r["acc"]] + [100 * c["acc"] for c in r["adapt_curve"]], marker="o")
            line.set_label(f"{r['model']} {r['pattern']}")
            dense = [100 * c["dense"] for c in r["adapt_curve"]]
            cax.plot(steps[1:], dense, ls=":", color=line.get_color(), label=f"{r['model']} {r['pattern']}: dense")
        cax.set_xlabel("adaptation steps")
        cax.set_ylabel("answers right (%)")
        cax.set_ylim(-2, 102)
        cax.grid(True, alpha=0.3)
        cax.legend(fontsize=8)
        cax.set_title("during adaptation (dotted: the same model, dense)", fontsize=10)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name and r["kind"] == "dilated"]
        rs.sort(key=lambda r: r["dilation"])
        xs = [r["dilation"] for r in rs]
        (line,) = ax.plot(xs, [100 * r["acc"] for r in rs], ls="--", marker="o", label=f"{name} zero-shot")
        if any(r.get("acc_adapted") is not None for r in rs):
            ys = [r["acc"] if r["dilation"] == 1 else r.get("acc_adapted") for r in rs]
            pts = [(r["dilation"], 100 * y) for r, y in zip(rs, ys) if y is not None]
            ax.plot(*zip(*pts), ls="-", marker="s", color=line.get_color(), label=f"{name} adapted")
        ctrl = next((r for r in rows if r["model"] == name and r["pattern"] == control), None)
        if ctrl is not None:
            y = ctrl["acc_adapted"] if ctrl.get("acc_adapted") is not None else ctrl["acc"]
            ax.axhline(100 * y, color=line.get_color(), ls=":", label=f"{name} {control}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dilation D (1 = dense)")
    ax.set_ylabel("answers right (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "MQAR recall vs dilation", fontsize=10)
    return save_figure(fig, path, dpi=100)
