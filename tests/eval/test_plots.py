"""The evaluation plots compare fairly: the budget plot puts every model on one relative axis with
labels that do not overlap, the recall plot shows every pattern of its table, the perplexity plot
draws one panel where its two cost axes would be the same."""

from __future__ import annotations

import pytest

from ratplus.eval import plots

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, still open for inspection (closed afterwards)."""
    seen = []
    save = plots.save_figure

    def keep(fig, path, dpi, layout=True):
        seen.append(fig)
        fig.tight_layout() if layout else None
        fig.savefig(path, dpi=dpi)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    yield seen
    for fig in seen:
        save(fig, "/dev/null", 10, layout=False)  # closes it


def _budget_rows() -> list[dict]:
    """The demo's shape: RAT+ within 1-2% of its dense PPL everywhere, the baseline 0-30% above its own,
    several methods meeting at the same bytes with nearly the same PPL."""
    rows = []
    for model, dense, worse in (("ratplus", 145.0, 0.01), ("baseline", 187.0, 0.25)):
        rows.append({"model": model, "method": "dense", "pattern": "dense", "ppl": dense, "kv_bytes_per_token": 8192})
        for i, (d, s) in enumerate(((64, 160), (16, 544), (4, 2080))):
            scale = 1 + worse * (3 - i) / 3
            rows.append({"model": model, "method": "dilated", "pattern": f"D{d}-W0-P0", "ppl": dense * scale})
            rows[-1]["kv_bytes_per_token"] = s
            for method, pattern, f in (
                ("streaming", f"local-W{s // 40}-P4", 0.99),
                ("snapkv", f"snapkv-C{d}-O4", 0.995),
            ):
                rows.append({"model": model, "method": method, "pattern": pattern, "ppl": dense * scale * f})
                rows[-1]["kv_bytes_per_token"] = s * 1.02
    for r in rows:
        r.update(seq_len=256, score_tokens=8)
    return rows


def test_budget_plot_shares_a_relative_axis_and_its_labels_do_not_overlap(figures, tmp_path):
    from matplotlib.text import Text

    rows = _budget_rows()
    plots.plot_budget(rows, tmp_path / "budget.png")
    (fig,) = figures
    a, b = fig.axes[:2]
    assert a.get_shared_y_axes().joined(a, b) and a.get_ylim() == b.get_ylim()
    assert "own dense" in a.get_ylabel()
    dense = {"ratplus": 145.0, "baseline": 187.0}
    for ax, model in ((a, "ratplus"), (b, "baseline")):
        plotted = sorted(y for line in ax.lines if line.get_label() == "dilated" for y in line.get_ydata())
        want = sorted(r["ppl"] / dense[model] for r in rows if r["model"] == model and r["method"] == "dilated")
        assert plotted == pytest.approx(want)
        fig.canvas.draw()
        boxes = [Text.get_window_extent(t) for t in ax.texts]  # the text alone, without a leader line
        assert len(boxes) == sum(r["model"] == model for r in rows)
        assert not any(p.overlaps(q) for i, p in enumerate(boxes) for q in boxes[i + 1 :])
        frame = ax.get_window_extent()  # no label cut off or running over the next panel
        assert all(frame.x0 <= t.x0 and t.x1 <= frame.x1 and frame.y0 <= t.y0 and t.y1 <= frame.y1 for t in boxes)


def test_budget_plot_without_a_dense_row_keeps_absolute_axes(figures, tmp_path):
    rows = [r for r in _budget_rows() if r["method"] != "dense" or r["model"] == "ratplus"]
    plots.plot_budget(rows, tmp_path / "budget.png")
    (fig,) = figures
    assert fig.axes[0].get_ylabel() == "PPL" and not fig.axes[0].get_shared_y_axes().joined(*fig.axes[:2])


def test_recall_plot_shows_every_pattern_of_its_table(figures, tmp_path):
    patterns = ["dense", "D4", "D16", "local-W16-P0", "topk-B8-K2-W8-P0-quest", "topk-B8-K2-W8-P0-moba"]
    kinds = {"dense": "dilated", "D4": "dilated", "D16": "dilated", "local-W16-P0": "local"}
    rows = [
        {"model": "ratplus", "pattern": p, "kind": kinds.get(p, "topk"), "acc": 0.1 * (i + 1)}
        | {"dilation": {"dense": 1, "D4": 4, "D16": 16}.get(p), "acc_adapted": 0.9 if p == "D16" else None}
        for i, p in enumerate(patterns)
    ]
    plots.plot_recall(rows, tmp_path / "recall.png", "local-W16-P0")
    (fig,) = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dense", "D4", "D16", *patterns[3:]]
    (zero_shot,) = [line for line in ax.lines if line.get_label() == "ratplus zero-shot"]
    assert list(zero_shot.get_ydata()) == pytest.approx([10.0 * (i + 1) for i in range(len(patterns))])


@pytest.mark.parametrize(("topk", "panels"), [(False, 1), (True, 2)])
def test_ppl_plot_draws_one_panel_where_the_costs_agree(figures, tmp_path, topk, panels):
    rows = [
        {"model": "m", "pattern": p, "ppl": 10.0 + i, "attn_flop_frac": f, "kv_frac": f}
        for i, (p, f) in enumerate((("dense", 1.0), ("D16", 0.066), ("local-W64-P4", 0.27)))
    ]
    if topk:  # top-k reads a few blocks but keeps every key: the two costs differ
        rows.append({"model": "m", "pattern": "topk-B8-K2", "ppl": 11.0, "attn_flop_frac": 0.2, "kv_frac": 1.0})
    plots.plot_ppl(rows, tmp_path / "ppl.png")
    (fig,) = figures
    assert len(fig.axes) == panels
    if panels == 1:
        assert "=" in fig.axes[0].get_xlabel()
