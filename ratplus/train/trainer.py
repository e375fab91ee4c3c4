"""The training loop (DESIGN.md section 5): pretraining with joint training, resolution adaptation, SFT.

Shapes: B batch (sequences), T sequence length, V vocab.

One loop, three jobs, chosen by ``TrainConfig``:

* pretraining (``task="pretrain"``): with ``joint_train`` each batch takes two optimizer steps, first
  forward/backward in the sparse pattern (D=64 for RAT+, a W=64 local window for the attention
  baseline), then dense causal on the *same* batch; the LR scheduler steps once per batch. With
  gradient accumulation each branch accumulates over all micro-batches before its step.
* resolution adaptation (``adapt``): start from a model folder, joint training off, train only in the
  target pattern at 0.1x the peak LR, no warmup, random windows.
* SFT (``sft``): prompt/answer records, loss on answer tokens only.

Batches are *global*: every process draws the same batch (same generator) and takes its own rows,
and the loss is normalised by the number of target tokens in the whole step (all micro-batches, all
processes). So 1 or N processes, any ``grad_accum`` split, give the same gradients up to float
summation order, and the data position in a checkpoint does not depend on the process count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ratplus.config import ModelConfig
from ratplus.io.corpus import shakespeare_documents
from ratplus.io.folder import atomic_write_text, load_config, load_into, load_state_dict_file
from ratplus.io.metadata import ModelMetadata, read_metadata
from ratplus.io.tokenizer import get_tokenizer, load_tokenizer_file
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import resolve_device
from ratplus.train import checkpoint as ckpt_io
from ratplus.train import distributed as D
from ratplus.train.data import (
    IGNORE_INDEX,
    META_FILE,
    SFTDataset,
    TokenDataset,
    prepare_shards,
    read_sft_records,
)

logger = logging.getLogger("ratplus")

TASKS = ("pretrain", "adapt", "sft")
LOG_FILE = "log.jsonl"
RATPLUS_SPARSE = "D64-W0-P0"  # the joint-training sparse branch of RAT+ (paper)
BASELINE_SPARSE = "local-W64-P0"  # the attention baseline's sparse branch: same FLOPs, no dilation


@dataclass
class TrainConfig:
    """Every knob of a training run. ``train(cfg)`` validates it before touching any data."""

    out_dir: str = "runs/ratplus"
    # model: a preset name, a model folder or a config.json; init_from: a model folder whose weights start the run
    model: str = "demo"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False  # apply_re=False: the gated attention baseline (fresh models only)
    init_from: str | None = None
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
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    # RAT+ recipe
    joint_train: bool = True
    sparse_pattern: str | None = None  # None: D64-W0-P0 for RAT+, local-W64-P0 for the baseline
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
    distributed: str = "ddp"  # ddp | fsdp, used when launched by torchrun with WORLD_SIZE > 1
    resume: bool | str = False  # True: newest valid checkpoint in out_dir (fresh start if none); or a path
    tensorboard: bool = False
    progress: bool = True
    task: str = "pretrain"

    def validate(self) -> None:
        """Cheap checks of the knobs themselves (ValueError naming the field)."""
        for name in ("seq_len", "batch_size", "grad_accum", "eval_batches", "keep_last", "log_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("eval_interval", "ckpt_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
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
        if self.task == "adapt" and self.init_from is None:
            raise ValueError("task 'adapt' needs init_from (the pretrained model folder)")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


# ---- helpers ---------------------------------------------------------------------------------------


def _base_model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture before the data fixes the vocabulary (patterns and lengths are checked on it)."""
    source = cfg.init_from or cfg.model
    p = Path(source)
    if p.is_dir():
        config = load_config(p)
        if cfg.model_overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **cfg.model_overrides})
        if cfg.baseline and config.apply_re:
            raise ValueError(f"baseline=True but the model at {p} is a RAT+ model (apply_re=True)")
        return config
    if p.suffix == ".json":
        config = ModelConfig.load(p)
        return ModelConfig.from_dict({**config.to_dict(), **cfg.model_overrides})
    if cfg.init_from is not None:
        raise FileNotFoundError(f"model folder not found: {cfg.init_from}")
    overrides = dict(cfg.model_overrides)
    if cfg.baseline:
        overrides["apply_re"] = False
    return ModelConfig.from_preset(cfg.model, **overrides)


def lr_factor(step: int, steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """LR multiplier for batch ``step`` (0-based): linear warmup, then cosine from lr down to min_lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr


class _WindowStream:
    """Global batches of windows from the training shards, random or in order (the data position)."""

    def __init__(self, ds: TokenDataset, batch_size: int, seq_len: int, sampling: str, seed: int):
        self.ds, self.batch_size, self.seq_len, self.sampling = ds, batch_size, seq_len, sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # batches drawn (random) or windows consumed (ordered)
        self._random = ds.random_windows(batch_size, seq_len, self.generator) if sampling == "random" else None
        if sampling == "ordered":
            self.num_windows = ds.num_windows(seq_len)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._random is not None:
            self.position += 1
            return next(self._random)
        # wrap around at the end of the stream: the next epoch starts over in the same order
        idx = [(self.position + j) % self.num_windows for j in range(self.batch_size)]
        self.position += self.batch_size
        return self.ds.batch_at([i * self.seq_len for i in idx], self.seq_len)

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": self.sampling, "position": self.position}, {"data/generator": self.generator.get_state()}

    def load(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if js["kind"] != self.sampling:
            raise ValueError(f"the checkpoint drew {js['kind']} windows but this run asks for {self.sampling}")
        self.position = int(js["position"])
        self.generator.set_state(tensors["data/generator"])


class _SFTStream:
    """Global batches of prompt/answer examples, reshuffled every epoch (position = batch index)."""

    def __init__(self, ds: SFTDataset, batch_size: int, seed: int):
        self.ds, self.batch_size, self.seed, self.position = ds, batch_size, seed, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.ds.batch(self.position, self.batch_size, self.seed)
        self.position += 1
        return batch

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": "sft", "position": self.position}, {}

    def load(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if js["kind"] != "sft":
            raise ValueError(f"the checkpoint is from a {js['kind']}-window run, not an SFT run")
        self.position = int(js["position"])


class _Log:
    """JSON-lines log (and TensorBoard scalars when asked), written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.path, self.enabled, self.tb = out_dir / LOG_FILE, enabled, None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def trim(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        self.tb.add_scalar(f"{key}/{sub}", v, record["step"])
                elif isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _same_tokenizer(a: Tokenizer | None, b: Tokenizer | None) -> bool:
    return a is None or b is None or a.to_str() == b.to_str()


# ---- the step ---------------------------------------------------------------------------------------


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norm weights).

    The fused implementation is used where it exists (CPU, CUDA): on CPU it is several times faster
    than the per-tensor loop (0.14 s vs 1.0 s per step for the 125m preset, one thread)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))


def loss_sum(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pattern: str,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Summed float32 cross-entropy of the model on input_ids x (B, T) against labels y (B, T)
    (-100 ignored) in ``pattern``. Summed, not averaged: the caller divides by the step's target count."""
    with autocast():
        logits = model(x, pattern=pattern)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Non-ignored labels in a (global) batch of micro-batches (at least 1, to divide by)."""
    return max(1, sum(int((y != IGNORE_INDEX).sum()) for _, y in batch))


def optimizer_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: list[tuple[torch.Tensor, torch.Tensor]],
    patterns: list[str],
    n_targets: int | None = None,
    grad_clip: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    info: D.DistInfo = D.SINGLE,
) -> tuple[dict[str, float], float]:
    """The joint-training step of DESIGN.md section 5, for any list of patterns.

    For each pattern in order (``[sparse, "dense"]`` when joint training, one pattern otherwise):
    forward/backward every micro-batch of ``batch`` (gradients accumulate), clip, ``optimizer.step()``,
    zero the gradients. So a joint step takes two optimizer steps on the *same* batch; the caller
    steps the LR scheduler once afterwards. ``batch``: this process's micro-batches (input_ids,
    labels), each (B, T) int64 on the model's device; ``n_targets``: non-ignored labels in the whole
    step over all processes (default: counted in ``batch``). Returns the mean loss per pattern (over
    all processes) and the last gradient norm (before clipping)."""
    n_targets = n_targets or count_targets(batch)
    device = batch[0][0].device
    losses, grad_norm = {}, 0.0
    for pattern in patterns:
        total = torch.zeros((), device=device)
        for i, (x, y) in enumerate(batch):
            with D.gradient_sync(model, info, enabled=i == len(batch) - 1):
                loss = loss_sum(model, x, y, pattern, autocast) / n_targets
                # DDP / FSDP average gradients over processes; the loss is already the global mean
                (loss * info.world_size).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[pattern] = float(D.all_reduce_sum(total, info))
    return losses, grad_norm


# ---- the run ---------------------------------------------------------------------------------------


class _Run:
    """State of one training run; ``run()`` is the loop."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard")

        # 1. architecture, patterns and lengths: all checked before any data is read
        config = _base_model_config(cfg)
        self.apply_re = config.apply_re

        canonical = config.canonical_pattern  # "D4" and "D4-W0-P0" name the same pattern in logs
        self.sparse_pattern = canonical(cfg.sparse_pattern or (RATPLUS_SPARSE if config.apply_re else BASELINE_SPARSE))
        self.step_patterns = [self.sparse_pattern, "dense"] if cfg.joint_train else [canonical(cfg.train_pattern)]
        default_eval = [*self.step_patterns, *(["dense"] if cfg.task == "adapt" else [])]
        self.eval_patterns = list(dict.fromkeys(canonical(p) for p in (cfg.eval_patterns or default_eval)))
        if cfg.seq_len > config.max_seq_len:
            raise ValueError(
                f"seq_len={cfg.seq_len} is above the model's max_seq_len={config.max_seq_len}; lower seq_len or "
                "raise max_seq_len (model_overrides / --set max_seq_len=N) for a fresh model"
            )
        if cfg.batch_size % info.world_size:
            raise ValueError(
                f"batch_size={cfg.batch_size} (sequences over all processes) is not divisible by the "
                f"{info.world_size} processes"
            )
        if cfg.resume is False and D.broadcast_object(bool(ckpt_io.list_checkpoints(self.ckpt_root)), info):
            raise ValueError(f"{self.ckpt_root} already holds checkpoints: pass resume (--resume) or another out_dir")

        # 2. data (the bundled corpus is tokenized on first use, by rank 0)
        self.init_tokenizer = None
        if cfg.init_from is not None:
            if (Path(cfg.init_from) / ckpt_io.MANIFEST_FILE).exists():  # written by us: check it is intact
                ckpt_io.verify_folder(cfg.init_from)
            p = Path(cfg.init_from) / "tokenizer.json"
            self.init_tokenizer = load_tokenizer_file(p) if p.is_file() else None
        self.val: TokenDataset | None = None
        if cfg.task == "sft":
            if self.init_tokenizer is None:
                raise ValueError(f"SFT needs the model's tokenizer, but {cfg.init_from} has no tokenizer.json")
            self.tokenizer = self.init_tokenizer
            sft_ds = SFTDataset(read_sft_records(cfg.sft_data), self.tokenizer, max_len=cfg.seq_len)
            data_vocab, data_eos = self.tokenizer.get_vocab_size(with_added_tokens=True), sft_ds.eos_id
            self.stream: _WindowStream | _SFTStream = _SFTStream(sft_ds, cfg.batch_size, cfg.seed + 1)
            self.data_path: str | None = str(Path(cfg.sft_data).resolve())
        else:
            train_dir, val_dir = self._resolve_data(config)
            train_ds = TokenDataset(train_dir)
            train_ds.check_seq_len(cfg.seq_len)
            self.val = TokenDataset(val_dir) if val_dir is not None else None
            self.tokenizer = train_ds.tokenizer()
            if not _same_tokenizer(self.init_tokenizer, self.tokenizer):
                raise ValueError(f"the data at {train_dir} was tokenized with another tokenizer than {cfg.init_from}")
            data_vocab, data_eos = train_ds.vocab_size, train_ds.eos_id
            self.stream = _WindowStream(train_ds, cfg.batch_size, cfg.seq_len, cfg.sampling, cfg.seed + 1)
            self.data_path = str(Path(train_dir).resolve())
        if self.val is not None:
            if self.val.vocab_size != data_vocab or self.val.eos_id != data_eos:
                raise ValueError(f"validation data {self.val.path} uses another tokenizer than the training data")
            n = min(cfg.eval_batches * cfg.batch_size, self.val.num_windows(cfg.seq_len))
            self.eval_windows = n - n % info.world_size
            if self.eval_windows == 0:
                raise ValueError(f"validation data {self.val.path} is too small for one window per process")

        # 3. the model: vocabulary from the data for a fresh model, weights from init_from otherwise
        if cfg.init_from is None and "vocab_size" not in cfg.model_overrides:
            config = dataclasses.replace(config, vocab_size=data_vocab)
        if config.eos_token_id is None:
            config = dataclasses.replace(config, eos_token_id=data_eos)
        if data_vocab > config.vocab_size:
            raise ValueError(f"the data uses {data_vocab} token ids but the model's vocab_size is {config.vocab_size}")
        self.config = config
        torch.manual_seed(cfg.seed)  # same initial weights on every process (FSDP shards them as they are)
        model = RATPlusLM(config)
        if cfg.init_from is not None:
            weights = Path(cfg.init_from) / "model.safetensors"
            load_into(model, load_state_dict_file(weights), source=str(weights))
        self.model = D.wrap_model(model.to(self.device), info, self.device)

        # 4. optimisation
        per_step = cfg.batch_size * cfg.grad_accum
        if cfg.task == "sft":
            epochs = cfg.epochs or 4.0
            self.steps = cfg.steps or math.ceil(epochs * sft_ds.batches_per_epoch(per_step))
        else:
            self.steps = cfg.steps or math.ceil(cfg.tokens / (per_step * cfg.seq_len))
        self.warmup_steps = round(cfg.warmup * self.steps)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps, self.warmup_steps, cfg.lr, cfg.min_lr)
        )
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )
        self.step, self.tokens_seen = 0, 0
        self.log = _Log(self.out, info.is_main, cfg.tensorboard)
        self.last_eval: dict[str, float] = {}

    # -- setup helpers ---------------------------------------------------------------------------------

    def _resolve_data(self, config: ModelConfig) -> tuple[Path, Path | None]:
        cfg = self.cfg
        if cfg.data is None:
            root = self.out / "data"
            if self.info.is_main and not (root / "train" / META_FILE).is_file():
                if self.init_tokenizer is not None:
                    tok = self.init_tokenizer
                else:
                    tok = get_tokenizer(cfg.tokenizer, shakespeare_documents("train"), config.vocab_size)
                for split in ("train", "val"):
                    prepare_shards(
                        shakespeare_documents(split), tok, root / split, overwrite=True, show_progress=cfg.progress
                    )
            D.barrier(self.info)
            return root / "train", (Path(cfg.val_data) if cfg.val_data else root / "val")
        p = Path(cfg.data)
        if (p / META_FILE).is_file():
            return p, Path(cfg.val_data) if cfg.val_data else None
        if (p / "train" / META_FILE).is_file():
            val = Path(cfg.val_data) if cfg.val_data else (p / "val" if (p / "val" / META_FILE).is_file() else None)
            return p / "train", val
        if not p.exists():
            raise FileNotFoundError(f"data folder not found: {p}")
        raise FileNotFoundError(f"no token shards in {p} (nor in {p / 'train'}); make them with `ratplus data prepare`")

    def resolved(self) -> dict[str, Any]:
        """The configuration as run: every default filled in (saved beside checkpoints)."""
        return {
            **self.cfg.to_dict(),
            "sparse_pattern": self.sparse_pattern,
            "step_patterns": self.step_patterns,
            "eval_patterns": self.eval_patterns,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "tokens_per_step": self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len,
            "world_size": self.info.world_size,
            "data_resolved": self.data_path,
            "val_data_resolved": str(self.val.path.resolve()) if self.val is not None else None,
            "model_config": self.config.to_dict(),
        }

    def metadata(self) -> dict[str, Any]:
        cfg = self.cfg
        source = read_metadata(cfg.init_from) if cfg.init_from else ModelMetadata()
        # adaptation (or SFT in a sparse pattern) moves the model to the pattern it trained in
        trained_sparse = cfg.task == "adapt" or (cfg.task == "sft" and self.step_patterns[-1] != "dense")
        adapted = self.step_patterns[-1] if trained_sparse else source.adapted_pattern
        inherited_lr = source.peak_lr if source.peak_lr is not None else cfg.lr
        return ModelMetadata(
            task=cfg.task,
            adapted_pattern=adapted,
            joint_train=cfg.joint_train,
            sparse_pattern=self.sparse_pattern if cfg.joint_train else None,
            train_pattern=self.step_patterns[-1],
            tokens_seen=self.tokens_seen,
            steps=self.step,
            peak_lr=cfg.lr if cfg.task == "pretrain" else inherited_lr,
            seq_len=cfg.seq_len,
            data=self.data_path,
            val_loss=self.last_eval,
            init_from=str(Path(cfg.init_from).resolve()) if cfg.init_from else None,
            init_tokens_seen=source.tokens_seen,
        ).to_dict()

    # -- checkpoints -----------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        model_state = D.full_model_state(self.model)  # collectives under FSDP: every rank takes part
        optim_state = D.full_optimizer_state(self.model, self.optimizer)
        if self.info.is_main:
            data_js, data_tensors = self.stream.state()
            rng_js, rng_tensors = ckpt_io.rng_state()
            sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
            state = {"tokens_seen": self.tokens_seen, "scheduler": sched, "data": data_js, "rng": rng_js}
            ckpt_io.save_checkpoint(
                self.ckpt_root,
                self.step,
                self.config,
                model_state,
                optim_state,
                state,
                {**data_tensors, **rng_tensors},
                self.resolved(),
                tokenizer=self.tokenizer,
                metadata=self.metadata(),
            )
            ckpt_io.prune_checkpoints(self.ckpt_root, self.cfg.keep_last)
        D.barrier(self.info)

    def maybe_resume(self) -> None:
        cfg = self.cfg
        if cfg.resume is False:
            return
        if cfg.resume is True:
            path = ckpt_io.latest_checkpoint(self.ckpt_root) if self.info.is_main else None
            path = D.broadcast_object(path, self.info)
            if path is None:
                logger.info("ratplus: no checkpoint in %s, starting from scratch", self.ckpt_root)
                return
        else:
            path = Path(cfg.resume)
        ck = ckpt_io.load_checkpoint(path)
        if ck.config != self.config:
            raise ValueError(f"checkpoint {path} is for another model configuration than this run")
        differs = [
            k
            for k in ("seq_len", "batch_size", "grad_accum", "steps", "lr", "joint_train", "step_patterns", "seed")
            if ck.train_config.get(k) != self.resolved().get(k)
        ]
        if differs:
            logger.warning("ratplus: resuming with different settings than the checkpoint: %s", ", ".join(differs))
        D.load_full_state(self.model, ck.model_state, self.optimizer, ck.optimizer_state)
        self.scheduler.load_state_dict({**ck.trainer_state["scheduler"], "lr_lambdas": [None]})
        self.stream.load(ck.trainer_state["data"], ck.tensors)
        ckpt_io.set_rng_state(ck.trainer_state["rng"], ck.tensors)
        self.step, self.tokens_seen = ck.step, int(ck.trainer_state["tokens_seen"])
        logger.info("ratplus: resumed from %s (step %d)", path, self.step)

    # -- the work --------------------------------------------------------------------------------------

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch."""
        b = t.shape[0] // self.info.world_size
        return t[self.info.rank * b : (self.info.rank + 1) * b].to(self.device, non_blocking=True)

    def _loss_sum(self, x: torch.Tensor, y: torch.Tensor, pattern: str) -> torch.Tensor:
        return loss_sum(self.model, x, y, pattern, self.autocast)

    def train_step(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, float], float]:
        """One batch: ``optimizer_steps`` over ``step_patterns``, then one scheduler step."""
        local = [(self._local(x), self._local(y)) for x, y in batch]
        out = optimizer_steps(
            self.model,
            self.optimizer,
            local,
            self.step_patterns,
            n_targets=count_targets(batch),
            grad_clip=self.cfg.grad_clip,
            autocast=self.autocast,
            info=self.info,
        )
        self.scheduler.step()
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per pattern over the first ``eval_windows`` windows of the val stream."""
        if self.val is None:
            return {}
        self.model.eval()
        T, B = self.cfg.seq_len, self.cfg.batch_size
        result = {}
        for pattern in self.eval_patterns:
            acc = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, target count
            for first in range(0, self.eval_windows, B):
                idx = range(first, min(first + B, self.eval_windows))  # a multiple of the process count
                x, y = self.val.batch_at([i * T for i in idx], T)
                x, y = self._local(x), self._local(y)
                acc[0] += self._loss_sum(x, y, pattern).double()
                acc[1] += (y != IGNORE_INDEX).sum()
            acc = D.all_reduce_sum(acc, self.info)
            result[pattern] = float(acc[0] / acc[1].clamp(min=1))
        self.model.train()
        return result

    def _batches(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        while True:
            yield [self.stream.next() for _ in range(self.cfg.grad_accum)]

    def run(self) -> Path:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_leftovers(self.out)  # temporary folders of a write killed midway
            ckpt_io.remove_leftovers(self.ckpt_root)
        D.barrier(info)
        self.maybe_resume()
        self.log.trim(self.step)  # drop records of steps that are about to be redone
        if info.is_main:
            atomic_write_text(self.out / "train_config.json", json.dumps(self.resolved(), indent=2) + "\n")
            logger.info(
                "ratplus: %s %s (%s params), %d steps of %d tokens, patterns %s, %d process(es), %s",
                cfg.task,
                self.config.name,
                f"{self.config.num_params() / 1e6:.2f}M",
                self.steps,
                cfg.batch_size * cfg.grad_accum * cfg.seq_len,
                " then ".join(self.step_patterns),
                info.world_size,
                self.device,
            )
        self.model.train()
        bar = tqdm(
            total=self.steps, initial=self.step, desc=cfg.task, unit="step", disable=not (cfg.progress and info.is_main)
        )
        batches = self._batches()
        start = time.perf_counter()
        while self.step < self.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            lr = self.optimizer.param_groups[0]["lr"]
            losses, grad_norm = self.train_step(batch)
            self.step += 1
            n_tokens = sum(x.numel() for x, _ in batch)
            self.tokens_seen += n_tokens
            dt = time.perf_counter() - t0
            loss = losses[self.step_patterns[-1]]
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}; lower the learning rate")
            if self.step % cfg.log_interval == 0 or self.step == self.steps:
                self.log.write(
                    {
                        "step": self.step,
                        "loss": loss,
                        "losses": losses,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": self.tokens_seen,
                        "tok_per_s": n_tokens / dt,
                        "elapsed_s": time.perf_counter() - start,
                    }
                )
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tokens / dt:,.0f}", refresh=False)
            bar.update(1)
            last = self.step == self.steps
            if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last:
                self.last_eval = self.evaluate()
                if self.last_eval and info.is_main:
                    self.log.write({"step": self.step, "val_loss": self.last_eval})
                    text = ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items())
                    bar.write(f"step {self.step}: val loss {text}")
            if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last:
                self.save_checkpoint()
        bar.close()
        if not self.last_eval:
            self.last_eval = self.evaluate()
        final = self.out / "final"
        model_state = D.full_model_state(self.model)
        if info.is_main:
            ckpt_io.write_model_folder(final, self.config, model_state, self.tokenizer, self.metadata())
            logger.info("ratplus: model written to %s", final)
        D.barrier(info)
        self.log.close()
        return final


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training job; returns the final model folder ``<out_dir>/final``."""
    cfg.validate()
    info, device = D.init_distributed(cfg.distributed, resolve_device(cfg.device))
    try:
        return _Run(cfg, info, device).run()
    finally:
        D.shutdown(info)


def adapt(
    ckpt: str | Path,
    pattern: str,
    out_dir: str | Path | None = None,
    data: str | None = None,
    lr: float | None = None,
    steps: int | None = None,
    tokens: int | None = None,
    **overrides: Any,
) -> Path:
    """Resolution adaptation (DESIGN.md section 5): continue ``ckpt`` in ``pattern`` only, joint
    training off, LR 0.1x the pretraining peak, no warmup, cosine to min_lr, random windows.

    Length: ``steps`` or ``tokens``; by default 1% of the tokens the model was pretrained on. Data:
    the pretraining data recorded in the model's metadata unless ``data`` is given."""
    meta = read_metadata(ckpt)
    if steps is None and tokens is None:
        seen = meta.tokens_seen
        if not seen:
            raise ValueError(f"{ckpt} does not record how many tokens it was trained on: give steps or tokens")
        tokens = max(1, math.ceil(0.01 * seen))
    defaults = {"seq_len": meta.seq_len if meta.seq_len is not None else 512}
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
    return train(cfg)


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
    **overrides: Any,
) -> Path:
    """Supervised fine-tuning with the loss on answer tokens only (DESIGN.md section 5: 4 epochs,
    LR 1e-5, weight decay 0.01, batch 32). ``pattern``: the pattern trained in (default: the model's
    adapted pattern, else dense). Records longer than ``seq_len`` (default: the model's max) are refused."""
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
    return train(cfg)
