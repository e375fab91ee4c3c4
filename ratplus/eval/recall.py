"""Multi-query associative recall (MQAR): does sparse inference keep in-context retrieval?

Shapes: B batch (sequences), T sequence length, V vocab (filler + key + value tokens).

The task (the Zoology study's MQAR, arranged so dilation cannot cheat): a body of filler tokens holds
``pairs`` key-value pairs written as two adjacent tokens ``k v``; the body is cut into chunks of
``spread`` tokens and each chunk holds at most one pair, at a random offset inside its chunk, so a
pair lands on a chunk end (a dilated key when ``spread`` = D) only as often as chance allows. After
the body every key is queried once, in random order, each followed by its value; only those answers
are targets. Filler, key and value tokens come from separate vocabularies, so the answer can only be
found by looking the key up in the context. The answers are teacher-forced, so a model that binds
nothing can still rule out the values already answered (``elimination_floor``: about 41% at 6
pairs); the first query's accuracy (``first_query``) is the clean measure of retrieval.
``packed=True`` writes the pairs next to each other at a random place in the body instead (for comparison).

The probe trains a RAT+ model and an attention baseline of the same size from scratch on this task
with the project's training semantics (``ratplus.train.trainer.optimizer_steps``: joint training is a
sparse optimizer step then a dense one on the same batch; the baseline's sparse branch is a local
window), optionally adapts each to every sparse pattern (DESIGN.md section 5, resolution adaptation),
and reports answer accuracy per pattern: a table, ``recall.json`` and ``recall.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ratplus.config import AttentionPattern, ModelConfig, check_ints, check_learning_rate, is_real
from ratplus.eval.plots import plot_recall
from ratplus.io.folder import load_config, load_into, load_pretrained, save_pretrained
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import atomic_write_text, check_fits_memory, make_dir, print_table
from ratplus.train.data import IGNORE_INDEX
from ratplus.train.step import build_optimizer, lr_factor, optimizer_steps

SPLITS = {"train": 0, "test": 1}  # separate seed streams: a test sequence is never a training one


# ---- the task ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallTask:
    """One MQAR setting. Token ids: filler [0, F), keys [F, F + K), values [F + K, F + K + V)."""

    pairs: int = 6
    spread: int = 16
    seq_len: int = 128
    filler_vocab: int = 16
    key_vocab: int = 64
    value_vocab: int = 64
    packed: bool = False

    def __post_init__(self) -> None:
        check_ints(self, ("pairs", "spread", "seq_len", "filler_vocab", "key_vocab", "value_vocab"), 1)
        if self.spread < 2:
            raise ValueError(f"spread must be >= 2 (a pair takes two tokens of its chunk), got {self.spread}")
        if self.key_vocab < self.pairs:
            raise ValueError(f"key_vocab={self.key_vocab} is too small for {self.pairs} distinct keys (pairs)")
        if self.value_vocab < self.pairs:
            raise ValueError(f"value_vocab={self.value_vocab} is too small for {self.pairs} distinct values (pairs)")
        if self.body_len < 2 * self.pairs:
            raise ValueError(
                f"seq_len={self.seq_len} is too short: {self.pairs} pairs need {2 * self.pairs} body tokens plus "
                f"{2 * self.pairs} query tokens"
            )
        if not self.packed and self.num_chunks < self.pairs:
            raise ValueError(
                f"pairs={self.pairs} is more than the {self.num_chunks} chunks of spread={self.spread} tokens "
                f"in the {self.body_len}-token body (seq_len={self.seq_len}); at most one pair per chunk"
            )

    @property
    def vocab_size(self) -> int:
        return self.filler_vocab + self.key_vocab + self.value_vocab

    @property
    def body_len(self) -> int:
        """Tokens before the queries; the queries take the last 2 * pairs tokens."""
        return self.seq_len - 2 * self.pairs

    @property
    def num_chunks(self) -> int:
        return self.body_len // self.spread

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RecallBatch:
    """input_ids (B, T) int64; labels (B, T) int64, -100 except where the next token is a queried value;
    ``pair_pos`` (B, pairs) body position of each pair's key (its value follows); ``query_pos`` (B, pairs)
    position of each queried key (its value, the answer, follows)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pair_pos: torch.Tensor
    query_pos: torch.Tensor


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], index])


def make_batch(task: RecallTask, batch_size: int, seed: int = 0, split: str = "train", index: int = 0) -> RecallBatch:
    """Batch ``index`` of the ``split`` stream of ``seed``: the same arguments give the same batch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rng = _rng(seed, split, index)
    n, T, F = task.pairs, task.seq_len, task.filler_vocab
    tokens = rng.integers(0, F, size=(batch_size, T))
    pair_pos = np.zeros((batch_size, n), dtype=np.int64)
    query_pos = np.zeros((batch_size, n), dtype=np.int64)
    labels = np.full((batch_size, T), IGNORE_INDEX, dtype=np.int64)
    for b in range(batch_size):
        keys = F + rng.choice(task.key_vocab, size=n, replace=False)
        values = F + task.key_vocab + rng.choice(task.value_vocab, size=n, replace=False)
        if task.packed:
            start = rng.integers(0, task.body_len - 2 * n + 1)
            pos = start + 2 * np.arange(n)
        else:
            chunks = np.sort(rng.choice(task.num_chunks, size=n, replace=False))
            # any offset that keeps both tokens inside the chunk: a value lands on the chunk end 1/(spread-1)
            pos = chunks * task.spread + rng.integers(0, task.spread - 1, size=n)
        tokens[b, pos], tokens[b, pos + 1] = keys, values
        order = rng.permutation(n)
        q = task.body_len + 2 * np.arange(n)
        tokens[b, q], tokens[b, q + 1] = keys[order], values[order]
        labels[b, q] = values[order]  # labels[t] is the token after input t: the answer follows its key
        pair_pos[b], query_pos[b] = pos, q
    return RecallBatch(
        torch.from_numpy(tokens).long(),
        torch.from_numpy(labels),
        torch.from_numpy(pair_pos),
        torch.from_numpy(query_pos),
    )


def batches(task: RecallTask, batch_size: int, seed: int, split: str, start: int = 0) -> Iterator[RecallBatch]:
    """The endless ``split`` stream of ``seed`` from batch ``start``."""
    i = start
    while True:
        yield make_batch(task, batch_size, seed, split, i)
        i += 1


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) greedy answers: argmax of logits (B, T, V) against labels (B, T) where labels != -100."""
    mask = labels != IGNORE_INDEX
    total = int(mask.sum())
    correct = int((logits.argmax(-1)[mask] == labels[mask]).sum())
    return correct, total


@torch.no_grad()
def answer_matrix(model: RATPlusLM, test: list[RecallBatch], pattern: str) -> torch.Tensor:
    """(N, pairs) bool: is the j-th query's greedy answer right, for every test sequence, under ``pattern``."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for b in test:
        pred = model(b.input_ids.to(device), pattern=pattern).argmax(-1)  # (B, T)
        qp = b.query_pos.to(device)
        out.append(pred.gather(1, qp) == b.labels.to(device).gather(1, qp))
    return torch.cat(out).cpu()


def evaluate_accuracy(model: RATPlusLM, test: list[RecallBatch], pattern: str) -> float:
    """Fraction of query answers right under ``pattern`` over the test batches."""
    return float(answer_matrix(model, test, pattern).float().mean())


def elimination_floor(pairs: int) -> list[float]:
    """Accuracy per query index of a model that binds nothing but rules out the values already answered.

    The answers are teacher-forced, so before the j-th query j of the ``pairs`` values are known; a model
    that only knows which values the body holds picks among the other ``pairs - j``: 1 / (pairs - j), a
    mean of about 41% at 6 pairs with the last answer always right. Only the first query (1 / pairs)
    measures retrieval cleanly; ``first_query`` in the probe's rows."""
    return [1 / (pairs - j) for j in range(pairs)]


# ---- the probe -------------------------------------------------------------------------------------


def default_patterns(seq_len: int, local: int = 16) -> list[str]:
    """dense, D4..D32 (and D64 from T=512), D16 with a small window and initial tokens, a local-only
    control, top-k Quest and MoBA with about as many keys as D16 sees."""
    dils = [4, 8, 16, 32] + ([64] if seq_len >= 512 else [])
    block = max(4, seq_len // 32)
    top_k = max(1, seq_len // (16 * block))
    topk = f"topk-B{block}-K{top_k}-W{block}-P0"
    return ["dense", *(f"D{d}" for d in dils), "D16-W8-P4", f"local-W{local}-P0", f"{topk}-quest", f"{topk}-moba"]


@dataclass
class RecallConfig:
    """Every knob of ``run_recall_probe``."""

    task: RecallTask = field(default_factory=RecallTask)
    # model: both share this size; the baseline drops the recurrence (apply_re=False)
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    # pretraining: AdamW + cosine (trainer semantics); joint = a sparse then a dense optimizer step per batch
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: float = 0.05
    weight_decay: float = 0.1
    joint_train: bool = True
    joint_pattern: str = "D16-W0-P0"  # the RAT+ sparse branch
    baseline_joint_pattern: str = "local-W16-P0"  # the baseline's: a local window, no dilation
    dense_warmup_steps: int = 0  # dense-only steps before joint training starts (counted in steps)
    # resolution adaptation per sparse pattern (0 steps = none); paper: ~1% of pretraining at 0.1x LR
    adapt_steps: int = 0
    adapt_lr_mult: float = 0.1
    adapt_constant_lr: bool = False  # True: the adaptation LR stays at its peak (no cosine decay)
    adapt_eval_every: int = 0  # > 0: accuracy every that many adaptation steps (the adaptation curve)
    adapt_patterns: list[str] | None = None  # None: every sparse dilated/local pattern evaluated
    # evaluation
    patterns: list[str] | None = None  # None: default_patterns(seq_len)
    eval_batches: int = 8
    models: tuple[str, ...] = ("ratplus", "baseline")
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        check_ints(self, ("d_model", "num_layers", "num_heads", "steps", "batch_size", "eval_batches"), 1)
        check_ints(self, ("adapt_steps", "dense_warmup_steps", "adapt_eval_every"), 0)
        if self.threads is not None:
            check_ints(self, ("threads",), 0)
        if self.dense_warmup_steps > self.steps:
            raise ValueError(f"dense_warmup_steps={self.dense_warmup_steps} is more than steps={self.steps}")
        check_learning_rate(self.lr, "lr")
        check_learning_rate(self.min_lr, "min_lr", allow_zero=True)
        if not (is_real(self.adapt_lr_mult) and math.isfinite(self.adapt_lr_mult) and self.adapt_lr_mult > 0):
            raise ValueError(f"adapt_lr_mult must be a finite number > 0, got {self.adapt_lr_mult!r}")
        check_learning_rate(self.lr * self.adapt_lr_mult, "the adaptation LR (lr x adapt_lr_mult)")
        bad = [m for m in self.models if m not in ("ratplus", "baseline")]
        if bad or not self.models:
            raise ValueError(f"models must be a non-empty subset of ratplus, baseline, got {list(self.models)}")
        config = self.model_config(baseline=False)
        evaluated = []
        for p in self.all_patterns():
            try:
                text = config.canonical_pattern(p)
            except ValueError as e:
                raise ValueError(f"patterns: {e}") from e
            D = _pattern(p).dilation_size
            if D is not None and self.task.seq_len <= D:
                raise ValueError(
                    f"patterns: {p} has dilation {D} >= seq_len={self.task.seq_len}: no query of the task "
                    "sees a dilated key (use a dilation below the context, or a longer seq_len)"
                )
            evaluated.append(text)
        config.training_pattern(self.joint_pattern, "joint_pattern (--joint-pattern)")
        config.training_pattern(self.baseline_joint_pattern, "baseline_joint_pattern")
        for p in self.adapt_patterns or []:
            if config.training_pattern(p, "adapt_patterns (--adapt-patterns)") not in evaluated:
                raise ValueError(
                    f"adapt_patterns (--adapt-patterns): {p} is not among the evaluated patterns "
                    f"({', '.join(self.all_patterns())}); add it to --patterns"
                )

    def check_memory(self, device: torch.device | str = "cpu") -> None:
        """Refuse, before anything is allocated, a probe whose model, optimizer state or largest
        activation cannot fit the memory available now (sizes come from the flags, so a typo such as
        ``--value-vocab 100000000`` must not start allocating tens of GB)."""
        config = self.model_config(baseline=False)
        B, T, V, C = self.batch_size, self.task.seq_len, self.task.vocab_size, self.d_model
        weights = 4 * config.num_params()
        # weights + gradients + two AdamW moments; the logits with their gradient and softmax copy, and
        # per layer the saved activations of a step (about 30 C floats per token, measured order)
        train = 4 * weights + 4 * B * T * (3 * V + 30 * C * self.num_layers)
        tasks = 8 * B * T * (self.eval_batches + 2)  # the test batches held for the whole run (int64)
        check_fits_memory(train + tasks, f"the recall probe (batch {B} x {T} tokens, vocab {V}, d_model {C})", device)

    def all_patterns(self) -> list[str]:
        return list(self.patterns) if self.patterns is not None else default_patterns(self.task.seq_len)

    def sparse_adapt_patterns(self) -> list[str]:
        if self.adapt_patterns is not None:
            return list(self.adapt_patterns)
        # top-k and SnapKV are inference-time patterns (no training path): evaluated without adaptation
        return [p for p in self.all_patterns() if not (_pattern(p).is_dense or _pattern(p).inference_only)]

    def model_config(self, baseline: bool) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.task.vocab_size,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            max_seq_len=self.task.seq_len,
            apply_re=not baseline,
            name="recall-baseline" if baseline else "recall-ratplus",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["models"] = list(self.models)
        return d


def _pattern(text: str) -> AttentionPattern:
    return AttentionPattern.parse(text)


def quick_config(**overrides: Any) -> RecallConfig:
    """A smoke budget (well under 2 minutes on 2 cores): tiny task and model, few steps."""
    base = dict(
        task=RecallTask(pairs=2, spread=8, seq_len=48, filler_vocab=8, key_vocab=16, value_vocab=16),
        d_model=32,
        num_layers=2,
        num_heads=2,
        steps=60,
        batch_size=16,
        joint_pattern="D8-W0-P0",
        baseline_joint_pattern="local-W8-P0",
        adapt_steps=10,
        adapt_lr_mult=1.0,
        patterns=["dense", "D4", "D8", "D8-W4-P2", "local-W8-P0", "topk-B8-K1-W8-P0-quest", "topk-B8-K1-W8-P0-moba"],
        adapt_patterns=["D8", "local-W8-P0"],
        eval_batches=2,
    )
    base.update(overrides)
    return RecallConfig(**base)


def demo_config(quick: bool = False, **overrides: Any) -> RecallConfig:
    """The budget for the demo's recall stage (``quick``: the smoke budget). RAT+ only: in a few minutes
    the attention baseline does not learn the task densely, so its sparse rows would mean nothing.

    1,000 dense steps at 2e-3, then 300 adaptation steps at that full, constant LR to D16 and to the
    local-only control. Measured (one thread): seed 0 100% dense, D16 71% / 94% / 99% after 200 / 250 /
    300 adaptation steps, the control 26% at 300; seed 1 99% dense, D16 85%, control 25%. The earlier
    recipe (1,500 steps at 1e-3, 500 adaptation steps) gave D16 89.5% and took 1.6x as long; 1e-3 with a
    1,000-step cosine schedule stays at 15% (the LR decays before the task is learnt), as does batch 32
    at 1,500 steps, and 3e-3 over 700 steps had not learnt it for seed 1 (12% dense); a cosine-decayed
    adaptation or the paper's 1% of the steps at 0.1x LR leave D16 at 45% / 11%.
    docs/benchmarks/recall_cpu_20261130.md."""
    if quick:
        return quick_config(**{"models": ("ratplus",), "adapt_constant_lr": True, "adapt_eval_every": 5, **overrides})
    base = dict(
        steps=1000,
        lr=2e-3,
        joint_train=False,
        adapt_steps=300,
        adapt_lr_mult=1.0,
        adapt_constant_lr=True,
        adapt_eval_every=50,
        patterns=["dense", "D4", "D16", "D32", "local-W16-P0", "topk-B8-K2-W8-P0-quest", "topk-B8-K2-W8-P0-moba"],
        adapt_patterns=["D16", "local-W16-P0"],
        models=("ratplus",),
    )
    base.update(overrides)
    return RecallConfig(**base)


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(RecallTask))
OPTION_NAMES = frozenset(TASK_FIELDS) | {f.name for f in dataclasses.fields(RecallConfig)} - {"task", "progress"}


def recall_config(quick: bool = False, **given: Any) -> RecallConfig:
    """A ``RecallConfig`` from the defaults (or ``quick_config()``) with the ``given`` knobs replaced;
    knobs named like ``RecallTask`` fields (pairs, spread, seq_len, ...) go to the task. ``None`` values
    are ignored; when the context changes and no patterns are given, the default patterns follow it."""
    given = {k: v for k, v in given.items() if v is not None}
    base = quick_config() if quick else RecallConfig()
    task_over = {k: given.pop(k) for k in list(given) if k in TASK_FIELDS}
    known = {f.name for f in dataclasses.fields(RecallConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown recall option(s): {', '.join(unknown)}")
    if "models" in given:
        given["models"] = tuple(given["models"])
    cfg = dataclasses.replace(base, task=dataclasses.replace(base.task, **task_over), **given)
    if quick and "seq_len" in task_over and "patterns" not in given:
        cfg.patterns, cfg.adapt_patterns = None, given.get("adapt_patterns")
    cfg.validate()
    return cfg


def _train(
    model: RATPlusLM,
    cfg: RecallConfig,
    steps: int,
    lr: float,
    warmup: float,
    patterns_at: Any,
    desc: str,
    split_seed: int,
    constant_lr: bool = False,
    after_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """``steps`` batches of the train stream; ``patterns_at(i)`` gives the optimizer-step patterns of
    batch i (``[sparse, "dense"]`` for a joint step). The LR follows warmup + cosine to ``min_lr``,
    or stays at ``lr`` with ``constant_lr``; ``after_step(n)`` runs after batch n (1-based). Returns a
    short loss log."""
    model.train()
    opt = build_optimizer(model, lr, cfg.weight_decay)
    warmup_steps = int(warmup * steps)
    factor = (lambda s: 1.0) if constant_lr else (lambda s: lr_factor(s, steps, warmup_steps, lr, cfg.min_lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    log: list[dict[str, float]] = []
    stream = batches(cfg.task, cfg.batch_size, split_seed, "train")
    bar = tqdm(range(steps), desc=desc, disable=not cfg.progress, leave=False)
    for i in bar:
        b = next(stream)
        losses, _ = optimizer_steps(model, opt, [(b.input_ids, b.labels)], patterns_at(i))
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"{desc}: loss is {next(iter(bad.values()))} at step {i + 1} (pattern {next(iter(bad))}); "
                f"the run diverged at lr={lr:g}: lower the learning rate"
            )
        sched.step()
        if i % 50 == 0 or i == steps - 1:
            log.append({"step": i + 1, **losses})
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        if after_step is not None:
            after_step(i + 1)
            model.train()
    model.eval()
    return log


def pretrain(model: RATPlusLM, cfg: RecallConfig, baseline: bool) -> list[dict[str, float]]:
    """Training from scratch: dense for ``dense_warmup_steps`` batches, then joint (sparse + dense) or dense."""
    sparse = cfg.baseline_joint_pattern if baseline else cfg.joint_pattern

    def patterns_at(i: int) -> list[str]:
        return [sparse, "dense"] if cfg.joint_train and i >= cfg.dense_warmup_steps else ["dense"]

    name = "baseline" if baseline else "ratplus"
    return _train(model, cfg, cfg.steps, cfg.lr, cfg.warmup, patterns_at, f"pretrain {name}", cfg.seed)


def adapt(
    model: RATPlusLM,
    cfg: RecallConfig,
    pattern: str,
    steps: int | None = None,
    test: list[RecallBatch] | None = None,
    curve: list[dict[str, float]] | None = None,
) -> RATPlusLM:
    """Resolution adaptation (DESIGN.md section 5): a copy of ``model`` trained only in ``pattern`` for
    ``steps`` batches at ``adapt_lr_mult`` x the peak LR, no warmup, cosine down (or constant with
    ``adapt_constant_lr``); its own data seed. With ``cfg.adapt_eval_every``, ``test`` batches and a
    ``curve`` list, the accuracy in ``pattern`` and dense is appended to ``curve`` every that many steps."""
    adapted = copy.deepcopy(model)
    n = cfg.adapt_steps if steps is None else steps
    lr, name = cfg.lr * cfg.adapt_lr_mult, f"adapt {pattern}"
    every = cfg.adapt_eval_every

    def measure(step: int) -> None:
        if curve is not None and test and every and (step % every == 0 or step == n):
            curve.append(
                {
                    "step": step,
                    "acc": evaluate_accuracy(adapted, test, pattern),
                    "dense": evaluate_accuracy(adapted, test, "dense"),
                }
            )

    _train(
        adapted,
        cfg,
        n,
        lr,
        0.0,
        lambda i: [pattern],
        name,
        cfg.seed + 1,
        constant_lr=cfg.adapt_constant_lr,
        after_step=measure,
    )
    return adapted


def gate_profile(model: RATPlusLM, b: RecallBatch, task: RecallTask) -> list[dict[str, float]]:
    """Mean forget gate g per layer over key, value, filler and query-key positions (RAT+ only): a gate
    near 1 keeps the state (the token is let through weakly), near 0 writes the token in."""
    if not model.config.apply_re:
        return []
    out: list[dict[str, float]] = []
    device = next(model.parameters()).device
    ids = b.input_ids.to(device)
    F_, K_ = task.filler_vocab, task.key_vocab
    kinds = {
        "filler": ids < F_,
        "key": (ids >= F_) & (ids < F_ + K_),
        "value": ids >= F_ + K_,
    }
    query = torch.zeros_like(ids, dtype=torch.bool)
    query.scatter_(1, b.query_pos.to(device), True)
    kinds["key"] &= ~query
    kinds["query_key"] = query
    with torch.no_grad():
        x = model.embedding.wte(ids)  # (B, T, C)
        cos, sin = model.rope(torch.arange(ids.shape[1], device=device), x.dtype)
        for block in model.backbone.layers:
            _, _, _, _, g = block.seq_layer.project(x)  # g (B, H, T, K)
            gm = g.mean(dim=(1, 3))  # (B, T)
            out.append({k: float(gm[m].mean()) for k, m in kinds.items() if m.any()})
            x = block(x, model.resolve_pattern(None)[0], cos, sin)
    return out


@torch.no_grad()
def _attention_weights(model: RATPlusLM, ids: torch.Tensor, pattern: str) -> Iterator[torch.Tensor]:
    """Per layer, the attention weights (B, H, T, S) of ``pattern`` (dense or dilated/local) on ``ids``
    (B, T), recomputed from the layer's projections with the exact mask (reference semantics)."""
    from ratplus.ops.attention.masks import dilated_mask
    from ratplus.ops.rope import apply_rope

    T = ids.shape[1]
    cos, sin = model.rope(torch.arange(T, device=ids.device), torch.float32)
    mask = dilated_mask(_pattern(pattern), T, T, device=ids.device)  # (T, S)
    x = model.embedding.wte(ids)  # (B, T, C)
    for block, lp in zip(model.backbone.layers, model.resolve_pattern(pattern), strict=True):
        layer = block.seq_layer
        _, q, k, v, g = layer.project(x)  # (B, H, T, K)
        if g is not None:
            k, v = layer.recur(g, k, v)
        q, k = apply_rope(q, cos, sin), apply_rope(k.to(q.dtype), cos, sin)
        scores = (q @ k.transpose(-1, -2)) * layer.head_dim**-0.5  # (B, H, T, S)
        yield scores.masked_fill(~mask, float("-inf")).softmax(-1)
        x = block(x, lp, cos, sin)


def _asked_pair(ids: torch.Tensor, b: RecallBatch) -> torch.Tensor:
    """(B, n) body position of the key each query asks for (its value sits one later)."""
    pair_pos = b.pair_pos.to(ids.device)
    body_keys = ids.gather(1, pair_pos)  # (B, n)
    asked = ids.gather(1, b.query_pos.to(ids.device))  # (B, n)
    which = (asked.unsqueeze(2) == body_keys.unsqueeze(1)).float().argmax(2)  # (B, n) pair index
    return pair_pos.gather(1, which)


def _rows_at(w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention rows (B, H, n, S) of the query positions ``pos`` (B, n) in weights ``w`` (B, H, T, S)."""
    B, H, _, S = w.shape
    return w.gather(2, pos[:, None, :, None].expand(B, H, pos.shape[1], S))


def _mass_on(rows: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows (B, H, n, S) and one key position per row (B, n): (mass on it, is it the argmax), each
    (B, H, n)."""
    idx = keys[:, None, :, None].expand(-1, rows.shape[1], -1, 1)
    return rows.gather(3, idx).squeeze(3), rows.argmax(3) == keys[:, None, :]


@torch.no_grad()
def carrier_attention(model: RATPlusLM, b: RecallBatch, task: RecallTask, pattern: str) -> list[dict[str, float]]:
    """Where each answer's query looks, per layer, under a dilated ``pattern`` (D > 1).

    The *carrier* of a pair is the first dilated key at or after its value token (the first position
    p >= value with (p + 1) % D == 0): the only dilated key whose recurrent state can hold both key
    and value. For each queried key (the position that predicts the answer) this returns, per layer,
    the attention mass on the carrier (best head) and the fraction of queries whose most-attended key
    (best head) is the carrier; mean over the batch. Uses the exact masks (reference semantics)."""
    p = _pattern(pattern)
    if p.is_topk or p.is_dense or p.dilation_size is None:
        raise ValueError(f"pattern must be dilated with D > 1, got {pattern!r}")
    D = p.dilation_size
    ids = b.input_ids.to(next(model.parameters()).device)
    qp = b.query_pos.to(ids.device)  # (B, n)
    value_pos = _asked_pair(ids, b) + 1  # (B, n)
    carrier = (value_pos + 1 + D - 1) // D * D - 1  # first p >= value_pos with (p + 1) % D == 0
    sel = carrier < qp - p.local_size  # the carrier is a dilated key of the query
    out: list[dict[str, float]] = []
    for w in _attention_weights(model, ids, pattern):
        mass, top = _mass_on(_rows_at(w, qp), carrier)
        out.append(
            {
                "carrier_mass": float(mass.amax(1)[sel].mean()) if sel.any() else float("nan"),
                "carrier_top": float(top.any(1)[sel].float().mean()) if sel.any() else float("nan"),
                "queries": int(sel.sum()),
            }
        )
    return out


@torch.no_grad()
def induction_attention(model: RATPlusLM, b: RecallBatch) -> list[dict[str, float]]:
    """The two attention steps of an induction circuit, per layer, under dense attention.

    Attention solves MQAR in two steps: at each value token a *previous-token* head copies the key just
    before it (``prev_mass``: the value's weight on its key), and at each queried key a *lookup* head
    attends to the value that followed the same key in the body (``lookup_mass`` / ``lookup_top``:
    the weight on that value, and how often it is the most-attended position). Best head, mean over
    the pairs / queries of the batch. RAT+'s recurrence gives the first step for free: its key at
    the value position already mixes the key token in."""
    ids = b.input_ids.to(next(model.parameters()).device)
    key_pos = b.pair_pos.to(ids.device)  # (B, n): every body key, its value one later
    asked_value = _asked_pair(ids, b) + 1  # (B, n)
    out: list[dict[str, float]] = []
    for w in _attention_weights(model, ids, "dense"):
        prev, _ = _mass_on(_rows_at(w, key_pos + 1), key_pos)
        look, top = _mass_on(_rows_at(w, b.query_pos.to(ids.device)), asked_value)
        out.append(
            {
                "prev_mass": float(prev.amax(1).mean()),
                "lookup_mass": float(look.amax(1).mean()),
                "lookup_top": float(top.any(1).float().mean()),
            }
        )
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _print_table(rows: list[dict[str, Any]], models: list[str]) -> None:
    head = ["pattern"]
    for m in models:
        head += [f"{m} zero-shot", f"{m} adapted", f"{m} 1st query"]
    table = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        line: list[Any] = [pattern]
        for m in models:
            r = next(r for r in rows if r["model"] == m and r["pattern"] == pattern)
            line += [_fmt(r["acc"]), _fmt(r.get("acc_adapted")), _fmt(r.get("first_query"))]
        table.append(line)
    print("recall accuracy x100 (answers right; 1st query: the first answer alone, adapted where adapted)")
    print_table(head, table)


def probe_model_path(folder: str | Path, name: str) -> Path:
    """Where a probe folder keeps the pretrained ``name`` model (``ratplus`` | ``baseline``): the model
    folder ``<folder>/<name>/``, or ``<folder>/<name>.pt`` from probes written before 2026-12."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--load: probe folder not found: {root}")
    for path in (root / name, root / f"{name}.pt"):
        if path.exists():
            return path
    raise FileNotFoundError(
        f"--load: {root} holds no {name} model ({name}/ or {name}.pt): was it a recall probe's --out?"
    )


def load_probe_model(folder: str | Path, name: str, config: ModelConfig) -> RATPlusLM:
    """The pretrained ``name`` model of a previous probe, verified (manifest) and checked to be the
    architecture ``config`` this probe builds: another --d-model or task vocabulary is a clear error."""
    path = probe_model_path(folder, name)
    if path.is_dir():
        found = load_config(path)
        differs = {k: (v, getattr(config, k)) for k, v in found.to_dict().items() if getattr(config, k) != v}
        differs.pop("name", None)
        if differs:
            listed = ", ".join(f"{k}={a} (this probe: {b})" for k, (a, b) in differs.items())
            raise ValueError(f"--load: {path} is another model than this probe builds: {listed}")
        return load_pretrained(path, verify="sha256")
    try:  # an older probe's torch.save file: weights only (no code runs), shapes checked
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # pickle, zip and I/O errors of a damaged or unsafe file
        why = f"{type(e).__name__}: {str(e).split('. ')[0][:160]}"  # torch's first sentence says what failed
        raise ValueError(f"--load: cannot read {path}: damaged, truncated or not a weights file ({why})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--load: {path} does not hold a state dict of tensors")
    model = RATPlusLM(config)
    load_into(model, state, source=f"--load: {path}")
    return model.eval()


def run_recall_probe(
    cfg: RecallConfig, out_dir: str | Path, load_from: str | Path | None = None, plot: bool = True
) -> dict[str, Any]:
    """Train (or load from ``load_from``, a previous probe's folder), adapt, evaluate, report.

    Writes ``<model>/`` (a model folder: the weights after pretraining), ``recall.json`` and ``recall.png`` into
    ``out_dir``, prints the table and returns the record (``rows``: one per model and pattern with
    ``acc`` (zero-shot) and ``acc_adapted``)."""
    cfg.validate()
    cfg.check_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    make_dir(out)  # a clear error for a file standing there, before any training
    # every saved model read and checked before any work starts
    loaded = {}
    if load_from is not None:
        loaded = {n: load_probe_model(load_from, n, cfg.model_config(n == "baseline")) for n in cfg.models}
    patterns = cfg.all_patterns()
    adapt_set = set(cfg.sparse_adapt_patterns()) if cfg.adapt_steps else set()
    test = [make_batch(cfg.task, cfg.batch_size, cfg.seed, "test", i) for i in range(cfg.eval_batches)]
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {"eval": "recall", "config": cfg.to_dict(), "models": {}}
    for name in cfg.models:
        baseline = name == "baseline"
        torch.manual_seed(cfg.seed)
        model = RATPlusLM(cfg.model_config(baseline))
        t0 = time.perf_counter()
        info: dict[str, Any] = {"params": model.num_params()}
        if load_from is not None:
            model = loaded[name]
            info["loaded_from"] = str(load_from)
        else:
            info["train_log"] = pretrain(model, cfg, baseline)
            save_pretrained(model, out / name)  # the project's model folder: safetensors + manifest
        info["pretrain_s"] = round(time.perf_counter() - t0, 1)
        info["gates"] = gate_profile(model, test[0], cfg.task)
        info["induction"] = induction_attention(model, test[0])
        t0 = time.perf_counter()
        for pattern in tqdm(patterns, desc=f"eval {name}", disable=not cfg.progress, leave=False):
            p = _pattern(pattern)
            right = answer_matrix(model, test, pattern).float()  # (N, pairs)
            row: dict[str, Any] = {
                "model": name,
                "pattern": pattern,
                "kind": "topk" if p.is_topk else ("local" if p.dilation_size is None else "dilated"),
                "dilation": p.dilation_size,
                "acc": float(right.mean()),
                "acc_adapted": None,
                "by_query": right.mean(0).tolist(),  # accuracy of the j-th query (elimination_floor)
            }
            if row["kind"] == "dilated" and (p.local_size or p.initial_size) and not p.is_dense:
                row["kind"] = "dilated+window"
            traced = row["kind"] == "dilated" and not p.is_dense
            if traced:
                row["carrier"] = carrier_attention(model, test[0], cfg.task, pattern)
            if pattern in adapt_set:
                curve: list[dict[str, float]] = []
                adapted = adapt(model, cfg, pattern, test=test, curve=curve)
                if curve:
                    row["adapt_curve"] = curve
                right = answer_matrix(adapted, test, pattern).float()
                row["acc_adapted"], row["by_query_adapted"] = float(right.mean()), right.mean(0).tolist()
                row["acc_adapted_dense"] = evaluate_accuracy(adapted, test, "dense")
                if traced:
                    row["carrier_adapted"] = carrier_attention(adapted, test[0], cfg.task, pattern)
                if adapted.config.apply_re:
                    row["gates_adapted"] = gate_profile(adapted, test[0], cfg.task)
            rows.append(row)
        info["eval_adapt_s"] = round(time.perf_counter() - t0, 1)
        record["models"][name] = info
    dense = {r["model"]: r["acc"] for r in rows if r["pattern"] == "dense"}
    for r in rows:
        best = r["acc_adapted"] if r["acc_adapted"] is not None else r["acc"]
        r["frac_of_dense"] = best / dense[r["model"]] if dense.get(r["model"]) else None
    for r in rows:
        r["first_query"] = (r["by_query_adapted"] if r["acc_adapted"] is not None else r["by_query"])[0]
    record["rows"] = rows
    record["elimination_floor"] = elimination_floor(cfg.task.pairs)
    record["adapt_budget"] = {
        "steps": cfg.adapt_steps,
        "lr": cfg.lr * cfg.adapt_lr_mult,
        "lr_mult": cfg.adapt_lr_mult,
        "schedule": "constant" if cfg.adapt_constant_lr else "cosine",
        "fraction_of_pretraining": cfg.adapt_steps / cfg.steps,
    }
    _print_table(rows, list(cfg.models))
    control = next((p for p in patterns if _pattern(p).dilation_size is None and not _pattern(p).is_topk), None)
    record["control"] = control
    atomic_write_text(out / "recall.json", json.dumps(record, indent=1, default=_json_default) + "\n")
    record["json"] = str(out / "recall.json")
    if plot:
        t = cfg.task
        how = f"joint {cfg.joint_pattern} after {cfg.dense_warmup_steps} dense" if cfg.joint_train else "dense"
        title = (
            f"MQAR {t.pairs} pairs, T={t.seq_len}, spread {t.spread}; {cfg.steps} steps ({how});\n"
            f"adapt {cfg.adapt_steps} steps at {cfg.adapt_lr_mult}x LR per pattern"
        )
        record["plot"] = str(plot_recall(rows, out / "recall.png", control, title))
    return record


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
