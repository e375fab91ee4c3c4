"""``TrainConfig``: every knob of a training run (pretraining, adaptation, SFT), validated up front
with a ValueError naming the field, saved beside checkpoints as ``train_config.json``.
The recipe these defaults follow is docs/DESIGN.md section 5."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratplus.config import check_ints, check_learning_rate, is_real, known_fields
from ratplus.train import distributed as D

TASKS = ("pretrain", "adapt", "sft")
RATPLUS_SPARSE = "D64-W0-P0"  # the joint-training sparse branch of RAT+ (paper)
BASELINE_SPARSE = "local-W64-P0"  # the attention baseline's sparse branch: same FLOPs, no dilation
#: resume strings that are words a person meant as a switch, not a checkpoint path (unless such a path exists)
RESUME_WORDS = ("yes", "no", "true", "false", "on", "off", "y", "n", "1", "0", "latest", "auto")


@dataclass
class TrainConfig:
    """Every knob of a training run. ``train(cfg)`` validates it before touching any data."""

    out_dir: str = "runs/ratplus"
    # model: a preset name, a model folder or a config.json; init_from: a model folder whose weights start the run
    model: str = "demo"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False  # apply_re=False: the gated attention baseline (fresh models only)
    init_from: str | None = None
    # uptraining: init_from is a dense model (apply_re=False, e.g. an imported Llama) that gains the
    # recurrence, its forget gate starting closed (bias gate_init; ratplus.model.uptrain)
    uptrain: bool = False
    gate_init: float = -12.0
    # gate curriculum: over the first gate_open fraction of the steps the gate biases are moved from
    # gate_init to gate_target on a linear schedule (on top of what training learns); 0 = off
    gate_open: float = 0.0
    gate_target: float = 0.0
    # data: a shard folder, or a folder with train/ and val/ shard folders; None = bundled Shakespeare
    data: str | None = None
    val_data: str | None = None
    tokenizer: str = "bpe"  # for the bundled corpus: bpe (trained, model vocab size) | gpt2 | path
    sampling: str = "random"  # random | ordered windows of the training stream
    sft_data: str | None = None  # JSONL {"prompt", "answer"}: answers-only loss (task "sft")
    # shape of a step: batch_size sequences (over all processes) x grad_accum micro-batches x seq_len
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    steps: int | None = None
    tokens: int | None = None  # token budget; steps = ceil(tokens / tokens per step)
    epochs: float | None = None  # SFT: passes over the records (default 4)
    # optimisation: AdamW + cosine with linear warmup down to min_lr
    lr: float = 8e-4
    min_lr: float = 1e-6
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    # RAT+ recipe
    joint_train: bool = True
    sparse_pattern: str | None = None  # None: D64-W0-P0 for RAT+, local-W64-P0 for the baseline
    dense_warmup: float = 0.0  # fraction of the steps trained dense only before joint training starts
    train_pattern: str = "dense"  # the single pattern when joint_train is off (adaptation)
    eval_patterns: list[str] | None = None  # None: the patterns trained in
    # bookkeeping
    eval_interval: int = 100  # 0 = only at the end
    eval_batches: int = 8
    ckpt_interval: int = 200  # 0 = only at the end
    keep_last: int = 3
    log_interval: int = 1
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU | float32 | bfloat16
    # memory and speed: recompute every n-th block's activations in backward (0 = off, 1 = every block);
    # compile: the training forward through torch.compile (checkpoints keep the eager parameter names)
    activation_checkpointing: int = 0
    compile: bool = False
    distributed: str = "ddp"  # ddp | fsdp, used when launched by torchrun with WORLD_SIZE > 1
    resume: bool | str = False  # True: newest valid checkpoint in out_dir (fresh start if none); or a path
    tensorboard: bool = False
    progress: bool = True
    task: str = "pretrain"

    def validate(self) -> None:
        """Cheap checks of the knobs themselves (ValueError naming the field)."""
        for name in (
            "lr", "min_lr", "warmup", "dense_warmup", "weight_decay", "grad_clip", "epochs",
            "adam_eps", "gate_init", "gate_open", "gate_target",
        ):  # fmt: skip
            v = getattr(self, name)
            if v is not None and (not is_real(v) or not math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not isinstance(self.betas, (tuple, list)) or not all(is_real(b) and math.isfinite(b) for b in self.betas):
            raise ValueError(f"betas must be two finite numbers, got {self.betas!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.resume, (bool, str)) or (isinstance(self.resume, str) and not self.resume.strip()):
            raise ValueError(f"resume must be true, false or a checkpoint path, got {self.resume!r}")
        word = isinstance(self.resume, str) and self.resume.strip().lower() in RESUME_WORDS
        if word and not Path(self.resume).exists():
            # a JSON config or --set written by hand: "yes"/"true" would be read as a folder named yes
            raise ValueError(
                f"resume={self.resume!r} is a word, not a checkpoint path: use true/false (JSON booleans) "
                "or the path of a checkpoint folder"
            )
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a mapping of ModelConfig fields, got {self.model_overrides!r}")
        for name in ("sparse_pattern", "train_pattern"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{name} must be a non-empty pattern string, got {v!r}")
        if self.eval_patterns is not None and (
            not isinstance(self.eval_patterns, list)
            or not self.eval_patterns
            or not all(isinstance(p, str) and p.strip() for p in self.eval_patterns)
        ):
            raise ValueError(f"eval_patterns must be a non-empty list of pattern strings, got {self.eval_patterns!r}")
        for name in ("out_dir", "model", "device"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{name} must be a non-empty string, got {v!r}")
        check_ints(self, ("seq_len", "batch_size", "grad_accum", "eval_batches", "keep_last", "log_interval"), 1)
        check_ints(self, ("eval_interval", "ckpt_interval", "activation_checkpointing"), 0)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        for name in ("steps", "tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.steps is not None and (self.tokens is not None or self.epochs is not None):
            raise ValueError("give only one of steps, tokens, epochs")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "sft":
            if self.sft_data is None or self.init_from is None:
                raise ValueError("task 'sft' needs sft_data (a prompt/answer JSONL file) and init_from (a model)")
            if self.joint_train:
                raise ValueError("joint training is for pretraining; set joint_train=False for SFT")
        elif self.steps is None and self.tokens is None:
            raise ValueError("give the length of the run: steps or tokens")
        if not isinstance(self.uptrain, bool):
            raise ValueError(f"uptrain must be true or false, got {self.uptrain!r}")
        if not 0 < self.adam_eps < 1:
            raise ValueError(f"adam_eps must be a number in (0, 1), got {self.adam_eps!r}")
        if not 0 <= self.gate_open <= 1:
            raise ValueError(f"gate_open is a fraction of the steps in [0, 1], got {self.gate_open!r}")
        if self.gate_open and not self.uptrain:
            raise ValueError("gate_open schedules the forget gates that uptraining adds: it needs uptrain")
        if self.uptrain and (self.init_from is None or self.task != "pretrain"):
            raise ValueError("uptrain adds the recurrence to a dense model: it needs task 'pretrain' and init_from")
        if self.task == "adapt" and self.init_from is None:
            raise ValueError("task 'adapt' needs init_from (the pretrained model folder)")
        check_learning_rate(self.lr, "lr")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.dense_warmup < 1:
            raise ValueError(f"dense_warmup is a fraction of the steps in [0, 1), got {self.dense_warmup}")
        if self.dense_warmup and not self.joint_train:
            raise ValueError("dense_warmup delays joint training; it needs joint_train=True")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.sampling not in ("random", "ordered"):
            raise ValueError(f"sampling must be 'random' or 'ordered', got {self.sampling!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.distributed not in D.MODES:
            raise ValueError(f"distributed must be one of {', '.join(D.MODES)}, got {self.distributed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = known_fields(cls, data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)
