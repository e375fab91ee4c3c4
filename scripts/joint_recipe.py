"""Dense quality cost of RAT+'s joint-training branch at demo scale (issue 12, last bullet).

Trains the demo-size RAT+ and attention baseline on one bundled corpus with the demo's budget
(320K tokens, T=256, batch 16, peak LR 3e-3, seed 1337), one run per recipe, and scores each on the
corpus's held-out documents: dense perplexity and zero-shot sparse perplexities (no adaptation).
Results go to <out>/<corpus>/results.jsonl (one line per finished recipe, so a rerun skips those).

    OMP_NUM_THREADS=1 python scripts/joint_recipe.py --corpus wikipedia --recipes rat-D64,base-local64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ratplus.eval.common import open_checkpoint
from ratplus.eval.ppl import evaluate_ppl
from ratplus.io.corpus import CORPORA, corpus_documents
from ratplus.io.tokenizer import train_bpe
from ratplus.train.config import TrainConfig
from ratplus.train.data import prepare_shards
from ratplus.train.trainer import train

#: recipe name -> (baseline?, TrainConfig fields). "rat-D64" is the demo's recipe.
RECIPES: dict[str, tuple[bool, dict]] = {
    "rat-D64": (False, dict(sparse_pattern="D64-W0-P0")),
    "rat-D16": (False, dict(sparse_pattern="D16-W0-P0")),
    "rat-D16-warm50": (False, dict(sparse_pattern="D16-W0-P0", dense_warmup=0.5)),
    "rat-D64-warm50": (False, dict(sparse_pattern="D64-W0-P0", dense_warmup=0.5)),
    "rat-dense": (False, dict(joint_train=False)),
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
    args = ap.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(1)
    root = Path(args.out) / args.corpus
    data = root / "data"
    if not (data / "val" / "meta.json").is_file():
        train_docs, val_docs = corpus_documents(args.corpus, "train"), corpus_documents(args.corpus, "val")
        tok = train_bpe(train_docs, 4096)
        data.mkdir(parents=True, exist_ok=True)
        tok.save(str(data / "tokenizer.json"))
        for split, docs in (("train", train_docs), ("val", val_docs)):
            prepare_shards(docs, tok, data / split, overwrite=True, show_progress=False)
    results = root / "results.jsonl"
    done = {json.loads(line)["recipe"] for line in results.read_text().splitlines()} if results.is_file() else set()
    val_texts = corpus_documents(args.corpus, "val")
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
                tokens=args.tokens,
                lr=3e-3,
                seq_len=256,
                batch_size=16,
                seed=args.seed,
                device="cpu",
                progress=False,
                eval_interval=0,
                ckpt_interval=50,
                keep_last=1,
                resume=True,
                **fields,
            )
        )
        seconds = time.perf_counter() - t0
        em = open_checkpoint(final)
        rows = evaluate_ppl(em, val_texts, list(EVAL_PATTERNS), seq_len=256, max_tokens=args.ppl_tokens, progress=False)
        rec = {"recipe": key, "seed": args.seed, "train_s": seconds, "ppl": {r["pattern"]: r["ppl"] for r in rows}}
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
