"""``plot_budget``: a PPL axis spanning more than a decade is logarithmic, so one collapsed method
(a dilated pattern on a model without recurrence: PPL in the thousands) does not flatten the rest."""

from __future__ import annotations

import pytest

from ratplus.eval import plots

pytest.importorskip("matplotlib")


def _rows(ppls: dict[str, float]) -> list[dict]:
    return [
        {"model": "m", "method": method, "pattern": f"{method}-{i}", "ppl": ppl, "kv_bytes_per_token": 100.0 * (i + 1)}
        for i, (method, ppl) in enumerate(ppls.items())
    ] + [{"model": "m", "method": "dense", "pattern": "dense", "ppl": 20.0, "kv_bytes_per_token": 1e4}]


@pytest.mark.parametrize(
    ("ppls", "scale"), [({"dilated": 9000.0, "streaming": 24.0}, "log"), ({"streaming": 24.0}, "linear")]
)
def test_budget_plot_uses_a_log_ppl_axis_over_a_decade(ppls, scale, tmp_path, monkeypatch):
    seen = []
    save = plots.save_figure
    monkeypatch.setattr(
        plots, "save_figure", lambda fig, path, dpi, **kw: (seen.append(fig), save(fig, path, dpi, **kw))[1]
    )
    out = plots.plot_budget(_rows(ppls), tmp_path / "budget.png")
    assert out.stat().st_size > 1000
    (fig,) = seen
    assert fig.axes[0].get_yscale() == scale
