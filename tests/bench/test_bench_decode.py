import importlib.util
import json

import pytest
import torch

from ratplus.bench.decode import check_decode_parity
from ratplus.cli import main
from ratplus.model.cache import LayerCache


def test_bench_decode_cli_prints_table_plot_and_json(capsys, tmp_path):
    plot, out_file = tmp_path / "decode.png", tmp_path / "decode.json"
    args = ["bench", "decode", "--context-lens", "64,96", "--patterns", "D4,topk-B8-K2-W8-P2"]
    args += ["--heads", "2", "--head-dim", "8", "--steps", "2", "--threads", "0"]
    args += ["--model-preset", "tiny", "--model-context", "64", "--model-batch", "1,2", "--model-steps", "2"]
    assert main([*args, "--plot", str(plot), "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "ms/token" in out and "tokens/s" in out and "random keys" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record == json.loads(out_file.read_text())
    assert record["bench"] == "decode" and set(record["layer"]) == {"dense", "D4", "topk-B8-K2-W8-P2"}
    for per_context in record["layer"].values():
        assert set(per_context) == {"64", "96"}
        for r in per_context.values():
            assert r["nbytes"] == r["formula_bytes"] and r["s"] > 0
    # D4 keeps about a quarter of dense's slots
    assert record["layer"]["D4"]["96"]["nbytes"] < record["layer"]["dense"]["96"]["nbytes"] / 3
    model = record["model"]
    assert set(model["tokens_per_s"]["D16"]) == {"1", "2"}
    if importlib.util.find_spec("transformers") is not None:  # the same-size Llama rows
        assert {"llama-dynamic", "llama-static"} <= set(model["tokens_per_s"])
        # same width, depth and context as dense: the same cache bytes (static: + its room for the steps)
        assert model["kv_bytes"]["llama-dynamic"]["1"] == 64 * 2 * 2 * 32 * 4
    bw = model["read_bandwidth_bytes_per_s"]
    for name, per_batch in model["bandwidth_limit_tokens_per_s"].items():
        for b, v in per_batch.items():  # b tokens per step; weights once + the whole cache (float32)
            assert v == pytest.approx(int(b) * bw[b] / (model["params"][name] * 4 + model["kv_bytes"][name][b]))
    assert plot.stat().st_size > 1000


def test_parity_check_refuses_a_broken_cache(monkeypatch):
    monkeypatch.setattr(LayerCache, "attend", lambda self, q, k, v, backend="auto": torch.zeros_like(q))
    with pytest.raises(RuntimeError, match="parity failed"):
        check_decode_parity(["D4"], torch.device("cpu"), n=30, m=3)
