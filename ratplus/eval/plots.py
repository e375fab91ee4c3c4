"""Figures for evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import itertools
import math
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


def _by_model(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each model, in first-seen order; no rows is an error (an empty plot says nothing)."""
    if not rows:
        raise ValueError("no results to plot")
    models: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        models.setdefault(r["model"], []).append(r)
    return models


def plot_ppl(rows: list[dict[str, Any]], path: str | Path, metric: str = "ppl") -> Path:
    """Two panels, ``metric`` against attention FLOPs and against KV-cache size (log x, both relative
    to dense), one line per model, each point labelled with its pattern; one panel, its axis naming
    both, where the two costs are equal for every row (dilated and local patterns: each kept key is
    one slot and one score per query), since the second panel would repeat the first. Returns the PNG
    path."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    plt = _pyplot()

    models = _by_model(rows)
    axes_of = COST_AXES
    if all(math.isclose(r[COST_AXES[0][0]], r[COST_AXES[1][0]], rel_tol=1e-9) for r in rows):
        axes_of = ((COST_AXES[0][0], "attention FLOPs = KV-cache slots (fraction of dense)"),)
    fig, axes = plt.subplots(1, len(axes_of), figsize=(6 * len(axes_of), 4.5), squeeze=False)
    placed = []
    for ax, (key, label) in zip(axes[0], axes_of):
        points, polylines = [], []
        for name, rs in models.items():
            rs = sorted(rs, key=lambda r: r[key])
            xs, ys = [r[key] for r in rs], [r[metric] for r in rs]
            (line,) = ax.plot(xs, ys, marker="o", label=name)
            polylines.append(list(zip(xs, ys)))
            # patterns that cost the same and score the same share one label
            labels: dict[tuple[float, float], list[str]] = {}
            for r in rs:
                labels.setdefault((r[key], r[metric]), []).append(_short(r["pattern"]))
            points += [(x, y, " = ".join(names), line.get_color()) for (x, y), names in labels.items()]
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.margins(x=0.12, y=0.12)
        ax.set_xlabel(label)
        ax.set_ylabel(metric.upper() if metric == "ppl" else metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        placed.append((ax, points, polylines))
    seq_len = rows[0].get("seq_len")
    fig.suptitle(f"held-out {metric} vs attention cost" + (f" (context {seq_len})" if seq_len else ""))
    _label_after_layout(fig, placed)
    return save_figure(fig, path, dpi=120, layout=False)


def _label_after_layout(fig, placed: list[tuple[Any, list, list]]) -> None:
    """Lay the figure out, then label each (axes, points, polylines): the labels are placed in screen
    space, so the axes must not move after them."""
    fig.tight_layout()
    fig.canvas.draw()
    for ax, points, polylines in placed:
        _place_labels(ax, points, lines=polylines)


def _place_labels(
    ax, points: list[tuple[float, float, str, str]], fontsize: float = 7, lines: list[list[tuple[float, float]]] = ()
) -> None:
    """Label each (x, y, text, color) point next to it without two labels overlapping: each label takes
    the first of a few offsets around its point whose box (estimated from the text length) collides with
    no label placed before, no marker and, where it can, no segment of ``lines`` (polylines in data
    coordinates). Call after the axes' scales, limits and the figure's layout are final."""
    fig = ax.figure
    px = fig.dpi / 72  # pixels per point
    h, char_w = fontsize * px * 1.2, fontsize * px * 0.62
    offsets = [(5, 3), (5, -11), (-5, 3), (-5, -11), (5, 12), (5, -20), (-5, 12), (-5, -20)]
    offsets += [(dx, dy) for k in range(2, 10) for dy in (3 + 9 * k, -11 - 9 * k) for dx in (5, -5)]
    marks = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    taken = [(mx - 4, my - 4, mx + 4, my + 4) for mx, my in marks]  # the markers themselves (+ the pad below)
    e = ax.get_window_extent()
    frame = (e.x0, e.y0, e.x1, e.y1)
    if ax.get_legend() is not None:
        e = ax.get_legend().get_window_extent()
        taken.append((e.x0, e.y0, e.x1, e.y1))
    crossed = []  # small boxes along each line: a label over a line is hard to read
    for line in lines:
        xy = ax.transData.transform(line) if len(line) else []
        for (x0, y0), (x1, y1) in itertools.pairwise(xy):
            n = max(1, int(max(abs(x1 - x0), abs(y1 - y0)) / 4))
            crossed += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(n + 1)]

    def hits(box: tuple[float, float, float, float], others) -> bool:
        pad = 2  # pixels kept clear around a label: two labels that touch read as one
        return any(
            box[0] < b[2] + pad and b[0] < box[2] + pad and box[1] < b[3] + pad and b[1] < box[3] + pad for b in others
        )

    for (x, y, text, color), (mx, my) in zip(points, marks):
        w = char_w * len(text)
        boxes = []
        for dx, dy in offsets:
            x0 = mx + dx * px if dx > 0 else mx + dx * px - w
            boxes.append((x0, my + dy * px, x0 + w, my + dy * px + h))
        free = [i for i, b in enumerate(boxes) if not hits(b, taken)]
        within = [i for i in free if _within(boxes[i], frame)]  # not cut off, not over the next panel
        clear = [i for i in within if not any(_inside(p, boxes[i]) for p in crossed)]
        pick = (clear or within or free or [0])[0]
        taken.append(boxes[pick])
        choice = offsets[pick]
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=choice,
            ha="left" if choice[0] > 0 else "right",
            va="bottom",
            fontsize=fontsize,
            color=color,
            # a label pushed away from its point keeps a thin line to it
            arrowprops=None if abs(choice[1]) < 12 else {"arrowstyle": "-", "lw": 0.5, "color": color},
        )


def _within(box: tuple[float, float, float, float], frame: tuple[float, float, float, float]) -> bool:
    return frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]


def _inside(point: tuple[float, float], box: tuple[float, float, float, float], pad: float = 3) -> bool:
    """``point`` within ``pad`` pixels of ``box`` (a line is drawn about 2 pixels wide)."""
    return box[0] - pad <= point[0] <= box[2] + pad and box[1] - pad <= point[1] <= box[3] + pad


def _short(pattern: str) -> str:
    """A pattern name without its empty window and sinks: ``D16-W0-P0`` -> ``D16``."""
    return pattern.replace("-W0-P0", "")


def plot_budget(rows: list[dict[str, Any]], path: str | Path, metric: str = "ppl") -> Path:
    """``metric`` over the model's own dense ``metric`` against KV-cache bytes per token (log x): one panel
    per model on one shared y-axis, so the same relative loss looks the same for every model, one line and
    marker per method (rows of ``ratplus.eval.budget``), each point labelled with its pattern. A model
    without a dense row cannot be put on that axis: then every panel shows ``metric`` itself, each on its
    own axis (the title says which). Returns the PNG path."""
    plt = _pyplot()

    models = _by_model(rows)
    dense = {
        m: next((r[metric] for r in rs if r["method"] == "dense" and r[metric] > 0), None) for m, rs in models.items()
    }
    relative = all(v is not None for v in dense.values())
    name = metric.upper() if metric == "ppl" else metric

    def y_of(r: dict[str, Any]) -> float:
        return r[metric] / dense[r["model"]] if relative else r[metric]

    methods = list(dict.fromkeys(r["method"] for r in rows))  # one colour and marker per method, all panels
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    markers = dict(zip(methods, "osD^vP*X"))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False, sharey=relative)
    placed = []
    values = [y_of(r) for r in rows if r[metric] > 0]
    for ax, (model, rs) in zip(axes[0], models.items()):
        labels, polylines = [], []
        for method in methods:
            mine = sorted((r for r in rs if r["method"] == method), key=lambda r: r["kv_bytes_per_token"])
            if not mine:
                continue
            xs, ys = [r["kv_bytes_per_token"] for r in mine], [y_of(r) for r in mine]
            ax.plot(xs, ys, marker=markers[method], color=colors[method], label=method, ls="-" if len(mine) > 1 else "")
            labels += [(x, y, _short(r["pattern"]), colors[method]) for r, x, y in zip(mine, xs, ys)]
            if len(mine) > 1:
                polylines.append(list(zip(xs, ys)))
        ax.set_xscale("log")
        if relative:
            ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        mine_values = values if relative else [y_of(r) for r in rs if r[metric] > 0]
        if metric == "ppl" and mine_values and max(mine_values) > 10 * min(mine_values):
            ax.set_yscale("log")  # one collapsed method (PPL in the thousands) would flatten the others
        ax.margins(x=0.15, y=0.15)
        ax.set_xlabel("KV-cache bytes per token of context")
        ax.set_ylabel(f"{name} / own dense {name}" if relative else name)
        ax.set_title(f"{model} (dense {name} {dense[model]:.2f})" if relative else model, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        placed.append((ax, labels, polylines))
    seq_len, score = rows[0].get("seq_len"), rows[0].get("score_tokens")
    how = "relative to each model's own dense" if relative else "(no dense row: absolute)"
    fig.suptitle(f"held-out {metric} {how} vs KV-cache bytes (context {seq_len}, last {score} tokens scored)")
    _label_after_layout(fig, placed)
    return save_figure(fig, path, 120, layout=False)


def plot_recall(rows: list[dict[str, Any]], path: str | Path, control: str | None, title: str = "") -> Path:
    """Accuracy of every pattern of the rows (their table's order, one tick each: dense, the dilations
    in increasing D, then windows, top-k, ...), per model zero-shot (circles; a dashed line joins the
    plain dilated ones, dense = D1, where accuracy falls with D) and adapted (squares, only where
    adapted); the local-only ``control`` pattern also drawn as a horizontal line per model. Rows with an
    ``adapt_curve`` (accuracy during adaptation) get a second panel: accuracy against adaptation steps.
    Returns the PNG path."""
    plt = _pyplot()

    curves = [r for r in rows if r.get("adapt_curve")]
    if curves:
        fig, (ax, cax) = plt.subplots(1, 2, figsize=(13, 5))
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
        fig, ax = plt.subplots(figsize=(7, 5))
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    names = list(dict.fromkeys(r["model"] for r in rows))
    for k, name in enumerate(names):
        shift = 0.12 * (k - (len(names) - 1) / 2)  # several models side by side at each pattern
        mine = {r["pattern"]: r for r in rows if r["model"] == name}
        at = [(i + shift, mine[p]) for i, p in enumerate(patterns) if p in mine]
        dilated = sorted(((x, r) for x, r in at if r["kind"] == "dilated"), key=lambda xr: xr[1]["dilation"])
        (line,) = ax.plot([x for x, _ in dilated], [100 * r["acc"] for _, r in dilated], ls="--", color=f"C{k}")
        ax.plot(
            [x for x, _ in at],
            [100 * r["acc"] for _, r in at],
            ls="",
            marker="o",
            color=line.get_color(),
            label=f"{name} zero-shot",
        )
        adapted = [(x, 100 * r["acc_adapted"]) for x, r in at if r.get("acc_adapted") is not None]
        if adapted:  # markers only: the patterns between them were not adapted, so no line joins them
            ax.plot(*zip(*adapted), ls="", marker="s", ms=8, color=line.get_color(), label=f"{name} adapted")
            for x, y in adapted:
                ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(6, -4), fontsize=8)
        ctrl = mine.get(control) if control else None
        if ctrl is not None:
            y = ctrl["acc_adapted"] if ctrl.get("acc_adapted") is not None else ctrl["acc"]
            how = "adapted" if ctrl.get("acc_adapted") is not None else "zero-shot"
            ax.axhline(100 * y, color=line.get_color(), ls=":", label=f"{name} {control} ({how}), the control")
    ax.set_xticks(range(len(patterns)), [_short(p) for p in patterns], rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(patterns) - 0.5)
    ax.set_xlabel("pattern (dilated ones in increasing D; top-k keeps every key)")
    ax.set_ylabel("answers right (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "MQAR recall per pattern", fontsize=10)
    return save_figure(fig, path, dpi=100)
