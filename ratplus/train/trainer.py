"""Training entry points (docs/DESIGN.md section 5): ``train`` (pretraining, with joint training by
default), ``adapt`` (resolution adaptation to one sparse pattern), ``uptrain`` (a dense model gains
the recurrence, then joint training), ``sft`` (answers-only fine-tuning), and ``plan_only`` (the
``--dry-run`` of any of them). One loop runs them all: ``ratplus.train.run``. The names of
``run`` and ``plan`` are importable from here too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ratplus.io.folder import load_config
from ratplus.io.metadata import read_metadata
from ratplus.model.uptrain import GATE_INIT
from ratplus.train.config import TrainConfig
from ratplus.train.memory import MemoryPlan
from ratplus.train.plan import (  # noqa: F401  (re-exported)
    COMPILE_PREFIX,
    base_model_config,
    plan_run,
    plan_sparse,
    strip_compile_prefix,
)
from ratplus.train.run import LOG_FILE, _Run, plan_only, train  # noqa: F401  (re-exported)


def adapt(
    ckpt: str | Path,
    pattern: str,
    out_dir: str | Path | None = None,
    data: str | None = None,
    lr: float | None = None,
    steps: int | None = None,
    tokens: int | None = None,
    dry_run: bool = False,
    **overrides: Any,
) -> Path | MemoryPlan:
    """Resolution adaptation (docs/DESIGN.md section 5): continue ``ckpt`` in ``pattern`` only, joint
    training off, LR 0.1x the pretraining peak, no warmup, cosine to min_lr, random windows.

    Length: ``steps`` or ``tokens``; by default 1% of the tokens the model was pretrained on. Data:
    the pretraining data recorded in the model's metadata unless ``data`` is given. ``dry_run``: every
    check of the run, then the memory plan (``plan_only``)."""
    meta = read_metadata(ckpt)
    if steps is None and tokens is None:
        seen = meta.tokens_seen
        if not seen:
            raise ValueError(f"{ckpt} does not record how many tokens it was trained on: give steps or tokens")
        tokens = max(1, math.ceil(0.01 * seen))
    # the pretraining length, else 512 within the model's reach
    defaults = {"seq_len": meta.seq_len if meta.seq_len is not None else min(512, load_config(ckpt).max_seq_len)}
    cfg = TrainConfig(
        **{
            "task": "adapt",
            "model": str(ckpt),
            "init_from": str(ckpt),
            "out_dir": str(out_dir or f"{Path(ckpt).resolve()}-adapt-{pattern.replace('/', '_')}"),
            "data": data or meta.data,
            "joint_train": False,
            "train_pattern": pattern,
            "lr": lr if lr is not None else 0.1 * (meta.peak_lr if meta.peak_lr is not None else 8e-4),
            "warmup": 0.0,
            "sampling": "random",
            "steps": steps,
            "tokens": tokens,
            **defaults,
            **overrides,
        }
    )
    if cfg.data is not None and Path(cfg.data).name == "train" and (Path(cfg.data).parent / "val").is_dir():
        cfg.val_data = cfg.val_data or str(Path(cfg.data).parent / "val")
    return plan_only(cfg) if dry_run else train(cfg)


#: Uptraining's default peak LR: a quarter of pretraining's 8e-4, since the weights are already trained.
UPTRAIN_LR = 2e-4
#: Uptraining's Adam epsilon. The closed gates' gradients pass through sigmoid'(-12) = 6e-6 and sit near
#: the default 1e-8, which then shrinks their steps about 50-fold: measured on SmolLM2-135M, 4 steps at
#: LR 2e-4 moved the gate rows W_f by 8e-6 (mean |w|) with eps 1e-8 and by 3.8e-4 with 1e-12.
UPTRAIN_ADAM_EPS = 1e-12


def uptrain(
    ckpt: str | Path,
    out_dir: str | Path | None = None,
    gate_init: float = GATE_INIT,
    dry_run: bool = False,
    **overrides: Any,
) -> Path | MemoryPlan:
    """Add the recurrence to the dense model ``ckpt`` (``apply_re=False``, e.g. an imported Llama) and
    train it jointly (docs/DESIGN.md section 9): the step-0 model computes the dense model's function
    (forget gates closed at ``gate_init``), then each batch takes the sparse D64 step and the dense step
    as in pretraining. Length (``steps`` or ``tokens``) and data are required; peak LR ``UPTRAIN_LR``,
    5% warmup, Adam's eps ``UPTRAIN_ADAM_EPS``. ``dry_run``: the run's checks and memory plan (``plan_only``)."""
    meta = read_metadata(ckpt)
    cfg = TrainConfig(
        **{
            "task": "pretrain",
            "model": str(ckpt),
            "init_from": str(ckpt),
            "uptrain": True,
            "gate_init": gate_init,
            "out_dir": str(out_dir or f"{Path(ckpt).resolve()}-uptrain"),
            "data": meta.data,
            "lr": UPTRAIN_LR,
            "adam_eps": UPTRAIN_ADAM_EPS,
            **({"seq_len": meta.seq_len} if meta.seq_len is not None else {}),
            **overrides,
        }
    )
    if cfg.data is None:
        raise ValueError(
            f"{ckpt} records no training data: give data (token shards made with its tokenizer: ratplus data "
            f"prepare --tokenizer {Path(ckpt) / 'tokenizer.json'} ...)"
        )
    return plan_only(cfg) if dry_run else train(cfg)


def sft(
    ckpt: str | Path,
    jsonl: str | Path,
    out_dir: str | Path | None = None,
    pattern: str | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    lr: float = 1e-5,
    weight_decay: float = 0.01,
    batch_size: int = 32,
    dry_run: bool = False,
    **overrides: Any,
) -> Path | MemoryPlan:
    """Supervised fine-tuning with the loss on answer tokens only (docs/DESIGN.md section 5: 4 epochs,
    LR 1e-5, weight decay 0.01, batch 32). ``pattern``: the pattern trained in (default: the model's
    adapted pattern, else dense). Records longer than ``seq_len`` (default: the model's max) are refused.
    ``dry_run``: the run's checks and memory plan (``plan_only``)."""
    meta = read_metadata(ckpt)
    config = load_config(ckpt)
    cfg = TrainConfig(
        **{
            "task": "sft",
            "model": str(ckpt),
            "init_from": str(ckpt),
            "sft_data": str(jsonl),
            "out_dir": str(out_dir or f"{Path(ckpt).resolve()}-sft"),
            "joint_train": False,
            "train_pattern": pattern or meta.adapted_pattern or "dense",
            "epochs": epochs if steps is None else None,
            "steps": steps,
            "lr": lr,
            "min_lr": min(1e-6, lr),
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "seq_len": config.max_seq_len,
            "eval_interval": 0,
            **overrides,
        }
    )
    return plan_only(cfg) if dry_run else train(cfg)
