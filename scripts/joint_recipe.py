"""Dense quality cost of RAT+'s joint-training branch at demo scale (issue 12, last bullet).

Trains the demo-size RAT+ and attention baseline on one bundled corpus with the demo's budget
(320K tokens, T=256, batch 16, peak LR 3e-3, seed 1337), one run per recipe, and scores each on the
corpus's held-out documents: dense perplexity and zero-shot sparse perplexities (no adaptation).
Results go to <out>/<corpus>/results.jsonl (one line per finished recipe, so a rerun skips those).

    OMP_NUM_THREADS=1 python scripts/joint_recipe.py --corpus wikipedia --recipes rat-D64,base-local64
    python scripts/joint_recipe.py --corpus shakespeare --cross   # finished runs, scored on the other corpus
    python scripts/joint_recipe.py --corpus shakespeare --table   # every corpus's results as tables
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ratplus.demo.pipeline import Demo, DemoConfig
from ratplus.eval.common import open_checkpoint
from ratplus.eval.ppl import evaluate_ppl
from ratplus.io.corpus import CORPORA, corpus_documents
from ratplus.train.config import TrainConfig
from ratplus.train.data import META_FILE
from ratplus.train.trainer import train

#: recipe name -> (baseline?, TrainConfig fields). "rat-D64" is the demo's recipe.
RECIPES: dict[str, tuple[bool, dict]] = {
    "rat-D64": (False, dict(sparse_pattern="D64-W0-P0")),
    "rat-D16": (False, dict(sparse_pattern="D16-W0-P0")),
    "rat-D16-warm50": (False, dict(sparse_pattern="D16-W0-P0", dense_warmup=0.5)),
    "rat-D64-warm50": (False, dict(sparse_pattern="D64-W0-P0", dense_warmup=0.5)),
    "rat-dense": (False, dict(joint_train=False)),
    # two dense optimizer steps per batch: as many steps as joint training, without a sparse branch
    "rat-dense2": (False, dict(sparse_pattern="dense")),
    "base-local64": (True, dict(sparse_pattern="local-W64-P0")),
    "base-dense": (True, dict(joint_train=False)),
}
EVAL_PATTERNS = ("dense", "D16-W0-P0", "D64-W0-P0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", choices=CORPORA, required=True)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    ap.add_argument("--out", default="runs/joint_recipe")
    ap.add_argument("--tokens", type=int, default=320_000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--ppl-tokens", type=int, default=40_000)
    ap.add_argument(
        "--cross",
        action="store_true",
        help="only score the finished runs on the other corpus's held-out documents (out of domain), then exit",
    )
    ap.add_argument("--table", action="store_true", help="only print the results of every corpus as a table")
    args = ap.parse_args()
    if args.table:
        print_table(Path(args.out))
        return
    if args.cross:
        cross_eval(Path(args.out) / args.corpus, args.corpus, args.ppl_tokens)
        return
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(1)
    root = Path(args.out) / args.corpus
    # the demo's own data stage and training settings, so each run here is the demo's pretraining
    cfg = DemoConfig(out_dir=str(root), corpus=args.corpus, pretrain_tokens=args.tokens, seed=args.seed, progress=False)
    demo = Demo(cfg)
    data = root / "data"
    if not (data / "val" / META_FILE).is_file():
        demo.data()
    results = root / "results.jsonl"
    done = {r["recipe"] for r in _records(results)}
    val_texts = demo.documents("val")
    for name in recipes:
        key = f"{name}-s{args.seed}"
        if key in done:
            continue
        baseline, fields = RECIPES[name]
        t0 = time.perf_counter()
        final = train(
            TrainConfig(
                out_dir=str(root / key),
                model="demo",
                baseline=baseline,
                data=str(data),
                tokens=cfg.pretrain_tokens,
                lr=cfg.pretrain_lr,
                **demo.train_settings(),
                **fields,
            )
        )
        seconds = time.perf_counter() - t0
        em = open_checkpoint(final)
        patterns = list(EVAL_PATTERNS)
        rows = evaluate_ppl(em, val_texts, patterns, seq_len=cfg.seq_len, max_tokens=args.ppl_tokens, progress=False)
        rec = {"recipe": key, "seed": args.seed, "train_s": seconds, "ppl": {r["pattern"]: r["ppl"] for r in rows}}
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


def _records(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (none when it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def cross_eval(root: Path, corpus: str, ppl_tokens: int) -> None:
    """Dense perplexity of every finished run of ``root`` on the other corpus's held-out documents
    (scored with the run's own tokenizer), appended to cross.jsonl (runs already there are skipped)."""
    other = next(c for c in CORPORA if c != corpus)
    texts = corpus_documents(other, "val")
    recs = _records(root / "results.jsonl")
    cross = root / "cross.jsonl"
    done = {r["recipe"] for r in _records(cross)}
    torch.set_num_threads(1)
    for rec in recs:
        if rec["recipe"] not in done:
            em = open_checkpoint(root / rec["recipe"] / "final")
            (row,) = evaluate_ppl(em, texts, ["dense"], seq_len=256, max_tokens=ppl_tokens, progress=False)
            line = {"recipe": rec["recipe"], "corpus": other, "dense": row["ppl"]}
            with cross.open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)


def print_table(out: Path) -> None:
    for corpus in CORPORA:
        recs = {r["recipe"]: r for r in _records(out / corpus / "results.jsonl")}
        if not recs:
            continue
        print(f"\n{corpus}\n")
        print("| recipe | dense PPL | vs baseline dense | D16 zero-shot / dense | D64 zero-shot / dense | train s |")
        print("|---|---|---|---|---|---|")
        for name, r in recs.items():
            p = r["ppl"]
            base = recs.get(f"base-local64-s{r['seed']}")  # the baseline of the same seed
            vs = f"{p['dense'] / base['ppl']['dense']:.3f}x" if base else "-"
            d16, d64 = p["D16-W0-P0"] / p["dense"], p["D64-W0-P0"] / p["dense"]
            print(f"| {name} | {p['dense']:.2f} | {vs} | {d16:.3f}x | {d64:.3f}x | {r['train_s']:.0f} |")
        cross = {r["recipe"]: r for r in _records(out / corpus / "cross.jsonl")}
        if cross:
            base_x = next((r["dense"] for k, r in cross.items() if k.startswith("base-local64")), None)
            print(f"\ntrained on {corpus}, scored on the other corpus's held-out documents ({corpus} tokenizer)\n")
            print("| recipe | dense PPL | vs baseline |\n|---|---|---|")
            for name, r in cross.items():
                vs = f"{r['dense'] / base_x:.3f}x" if base_x else "-"
                print(f"| {name} | {r['dense']:.2f} | {vs} |")


if __name__ == "__main__":
    main()
