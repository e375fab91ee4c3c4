"""The MQAR recall probe's settings and training (``ratplus.eval.recall`` runs them): ``RecallConfig``
and its budgets (``quick_config``, ``demo_config``, ``recall_config``), pretraining from scratch and
resolution adaptation with the project's training step (``ratplus.train.step.optimizer_steps``), and
the probe folder's saved models.

Shapes: B batch (sequences), T sequence length, V vocab.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ratplus.config import AttentionPattern, ModelConfig, check_ints, check_learning_rate, is_real
from ratplus.eval.recall_task import RecallBatch, RecallTask, batches, default_patterns, evaluate_accuracy
from ratplus.io.folder import load_config, load_into, load_pretrained
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import check_fits_memory
from ratplus.train.step import build_optimizer, lr_factor, optimizer_steps


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
