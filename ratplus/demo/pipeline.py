"""``ratplus demo``: train dense, infer sparse, end to end on a bundled corpus (Shakespeare by default).

Stages (each writes into the output folder and is skipped when its result is already there):

1. data      byte-level BPE on the training documents, token shards for train / held-out documents
2. pretrain  a ``demo``-preset RAT+ (joint training: a sparse step in ``joint_pattern`` + a dense
             step per batch, after ``dense_warmup`` of the batches trained dense only) and the
             same-size attention baseline (joint-trained with its local-window branch), same tokens
3. adapt     each model to every sparse pattern (short run, 0.1x LR, that pattern only)
4. ppl       held-out perplexity: dense (pretrained model) and each pattern (its adapted model)
5. recall    the MQAR recall probe (``ratplus.eval.recall``, ``demo_config``): a small RAT+ trained
             from scratch on associative recall, adapted to D16 and to a local-window-only control,
             accuracy per pattern (RAT+ only: the attention baseline does not learn the task densely
             in a few minutes, so its sparse rows would mean nothing)
6. serve     KV-cache bytes and decode tokens/s per pattern, and a sample text generated with D16
7. budget    held-out perplexity vs KV-cache bytes of both pretrained models (``ratplus.eval.budget``):
             RAT+ patterns, sinks + window (StreamingLLM on the baseline) and SnapKV at matched bytes
8. report    report.md, results.json, PNG plots, and the table printed

The trained models get stable names once trained: ``<out>/models/<model>`` (pretrained, dense) and
``<out>/models/<model>-<pattern>`` (adapted), relative symbolic links to the stage folders (whose names
carry a hash of their settings), rewritten on every run; ``<out>/data/heldout.jsonl`` holds the held-out
documents. The report and the printed summary give ready-to-run commands on them.

Perplexity alone cannot show that the dilated keys carry long-range information (at this scale most
prediction is local); the recall probe asks that directly, at a tiny budget (its figures say how much
adaptation they had). Time on an idle 2-core CPU: 10 min 38 s and 13 min 4 s measured (docs/guides/demo.md; the
budget is 20), ``--quick`` (a smoke run whose numbers mean nothing) about 1 minute (the budget is 3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ratplus.config import AttentionPattern, ModelConfig, check_learning_rate
from ratplus.demo import ADAPT_PATTERNS, BUDGET_PATTERNS, HELDOUT_FILE, MODELS, SAMPLE_PROMPTS, model_name
from ratplus.demo.report import check_targets, write_report
from ratplus.io.corpus import CORPORA, corpus_documents
from ratplus.io.folder import load_pretrained, load_tokenizer
from ratplus.io.tokenizer import train_bpe
from ratplus.runtime import atomic_write_text, make_dir, write_jsonl
from ratplus.train.checkpoint import remove_leftovers
from ratplus.train.data import prepare_shards

logger = logging.getLogger("ratplus")

#: Fields of RAT+'s pretraining recipe alone: the baseline's stages do not depend on them.
RATPLUS_RECIPE = ("joint_pattern", "dense_warmup")


# The config fields each stage's result depends on: a rerun reuses a stage unless one of them changed.
_PRETRAIN_FIELDS = ("corpus", "seq_len", "batch_size", "pretrain_tokens", "pretrain_lr", "seed", *RATPLUS_RECIPE)
_ADAPT_FIELDS = (*_PRETRAIN_FIELDS, "adapt_tokens")
STAGE_FIELDS = {
    "data": ("corpus",),
    "pretrain": _PRETRAIN_FIELDS,
    "adapt": _ADAPT_FIELDS,
    "ppl": (*_ADAPT_FIELDS, "ppl_tokens"),
    # the recall probe trains its own models: only its own budget matters
    "recall": ("recall_quick", "recall_steps", "recall_lr", "recall_adapt_steps", "recall_seed", "recall_threads"),
    "serve": (*_ADAPT_FIELDS, "decode_tokens"),
    "budget": (*_PRETRAIN_FIELDS, "budget_tokens", "budget_score_tokens"),
}


@dataclass
class DemoConfig:
    """Budgets of one demo run. ``quick()`` shrinks every one of them."""

    out_dir: str = "demo_out"
    corpus: str = "shakespeare"  # a bundled corpus (ratplus.io.corpus.CORPORA)
    seq_len: int = 256
    batch_size: int = 16
    pretrain_tokens: int = 320_000
    pretrain_lr: float = 3e-3
    # RAT+'s joint-training recipe: the sparse branch, and the fraction of batches trained dense only first
    joint_pattern: str = "D64-W0-P0"
    dense_warmup: float = 0.0
    adapt_tokens: int = 24_000
    ppl_tokens: int = 40_000
    recall_quick: bool = False  # True: the recall probe's smoke task and model (quick_config)
    recall_steps: int = 1000  # recall probe pretraining steps (dense, batch 64)
    recall_lr: float = 2e-3  # its peak LR (cosine), also its constant adaptation LR
    recall_adapt_steps: int = 300  # its adaptation steps per sparse pattern (at the full, constant LR)
    recall_seed: int = 0  # its seed (model init and task stream); the documented spread is over seeds 0, 1, 2
    # torch threads of the recall stage: its recipe sits on the edge of learning the task, where a different
    # summation order (another thread count) changes the result by points; pinned, it does not depend on
    # the machine's cores. Restored afterwards.
    recall_threads: int = 1
    decode_tokens: int = 48
    budget_tokens: int = 20_000
    budget_score_tokens: int = 8
    seed: int = 1337
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown bundled corpus {self.corpus!r}; choose one of {', '.join(CORPORA)}")
        self.joint_pattern = ModelConfig.from_preset("demo").training_pattern(self.joint_pattern, "--joint-pattern")
        check_learning_rate(self.pretrain_lr, "pretrain_lr")
        check_learning_rate(self.recall_lr, "recall_lr (--recall-lr)")
        if not 0 <= self.dense_warmup < 1:  # also refuses nan
            raise ValueError(f"dense_warmup is a fraction of the batches in [0, 1), got {self.dense_warmup}")
        if self.recall_threads < 1:
            raise ValueError(f"recall_threads must be >= 1, got {self.recall_threads}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        small = dict(
            pretrain_tokens=12_000,
            adapt_tokens=2_000,
            ppl_tokens=3_000,
            recall_quick=True,
            recall_steps=60,
            recall_lr=1e-3,
            recall_adapt_steps=10,
            decode_tokens=8,
            budget_tokens=2_000,
            batch_size=8,
        )
        small.update(overrides)
        return cls(**small)


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    # ---- stage bookkeeping: a stage's JSON result is its "done" marker ---------------------------------
    def _key(self, name: str) -> str:
        fields = STAGE_FIELDS[name.split("_")[0]]
        if "_baseline" in name:  # the baseline's own training does not follow RAT+'s recipe
            fields = tuple(f for f in fields if f not in RATPLUS_RECIPE)
        return json.dumps({f: getattr(self.cfg, f) for f in fields}, sort_keys=True)

    def _workdir(self, name: str) -> Path:
        """Training folder of a stage, named by its settings: a changed budget never resumes the
        checkpoints of another one."""
        return self.out / f"{name}_{hashlib.sha256(self._key(name).encode()).hexdigest()[:8]}"

    def _stage(self, name: str, fn) -> Any:
        path = self.out / "stages" / f"{name}.json"
        key = self._key(name)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("config") == key:
                print(f"[demo] {name}: reusing the finished stage ({path})")
                self.timings[name] = saved.get("seconds", 0.0)
                return saved["result"]
        print(f"[demo] {name} ...", flush=True)
        t = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t
        self.timings[name] = seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"config": key, "seconds": seconds, "result": result}, indent=2))
        print(f"[demo] {name}: done in {seconds:.0f} s", flush=True)
        return result

    # ---- 1. data ---------------------------------------------------------------------------------------
    def data(self) -> dict[str, Any]:
        vocab = ModelConfig.from_preset("demo").vocab_size
        train_docs, val_docs = self.documents("train"), self.documents("val")
        tok = train_bpe(train_docs, vocab)
        root = self.out / "data"
        root.mkdir(parents=True, exist_ok=True)
        tok.save(str(root / "tokenizer.json"))
        for split, docs in (("train", train_docs), ("val", val_docs)):
            prepare_shards(docs, tok, root / split, overwrite=True, show_progress=self.cfg.progress)
        return {"data": str(root), "train_docs": len(train_docs), "val_docs": len(val_docs), "vocab": vocab}

    def documents(self, split: str) -> list[str]:
        return corpus_documents(self.cfg.corpus, split)

    # ---- 2./3. training --------------------------------------------------------------------------------
    def train_settings(self) -> dict[str, Any]:
        """The ``TrainConfig`` fields every demo training run shares (shape, seed, bookkeeping)."""
        c = self.cfg
        return dict(
            seq_len=c.seq_len,
            batch_size=c.batch_size,
            seed=c.seed,
            device=c.device,
            progress=c.progress,
            # the ppl stage measures held-out perplexity properly: the trainer's end-of-run validation
            # loss (only logged) reads one batch, not eight (measured: 7.5 s of a 21 s adaptation)
            eval_interval=0,
            eval_batches=1,
            ckpt_interval=50,
            keep_last=1,
            resume=True,
        )

    def pretrain(self, which: str) -> dict[str, Any]:
        from ratplus.train.config import TrainConfig
        from ratplus.train.trainer import train

        c = self.cfg
        recipe = {} if which == "baseline" else dict(sparse_pattern=c.joint_pattern, dense_warmup=c.dense_warmup)
        final = train(
            TrainConfig(
                out_dir=str(self._workdir(f"pretrain_{which}")),
                model="demo",
                baseline=which == "baseline",
                data=str(self.out / "data"),
                tokens=c.pretrain_tokens,
                lr=c.pretrain_lr,
                joint_train=True,
                **recipe,
                **self.train_settings(),
            )
        )
        return {"ckpt": str(final)}

    def adapt(self, which: str, pattern: str, ckpt: str) -> dict[str, Any]:
        from ratplus.train.trainer import adapt

        final = adapt(
            ckpt,
            pattern,
            out_dir=str(self._workdir(f"adapt_{which}_{pattern}")),
            data=str(self.out / "data" / "train"),
            tokens=self.cfg.adapt_tokens,
            **{k: v for k, v in self.train_settings().items() if k != "seq_len"},
        )
        return {"ckpt": str(final)}

    # ---- the models under stable names ----------------------------------------------------------------
    def name_models(self, ckpts: dict[str, dict[str, str]]) -> dict[str, str]:
        """Point ``<out>/models/<name>`` at each model folder (``model_name``): a relative link, so the
        output folder can be moved, replaced atomically, so a rerun with other settings (new stage
        folders) moves the names with it and an interrupted rerun leaves either link, never none. Also
        writes the held-out documents to ``<out>/data/heldout.jsonl`` for ``eval ppl --data``.
        Returns name -> the link's path."""
        models = make_dir(self.out / "models")
        named = {}
        for which, by_pattern in ckpts.items():
            for pattern, ckpt in by_pattern.items():
                link = models / model_name(which, pattern)
                if link.exists() and not link.is_symlink():
                    raise ValueError(
                        f"{link} is not a link the demo made; move it away to let the demo name its models"
                    )
                tmp = models / f".{link.name}.tmp-{os.getpid()}"
                tmp.unlink(missing_ok=True)
                os.symlink(os.path.relpath(ckpt, models), tmp, target_is_directory=True)
                os.replace(tmp, link)  # rename(2) replaces the old link itself, never the folder it points to
                named[link.name] = str(link)
        write_jsonl(self.out / "data" / HELDOUT_FILE, [{"text": t} for t in self.documents("val")])
        return named

    # ---- 4. perplexity -----------------------------------------------------------------------------------
    def ppl(self, ckpts: dict[str, dict[str, str]]) -> dict[str, Any]:
        from ratplus.eval.common import open_checkpoint
        from ratplus.eval.ppl import evaluate_ppl

        texts = self.documents("val")
        rows = []
        for which in MODELS:
            for pattern, ckpt in ckpts[which].items():
                em = open_checkpoint(ckpt, device=self.cfg.device)
                em.label = which
                (row,) = evaluate_ppl(
                    em,
                    texts,
                    [pattern],
                    seq_len=self.cfg.seq_len,
                    max_tokens=self.cfg.ppl_tokens,
                    progress=self.cfg.progress,
                )
                rows.append(row)
        return {"rows": rows}

    # ---- 5. recall probe ---------------------------------------------------------------------------
    def recall(self) -> dict[str, Any]:
        from ratplus.eval.recall import demo_config, run_recall_probe

        c = self.cfg
        cfg = demo_config(
            c.recall_quick,
            steps=c.recall_steps,
            lr=c.recall_lr,
            adapt_steps=c.recall_adapt_steps,
            seed=c.recall_seed,
            threads=c.recall_threads,
            progress=c.progress,
        )
        threads = torch.get_num_threads()
        try:  # the probe writes its own recall.json / recall.png / weights there; the report draws its plot
            rec = run_recall_probe(cfg, self._workdir("recall"), plot=False)
        finally:  # the pinned thread count is this stage's alone
            torch.set_num_threads(threads)
        keep = ("model", "pattern", "kind", "dilation", "acc", "acc_adapted", "acc_adapted_dense", "frac_of_dense")
        keep += ("adapt_curve", "first_query")
        adapted = cfg.sparse_adapt_patterns()
        t = cfg.task
        return {
            "rows": [{k: r.get(k) for k in keep} for r in rec["rows"]],
            "control": rec["control"],
            "elimination_floor": rec["elimination_floor"],
            # the pattern the targets check: the first adapted dilated one (D16; D8 in the quick task)
            "probe_pattern": next(p for p in adapted if AttentionPattern.parse(p).dilation_size is not None),
            "adapt_budget": rec["adapt_budget"],
            "task": {"pairs": t.pairs, "seq_len": t.seq_len, "spread": t.spread, "vocab": t.vocab_size},
            "model": {"d_model": cfg.d_model, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads},
            "steps": cfg.steps,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "threads": cfg.threads,
            "batch_size": cfg.batch_size,
            "test_answers": cfg.eval_batches * cfg.batch_size * t.pairs,
            "json": rec["json"],
        }

    # ---- 6. serving figures ---------------------------------------------------------------------------
    def serve(self, ckpts: dict[str, dict[str, str]]) -> dict[str, Any]:
        from ratplus.generation import generate
        from ratplus.model.cache import RATPlusCache

        c = self.cfg
        rows = []
        prompt_len = c.seq_len - c.decode_tokens
        gen = torch.Generator().manual_seed(c.seed)
        for pattern, ckpt in ckpts["ratplus"].items():
            model = load_pretrained(ckpt, device=c.device)
            cache = RATPlusCache(model.config, pattern, batch_size=1, max_len=c.seq_len)
            prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
            with torch.inference_mode():
                generate(model, prompt, 2, pattern=pattern)  # warm-up
                t = time.perf_counter()
                generate(model, prompt, c.decode_tokens, pattern=pattern, stop_tokens=[])
                seconds = time.perf_counter() - t
            rows.append(
                {
                    "pattern": pattern,
                    "kv_bytes": cache.nbytes(),
                    "decode_tok_s": c.decode_tokens / seconds,
                    "context": c.seq_len,
                }
            )
        model = load_pretrained(ckpts["ratplus"]["D16-W0-P0"], device=c.device)
        tok = load_tokenizer(ckpts["ratplus"]["D16-W0-P0"])
        prompt = torch.tensor([tok.encode(SAMPLE_PROMPTS.get(c.corpus, "The ")).ids])
        out = generate(
            model,
            prompt,
            80,
            pattern="D16-W0-P0",
            temperature=0.8,
            top_k=50,
            generator=torch.Generator().manual_seed(c.seed),
        )
        return {"rows": rows, "sample_pattern": "D16-W0-P0", "sample": tok.decode(out[0].tolist())}

    # ---- 7. quality vs KV bytes ----------------------------------------------------------------------
    def budget(self, ckpts: dict[str, dict[str, str]]) -> dict[str, Any]:
        from ratplus.eval.budget import evaluate_budget
        from ratplus.eval.common import open_checkpoint

        models = []
        for which in MODELS:
            em = open_checkpoint(ckpts[which]["dense"], device=self.cfg.device)
            em.label = which
            models.append(em)
        rows = evaluate_budget(
            models,
            self.documents("val"),
            list(BUDGET_PATTERNS),
            seq_len=self.cfg.seq_len,
            score_tokens=self.cfg.budget_score_tokens,
            max_tokens=self.cfg.budget_tokens,
            progress=self.cfg.progress,
        )
        return {"rows": rows}

    # ---- orchestration ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        # temporary folders of a run killed midway (its finished stages are reused, never rewritten);
        # the caller holds the output folder's lock (ratplus.cli.demo), so no live writer is inside
        remove_leftovers(self.out, recursive=True)
        self.results["data"] = self._stage("data", self.data)
        ckpts: dict[str, dict[str, str]] = {m: {} for m in MODELS}
        for which in MODELS:
            ckpts[which]["dense"] = self._stage(f"pretrain_{which}", lambda w=which: self.pretrain(w))["ckpt"]
        for which in MODELS:
            for pattern in ADAPT_PATTERNS:
                res = self._stage(
                    f"adapt_{which}_{pattern}", lambda w=which, p=pattern: self.adapt(w, p, ckpts[w]["dense"])
                )
                ckpts[which][pattern] = res["ckpt"]
        self.results["checkpoints"] = ckpts
        self.results["models"] = self.name_models(ckpts)
        self.results["ppl"] = self._stage("ppl", lambda: self.ppl(ckpts))
        self.results["recall"] = self._stage("recall", self.recall)
        self.results["serve"] = self._stage("serve", lambda: self.serve(ckpts))
        self.results["budget"] = self._stage("budget", lambda: self.budget(ckpts))
        self.results["timings_s"] = dict(self.timings)
        self.results["wall_s"] = time.perf_counter() - t0
        self.results["targets"] = check_targets(self.results)
        self.results["config"] = dataclasses.asdict(self.cfg)
        write_report(self.out, self.results)
        return self.results
