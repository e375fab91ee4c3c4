import json

from ratplus.demo import ADAPT_PATTERNS, NEEDLE_PATTERNS
from ratplus.demo.pipeline import DemoConfig
from ratplus.demo.report import check_targets, write_report


def _results(rat_d16: float, base_d16: float, needle: dict[str, float], base_dense: float = 110.0) -> dict:
    rows = []
    for model, dense, d16 in (("ratplus", 100.0, rat_d16), ("baseline", base_dense, base_d16)):
        rows.append({"model": model, "pattern": "dense", "status": "dense", "ppl": dense, "kv_frac": 1.0})
        for p in ADAPT_PATTERNS:
            ppl = d16 if p == "D16-W0-P0" else dense * 1.1
            rows.append({"model": model, "pattern": p, "status": "adapted", "ppl": ppl, "kv_frac": 0.1})
    return {
        "ppl": {"rows": rows},
        "needle": {"scores": needle, "length": 256, "test_samples": 10},
        "serve": {
            "rows": [{"pattern": "dense", "kv_bytes": 1000, "decode_tok_s": 5.0}],
            "sample_pattern": "D16-W0-P0",
            "sample": "ROMEO. hello",
        },
        "timings_s": {"data": 1.0},
        "wall_s": 60.0,
        "config": {"seq_len": 256, "pretrain_tokens": 1000},
    }


def test_targets_follow_the_issue_thresholds():
    good = _results(104.0, 130.0, {"dense": 60.0, "D16-W0-P0": 50.0, "D64-W0-P0": 40.0, "local-W16-P0": 10.0})
    assert all(t["ok"] for t in check_targets(good))
    bad = _results(106.0, 105.0, {"dense": 40.0, "D16-W0-P0": 20.0, "D64-W0-P0": 10.0, "local-W16-P0": 15.0}, 95.0)
    verdict = {t["target"]: t["ok"] for t in check_targets(bad)}
    assert not any(verdict.values())  # 1.06 > 1.05; 1.105 < 1.15; 100/95 > 1.03; 40 < 50; 20 < 32; 20 < 15 + 20
    assert verdict.keys() == {t["target"] for t in check_targets(good)}


def test_report_files(tmp_path):
    res = _results(101.0, 140.0, dict.fromkeys(NEEDLE_PATTERNS, 0.0))
    res["targets"] = check_targets(res)
    write_report(tmp_path, res)
    report = (tmp_path / "report.md").read_text()
    assert "| ratplus | D16-W0-P0 | adapted | 101.00 | 1.010x |" in report
    assert "| baseline | D16-W0-P0 | adapted | 140.00 | 1.273x |" in report
    assert json.loads((tmp_path / "results.json").read_text())["needle"]["length"] == 256
    assert "did not learn retrieval" in report  # a dense needle score of 0 is flagged, not presented as a result
    for name in ("ppl_by_pattern.png", "needle_by_pattern.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_quick_config_is_smaller():
    quick, full = DemoConfig.quick(), DemoConfig()
    assert quick.pretrain_tokens < full.pretrain_tokens and quick.needle_steps < full.needle_steps


def test_quick_demo_end_to_end_and_reuse(tmp_path, capsys):
    from ratplus.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in results["ppl"]["rows"]} == {"ratplus", "baseline"}
    assert set(results["needle"]["scores"]) == set(NEEDLE_PATTERNS)
    kv = {r["pattern"]: r["kv_bytes"] for r in results["serve"]["rows"]}
    assert kv["D64-W0-P0"] < kv["D16-W0-P0"] < kv["dense"]
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0  # every stage reused
    assert capsys.readouterr().out.count("reusing the finished stage") == 2 + 2 * len(ADAPT_PATTERNS) + 5
    methods = {(r["model"], r["method"]) for r in results["budget"]["rows"]}
    assert ("baseline", "streaming") in methods and ("ratplus", "snapkv") in methods
    assert (out / "budget.png").read_bytes()[:4] == b"\x89PNG" and "Quality vs KV-cache bytes" in (
        out / "report.md"
    ).read_text()


def test_stage_keys_follow_only_the_settings_a_stage_depends_on(tmp_path):
    from ratplus.demo.pipeline import Demo

    base = Demo(DemoConfig(out_dir=str(tmp_path), progress=False))
    more_needle = Demo(DemoConfig(out_dir=str(tmp_path), progress=False, needle_steps=999))
    more_pretrain = Demo(DemoConfig(out_dir=str(tmp_path), progress=False, pretrain_tokens=1000))
    for stage in ("data", "pretrain_ratplus", "adapt_baseline_D16-W0-P0", "ppl", "serve"):
        assert base._key(stage) == more_needle._key(stage)
        assert base._workdir(stage) == more_needle._workdir(stage)
    assert base._key("needle") != more_needle._key("needle")
    assert base._workdir("needle") != more_needle._workdir("needle")
    for stage in ("pretrain_ratplus", "adapt_ratplus_D16-W0-P0", "ppl", "needle", "serve"):
        assert base._workdir(stage) != more_pretrain._workdir(stage)
    assert base._key("data") == more_pretrain._key("data")


def test_demo_cli_rejects_a_non_positive_budget(tmp_path, capsys):
    from ratplus.cli import main

    assert main(["demo", "--out", str(tmp_path), "--needle-steps", "0"]) == 2
    assert "ratplus demo: error: --needle-steps must be positive" in capsys.readouterr().err
