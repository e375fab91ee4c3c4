"""The demo's report: the targets checked against the measured numbers, ``results.json``,
``report.md``, the two PNG plots and the summary printed at the end."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from ratplus.config import AttentionPattern
from ratplus.demo import ADAPT_PATTERNS, HELDOUT_FILE, MODELS, SAMPLE_PROMPTS, model_name
from ratplus.eval.plots import save_figure
from ratplus.runtime import atomic_write_text

#: How the plots name the two pretrained models.
MODEL_NAMES = {"ratplus": "RAT+", "baseline": "attention baseline"}


def try_commands(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(what it does, command line) of the ``ratplus`` commands that run the demo's models by their stable
    names (``<out>/models``): generate from the D16 model, re-measure the perplexity table's D16 rows
    with ``eval ppl`` (same held-out text, context and token budget as the ppl stage), serve it."""
    cfg = results["config"]
    out = Path(cfg.get("out_dir", "demo_out"))
    models, sparse = out / "models", ADAPT_PATTERNS[0]
    q = shlex.quote
    prompt = SAMPLE_PROMPTS.get(cfg.get("corpus", "shakespeare"), "The ").strip() or "The"
    ckpts = " ".join(f"--ckpt {q(str(models / model_name(m, p)))}" for m in MODELS for p in ("dense", sparse))
    adapted = q(str(models / model_name("ratplus", sparse)))
    return [
        (
            f"sample text from RAT+ adapted to {sparse} (its default pattern, the one it was adapted to)",
            f"ratplus generate --ckpt {adapted} --prompt {q(prompt)} --max-new-tokens 80 --temperature 0.8 "
            f"--top-k 50 --seed {cfg.get('seed', 0)}",
        ),
        (
            f"the perplexity table's dense and {sparse} rows again, each model in both patterns (same held-out "
            "text, context and token budget as the ppl stage)",
            f"ratplus eval ppl {ckpts} --patterns dense,{sparse} --data {q(str(out / 'data' / HELDOUT_FILE))} "
            f"--seq-len {cfg['seq_len']} --max-tokens {cfg.get('ppl_tokens', 40_000)} "
            f"--out {q(str(out / 'eval' / 'ppl'))}",
        ),
        (
            f"an OpenAI-compatible server with its playground at http://127.0.0.1:8000/ ({sparse} and dense)",
            f"ratplus serve --ckpt {adapted} --patterns {sparse},dense --port 8000",
        ),
    ]


def _models_section(results: dict[str, Any]) -> list[str]:
    if not results.get("models"):
        return []
    lines = [
        "## The models",
        "",
        "Stable names (links to the training folders, whose names carry a hash of their settings; a rerun with "
        "other settings moves them):",
        "",
        "| model | folder |",
        "|---|---|",
    ]
    for name, path in results["models"].items():
        which, _, pattern = name.partition("-")
        what = MODEL_NAMES.get(which, which) + (f", adapted to {pattern}" if pattern else ", pretrained (dense)")
        lines.append(f"| {what} | `{path}` |")
    lines += ["", "Ready to run:", ""]
    for what, cmd in try_commands(results):
        lines += [f"- {what}:", "", "  ```bash", f"  {cmd}", "  ```", ""]
    return lines


def _ppl_of(results: dict[str, Any], model: str, pattern: str) -> float:
    canon = str(AttentionPattern.parse(pattern))
    for row in results["ppl"]["rows"]:
        if row["model"] == model and row["pattern"] == canon:
            return row["ppl"]
    raise KeyError((model, pattern))


def _recall_acc(recall: dict[str, Any], pattern: str) -> tuple[float, float | None]:
    """(zero-shot, adapted) accuracy in [0, 1] of ``pattern`` in the recall probe's rows."""
    row = next(r for r in recall["rows"] if r["pattern"] == pattern)
    return row["acc"], row["acc_adapted"]


def _recall_best(recall: dict[str, Any], pattern: str) -> float:
    """The adapted accuracy where the pattern was adapted, else the zero-shot one."""
    zero, adapted = _recall_acc(recall, pattern)
    return zero if adapted is None else adapted


def _recall_targets(recall: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's recall targets (in points, accuracy x100). The keep-80% one needs a dense accuracy of
    at least 90%: below that the model did not learn the task and the ratio means nothing."""
    p, ctrl = recall["probe_pattern"], recall["control"]
    dense, sparse, local = (100 * _recall_best(recall, x) for x in ("dense", p, ctrl))
    return [
        {"target": "recall: dense accuracy >= 90%", "value": dense, "ok": dense >= 90},
        {
            "target": f"recall: {p} keeps >= 80% of the dense accuracy (needs dense >= 90%)",
            "value": sparse / max(dense, 1e-9),
            "ok": dense >= 90 and sparse >= 0.8 * dense,
        },
        {
            "target": f"recall: {p} >= 30 points above the local-only control {ctrl}",
            "value": sparse - local,
            "ok": sparse >= local + 30,
        },
    ]


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it holds."""
    r_dense, b_dense = _ppl_of(results, "ratplus", "dense"), _ppl_of(results, "baseline", "dense")
    r16, b16 = _ppl_of(results, "ratplus", "D16-W0-P0"), _ppl_of(results, "baseline", "D16-W0-P0")
    return [
        {
            "target": "RAT+ D16-W0-P0 PPL within 5% of its dense PPL",
            "value": r16 / r_dense,
            "ok": r16 / r_dense <= 1.05,
        },
        {
            "target": "baseline D16-W0-P0 PPL at least 15% worse than its dense PPL",
            "value": b16 / b_dense,
            "ok": b16 / b_dense >= 1.15,
        },
        {
            "target": "RAT+ dense PPL at most 1.03x the baseline's dense PPL",
            "value": r_dense / b_dense,
            "ok": r_dense / b_dense <= 1.03,
        },
        *_recall_targets(results["recall"]),
    ]


def write_report(out: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    plots = _plots(out, results)
    lines = ["# ratplus demo: train dense, infer sparse", ""]
    lines += [
        *(
            [
                "A `--quick` smoke run: every budget is tiny, so the figures below show that each stage runs, "
                "not what RAT+ does (the full run's figures: docs/benchmarks/demo_seeds_cpu_20261205.md in the "
                "ratplus repository).",
                "",
            ]
            if results["config"].get("recall_quick")
            else []
        ),
        f"Bundled corpus: {results['config'].get('corpus', 'shakespeare')}; `demo` preset, context "
        f"{results['config']['seq_len']}, {results['config']['pretrain_tokens']:,} pretraining tokens per model; "
        f"wall time {results['wall_s'] / 60:.1f} min (reused stages count their original time below).",
        "",
        *_recipe_lines(results["config"]),
    ]
    lines += _models_section(results)
    lines += [
        "## Held-out perplexity",
        "",
        "| model | pattern | status | PPL | vs own dense | KV cache vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["ppl"]["rows"]:
        dense = _ppl_of(results, row["model"], "dense")
        lines.append(
            f"| {row['model']} | {row['pattern']} | {row['status']} | {row['ppl']:.2f} | "
            f"{row['ppl'] / dense:.3f}x | {row['kv_frac']:.3f} |"
        )
    lines.append("")  # a table runs into whatever follows it without a blank line
    lines += _recall_section(results["recall"])
    serve = results["serve"]["rows"]
    ctx = serve[0].get("context", results["config"]["seq_len"]) if serve else results["config"]["seq_len"]
    decode = results["config"].get("decode_tokens")
    lines += [
        "## Serving (RAT+)",
        "",
        f"Batch 1, a {ctx}-token context: a prompt of {ctx - (decode or 0)} tokens, then {decode} tokens decoded "
        f"greedily; KV-cache bytes of the full {ctx}-token context (float32, every layer, the recurrent state "
        f"included); decode tokens/s on {results['config'].get('device', 'cpu')} at this run's torch threads "
        "(at 4.7M parameters a step costs per-call overhead, not attention: differences between the rows are "
        "mostly noise).",
        "",
        "| pattern | context | KV cache bytes | decode tokens/s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['pattern']} | {r.get('context', ctx)} | {r['kv_bytes']:,} | {r['decode_tok_s']:.1f} |" for r in serve
    ]
    lines += [
        "",
        f"Sample ({results['serve']['sample_pattern']}, temperature 0.8, top-k 50). Expect gibberish with the "
        f"corpus's look (names, line breaks, verse-like fragments): a 4.7M-parameter model after "
        f"{_tokens(results['config']['pretrain_tokens'])} tokens has learnt the format at best, not the language.",
        "",
        "```",
        results["serve"]["sample"],
        "```",
        "",
        "## Targets",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['value']:.3f} | {'yes' if t['ok'] else 'NO'} |" for t in results["targets"]]
    lines += _documented_section(results)
    lines += _budget_section(results)
    lines += ["", "## Stage times (s)", ""] + [f"- {k}: {v:.0f}" for k, v in results["timings_s"].items()]
    lines += ["", "Plots: " + ", ".join(f"`{p.name}`" for p in plots)]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _tokens(n: int) -> str:
    """A token count the way the text gives it: 320K, 12K, 1.5M."""
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    return f"{n / 1e3:.3g}K" if n >= 1000 else str(n)


def _recipe_lines(config: dict[str, Any]) -> list[str]:
    pattern, warm = config.get("joint_pattern", "D64-W0-P0"), config.get("dense_warmup", 0.0)
    warm_text = f"the first {warm:.0%} of the batches dense only, then " if warm else ""
    if pattern == "D64-W0-P0" and not warm:
        why = (
            "This is the default because it measured best or tied on both bundled corpora (seed 1337): RAT+ "
            "dense PPL 0.774x the baseline's on Shakespeare and 0.946x on Wikipedia, against 0.813x / 0.945x "
            "with a D16 branch and 1.108x / 1.271x after a dense warm-up of half the batches (which also halves "
            "those batches' optimizer steps). Over three seeds (later code) the default's dense ratio spans "
            "0.835-1.015x on Shakespeare and 0.928-1.102x on Wikipedia (demo_seeds_cpu_20261205.md)"
        )
    else:
        why = "A non-default recipe; the default (D64 from the first batch) and why"
    return [
        f"RAT+ pretraining: {warm_text}joint training (a {pattern} step, then a dense step, per batch); the "
        f"baseline: joint training with its local-W64-P0 branch. {why}: "
        "docs/benchmarks/joint_recipe_cpu_20261130.md in the ratplus repository.",
        "",
    ]


def _budget_section(results: dict[str, Any]) -> list[str]:
    if "budget" not in results:
        return []
    rows = results["budget"]["rows"]
    lines = [
        "",
        f"## Quality vs KV-cache bytes (pretrained models, no adaptation; last {rows[0]['score_tokens']} tokens "
        f"of each {rows[0]['seq_len']}-token window scored after the method's cache)",
        "",
        "`local-W<w>-P4` on the baseline is StreamingLLM (sinks + window); `snapkv-C<c>-O<o>` is SnapKV eviction.",
        "",
        "| model | method | pattern | PPL | KV bytes / token | KV vs dense |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['kv_bytes_per_token']:,.0f} | "
        f"{r['kv_frac']:.3f} |"
        for r in rows
    ]
    return lines


#: The default demo's figures over three seeds each (docs/benchmarks/demo_seeds_cpu_20261205.md): name ->
#: (value per seed). Pretraining seeds 1337, 1338, 1339 (Shakespeare, one torch thread); recall seeds 0, 1, 2
#: (one thread, as the recall stage pins it). A run with the default settings is compared with them.
DOCUMENTED: dict[str, tuple[float, ...]] = {
    "RAT+ D16-W0-P0 PPL / its dense PPL": (1.0100, 1.0178, 1.0088),
    "baseline D16-W0-P0 PPL / its dense PPL": (1.3043, 1.3550, 1.3394),
    "RAT+ dense PPL / baseline dense PPL": (0.8345, 1.0153, 0.8792),
    "recall dense %": (100.0, 98.96, 100.0),
    "recall D16 % (adapted)": (98.27, 86.26, 99.84),
    "recall local-W16-P0 % (adapted control)": (25.88, 23.50, 37.50),
}
#: The settings those figures were measured at: a run that changes one of them is not compared.
DOCUMENTED_PPL_CONFIG = {
    "corpus": "shakespeare",
    "seq_len": 256,
    "batch_size": 16,
    "pretrain_tokens": 320_000,
    "pretrain_lr": 3e-3,
    "joint_pattern": "D64-W0-P0",
    "dense_warmup": 0.0,
    "adapt_tokens": 24_000,
    "ppl_tokens": 40_000,
}
DOCUMENTED_RECALL_CONFIG = {
    "recall_quick": False,
    "recall_steps": 1000,
    "recall_lr": 2e-3,
    "recall_adapt_steps": 300,
    "recall_threads": 1,
}


def documented_figures(results: dict[str, Any]) -> dict[str, float]:
    """This run's values of the figures in ``DOCUMENTED`` (ratios, and recall accuracy in %) whose
    settings match the documented ones."""
    cfg = results["config"]
    out: dict[str, float] = {}
    if all(cfg.get(k) == v for k, v in DOCUMENTED_PPL_CONFIG.items()):
        r_dense, b_dense = _ppl_of(results, "ratplus", "dense"), _ppl_of(results, "baseline", "dense")
        out["RAT+ D16-W0-P0 PPL / its dense PPL"] = _ppl_of(results, "ratplus", "D16-W0-P0") / r_dense
        out["baseline D16-W0-P0 PPL / its dense PPL"] = _ppl_of(results, "baseline", "D16-W0-P0") / b_dense
        out["RAT+ dense PPL / baseline dense PPL"] = r_dense / b_dense
    rec = results["recall"]
    if all(cfg.get(k) == v for k, v in DOCUMENTED_RECALL_CONFIG.items()):
        out["recall dense %"] = 100 * _recall_best(rec, "dense")
        out[f"recall {rec['probe_pattern']} % (adapted)"] = 100 * _recall_best(rec, rec["probe_pattern"])
        out[f"recall {rec['control']} % (adapted control)"] = 100 * _recall_best(rec, rec["control"])
    return out


def _documented_section(results: dict[str, Any]) -> list[str]:
    mine = {k: v for k, v in documented_figures(results).items() if k in DOCUMENTED}
    if not mine:
        return []
    lines = [
        "",
        "## This run against the documented seeds",
        "",
        "The same settings measured over three seeds (docs/benchmarks/demo_seeds_cpu_20261205.md in the ratplus "
        "repository). A value outside the range is not by itself a fault: three seeds show the spread, not its "
        "limits.",
        "",
        "| figure | this run | documented mean | documented range | this run in the range |",
        "|---|---|---|---|---|",
    ]
    for name, value in mine.items():
        seeds = DOCUMENTED[name]
        mean, lo, hi = sum(seeds) / len(seeds), min(seeds), max(seeds)
        fmt = "{:.1f}" if "%" in name else "{:.3f}"
        inside = "yes" if lo - 1e-9 <= round(value, 3) <= hi + 1e-9 else "no"
        lines.append(
            f"| {name} | {fmt.format(value)} | {fmt.format(mean)} | {fmt.format(lo)} - {fmt.format(hi)} "
            f"({len(seeds)} seeds) | {inside} |"
        )
    return lines


def _recall_section(recall: dict[str, Any]) -> list[str]:
    t, m, b = recall["task"], recall["model"], recall["adapt_budget"]
    p, ctrl = recall["probe_pattern"], recall["control"]
    dense = 100 * _recall_best(recall, "dense")
    lines = [
        f"## Recall probe (MQAR, RAT+ only, {t['pairs']} pairs, T={t['seq_len']}, one pair per {t['spread']} tokens)",
        "",
        f"A RAT+ of width {m['d_model']} ({m['num_layers']} layers, {m['num_heads']} heads) trained from scratch on "
        f"multi-query associative recall: {recall['steps']:,} dense steps (batch {recall['batch_size']}, "
        f"LR {recall['lr']:g}). Each adapted pattern got its own copy of that model trained "
        f"{b['steps']} steps in that pattern at LR {b['lr']:g} ({b['lr_mult']:g}x the peak, "
        f"{b.get('schedule', 'cosine')} schedule, {100 * b['fraction_of_pretraining']:.0f}% of the pretraining "
        "steps). Answers right over "
        f"{recall['test_answers']:,} test answers (a test stream disjoint from training).",
        "",
        "| pattern | zero-shot % | adapted % | adapted model, dense % | first query % |",
        "|---|---|---|---|---|",
    ]
    for r in recall["rows"]:
        cells = [r["acc"], r["acc_adapted"], r.get("acc_adapted_dense"), r.get("first_query")]
        lines.append(f"| {r['pattern']} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    best = {r["pattern"]: 100 * _recall_best(recall, r["pattern"]) for r in recall["rows"]}
    sparse, local = best[p], best[ctrl]
    lines += [
        "",
        f"Reading: dense {dense:.1f}%; "
        + ", ".join(f"{q} {v:.1f}%" for q, v in best.items() if q != "dense")
        + f" (adapted where adapted). {p} "
        + (f"keeps {sparse / max(dense, 1e-9):.0%} of the dense accuracy and is " if dense >= 90 else "is ")
        + f"{sparse - local:+.1f} points from `{ctrl}`, the control: it sees only a local window, so what it "
        "scores comes from the recurrence alone; a dilated pattern beats it only when its chunk-end keys carry "
        "the pairs between them.",
        "",
    ]
    floor = recall.get("elimination_floor")
    if floor:
        lines += [
            "The answers are teacher-forced, so a model that binds no key to its value can still rule out the "
            f"values already answered: {100 * sum(floor) / len(floor):.0f}% overall with nothing retrieved (the "
            f"last answer is always right). The first query, where that elimination gives {100 * floor[0]:.0f}%, is "
            "the clean measure of retrieval (last column, adapted where adapted).",
            "",
        ]
    lines += [
        "The adaptation budget decides the sparse rows, and this recipe sits where the task is only just learnt, "
        "so the seed moves D16 by points (the spread over seeds: docs/benchmarks/demo_seeds_cpu_20261205.md in "
        "the ratplus repository; a default run is compared with it under the targets). On a model "
        "trained 1,500 steps at 1e-3 the paper's recipe (1% of the steps at 0.1x LR) left D16 at 11% and a "
        "cosine-decayed 400 steps at 45% (recall_cpu_20261130.md). `--recall-steps`, `--recall-lr`, "
        "`--recall-adapt-steps` and `--recall-seed` change it (the other stages are reused).",
        "",
    ]
    curves = [r for r in recall["rows"] if r.get("adapt_curve")]
    if curves:
        lines += ["Accuracy during adaptation (% answers right; in brackets the same model, dense):", ""]
        lines += ["| steps | " + " | ".join(r["pattern"] for r in curves) + " |"]
        lines += ["|---" * (len(curves) + 1) + "|"]
        for i, point in enumerate(curves[0]["adapt_curve"]):
            cells = []
            for r in curves:
                c = r["adapt_curve"][i] if i < len(r["adapt_curve"]) else None
                cells.append("-" if c is None else f"{100 * c['acc']:.1f} ({100 * c['dense']:.1f})")
            lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
        lines.append("")
    if dense < 90:
        lines += [
            "The dense accuracy is below 90%: the model did not learn the task in this budget, so the "
            "sparse-vs-dense comparison above carries no information; raise `--recall-steps`.",
            "",
        ]
    return lines


def plot_ppl_by_pattern(results: dict[str, Any], path: str | Path) -> Path:
    """Each adapted pattern's held-out PPL over the model's own dense PPL, both models (``results["ppl"]``)."""
    from ratplus.eval.plots import _pyplot

    plt = _pyplot()
    # each bar runs from the model's own dense PPL (1.0) to the pattern's ratio: the differences are a few
    # percent, so the axis is zoomed to them and every bar carries its value
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.38
    ratios = []
    for i, model in enumerate(MODELS):
        dense = _ppl_of(results, model, "dense")
        vals = [_ppl_of(results, model, p) / dense for p in ADAPT_PATTERNS]
        ratios += vals
        xs = [x + (i - 0.5) * width for x in range(len(ADAPT_PATTERNS))]
        label = f"{MODEL_NAMES.get(model, model)} (dense PPL {dense:.1f})"
        ax.bar(xs, [v - 1 for v in vals], width, bottom=1.0, label=label)
        for x, v in zip(xs, vals):
            ax.annotate(
                f"{v:.3f}x",
                (x, v),
                textcoords="offset points",
                xytext=(0, 3 if v >= 1 else -10),
                ha="center",
                fontsize=8,
            )
    lo, hi = min(1.0, *ratios), max(1.0, *ratios)
    pad = 0.15 * (hi - lo) or 0.01
    ax.set_ylim(lo - pad, hi + pad)
    ax.axhline(1.0, color="gray", lw=0.8)
    kv = {r["pattern"]: r["kv_frac"] for r in results["ppl"]["rows"] if r["model"] == MODELS[0]}
    ax.set_xticks(
        range(len(ADAPT_PATTERNS)),
        [f"{p}\nKV cache {100 * kv[str(AttentionPattern.parse(p))]:.1f}% of dense" for p in ADAPT_PATTERNS],
        fontsize=8,
    )
    ax.set_ylabel("held-out PPL / own dense PPL")
    ax.set_title("Sparse inference after short adaptation (1.0 = the model's own dense PPL)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path, 120)


def _plots(out: Path, results: dict[str, Any]) -> list[Path]:
    from ratplus.eval.plots import plot_budget, plot_recall

    paths = [plot_ppl_by_pattern(results, out / "ppl_by_pattern.png")]

    rec = results["recall"]
    b = rec["adapt_budget"]
    title = (
        f"RAT+ MQAR recall: {rec['steps']} dense steps, adapt {b['steps']} steps at {b['lr_mult']:g}x LR "
        f"({b.get('schedule', 'cosine')})"
    )
    paths.append(plot_recall(rec["rows"], out / "recall_by_pattern.png", rec["control"], title))
    if "budget" in results:
        paths.append(plot_budget(results["budget"]["rows"], out / "budget.png"))
    return paths


def print_summary(results: dict[str, Any]) -> None:
    """The tables and targets, then the models' stable names and commands to run on them (last, where the
    terminal leaves the reader)."""
    print("\nmodel      pattern        PPL    vs dense")
    for row in results["ppl"]["rows"]:
        dense = _ppl_of(results, row["model"], "dense")
        print(f"{row['model']:<10} {row['pattern']:<13} {row['ppl']:7.2f}  {row['ppl'] / dense:6.3f}x")
    rec = results["recall"]
    print(
        "\nrecall accuracy % (RAT+, adapted where adapted): "
        + ", ".join(f"{r['pattern']} {100 * _recall_best(rec, r['pattern']):.1f}" for r in rec["rows"])
    )
    print("\ntargets:")
    for t in results["targets"]:
        print(f"  [{'x' if t['ok'] else ' '}] {t['target']}: {t['value']:.3f}")
    mine = {k: v for k, v in documented_figures(results).items() if k in DOCUMENTED}
    if mine:
        print("\nagainst the documented seeds (mean, range):")
        for name, value in mine.items():
            seeds = DOCUMENTED[name]
            fmt = "{:.1f}" if "%" in name else "{:.3f}"
            print(
                f"  {name}: {fmt.format(value)} (documented {fmt.format(sum(seeds) / len(seeds))}, "
                f"{fmt.format(min(seeds))} - {fmt.format(max(seeds))} over {len(seeds)} seeds)"
            )
    if results.get("models"):
        print("\nmodels (stable names):")
        for name, path in results["models"].items():
            print(f"  {name:<22} {path}")
        print("\ntry:")
        for what, cmd in try_commands(results):
            print(f"  # {what}\n  {cmd}")
