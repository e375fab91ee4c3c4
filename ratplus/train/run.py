"""The training run (docs/DESIGN.md section 5): the loop behind ``ratplus.train.trainer``'s ``train``,
``adapt``, ``uptrain`` and ``sft``, and ``plan_only`` (``--dry-run``: the same run stopped before its
first allocation). Its parts: ``config`` (TrainConfig), ``plan`` (the model configuration and memory
plan), ``data`` (shards and the streams a checkpoint resumes), ``step`` (optimizer, schedule, the
joint step), ``checkpoint``, ``distributed``.

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
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ratplus.config import ModelConfig
from ratplus.io.corpus import shakespeare_documents, shakespeare_plays
from ratplus.io.folder import EMBED_KEY, HEAD_KEY, load_config, load_into, load_state_dict_file, state_dict_problems
from ratplus.io.lock import folder_lock
from ratplus.io.metadata import ModelMetadata, read_metadata
from ratplus.io.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    check_bpe_vocab,
    eos_id,
    get_tokenizer,
    load_tokenizer_file,
    vocab_size,
)
from ratplus.model.rat import RATPlusLM
from ratplus.model.uptrain import add_recurrence
from ratplus.runtime import atomic_write_text, resolve_device
from ratplus.train import checkpoint as ckpt_io
from ratplus.train import distributed as D
from ratplus.train.config import BASELINE_SPARSE, RATPLUS_SPARSE, TrainConfig
from ratplus.train.data import (
    IGNORE_INDEX,
    META_FILE,
    SFTDataset,
    SFTStream,
    TokenDataset,
    WindowStream,
    prepare_shards,
    read_sft_records,
)
from ratplus.train.memory import MemoryPlan, check_plan
from ratplus.train.plan import COMPILE_PREFIX, base_model_config, plan_run, plan_sparse, strip_compile_prefix, uses_bf16
from ratplus.train.runlog import LOG_FILE, RunLog  # noqa: F401  (LOG_FILE re-exported)
from ratplus.train.step import build_optimizer, count_targets, loss_sum, lr_factor, optimizer_steps

logger = logging.getLogger("ratplus")


def _same_tokenizer(a: Tokenizer | None, b: Tokenizer | None) -> bool:
    return a is None or b is None or a.to_str() == b.to_str()


# ---- the run ---------------------------------------------------------------------------------------


class _Run:
    """State of one training run; ``run()`` is the loop.

    ``dry_run``: every check of the real run (patterns, heads, lengths, the data, the memory plan),
    then stop before the first allocation (the model); ``show`` gets the memory plan's table. Nothing
    is written: the bundled corpus is not tokenized (its tokenizer's vocabulary stands in for it)."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: D.DistInfo,
        device: torch.device,
        dry_run: bool = False,
        show: Callable[[str], Any] = print,
    ):
        self.cfg, self.info, self.device = cfg, info, device
        self.dry_run, self.show = dry_run, show
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard")

        # 1. architecture, patterns and lengths: all checked before any data is read
        config = base_model_config(cfg)
        self.apply_re = config.apply_re
        canonical = config.canonical_pattern  # "D4" and "D4-W0-P0" name the same pattern in logs
        # patterns trained in: dense / dilated / local only (top-k and SnapKV are inference-only)
        trainable = config.training_pattern
        self.sparse_pattern = trainable(
            cfg.sparse_pattern or (RATPLUS_SPARSE if config.apply_re else BASELINE_SPARSE),
            "sparse_pattern (--sparse-pattern)",
        )
        self.step_patterns = (
            [self.sparse_pattern, "dense"] if cfg.joint_train else [trainable(cfg.train_pattern, "pattern (--pattern)")]
        )
        default_eval = [*self.step_patterns, *(["dense"] if cfg.task == "adapt" else [])]
        self.eval_patterns = list(dict.fromkeys(canonical(p) for p in (cfg.eval_patterns or default_eval)))
        if cfg.seq_len > config.max_seq_len:
            raise ValueError(
                f"seq_len={cfg.seq_len} is above the model's max_seq_len={config.max_seq_len}; lower seq_len or "
                "raise max_seq_len (model_overrides / --set max_seq_len=N) for a fresh model"
            )
        # the memory plan, before any data is read (the vocabulary may still change with the data)
        self._check_memory(config)
        if cfg.batch_size % info.world_size:
            raise ValueError(
                f"batch_size={cfg.batch_size} (sequences over all processes) is not divisible by the "
                f"{info.world_size} processes"
            )
        if cfg.resume is False and self._broadcast(bool(ckpt_io.list_checkpoints(self.ckpt_root))):
            raise ValueError(f"{self.ckpt_root} already holds checkpoints: pass resume (--resume) or another out_dir")

        # 2. data (the bundled corpus is tokenized on first use, by rank 0)
        self.init_tokenizer = None
        self.model_files: dict[str, str] = {}  # carried into every folder this run writes
        if cfg.init_from is not None:
            p = Path(cfg.init_from) / "tokenizer.json"
            self.init_tokenizer = load_tokenizer_file(p) if p.is_file() else None
            chat = Path(cfg.init_from) / TOKENIZER_CONFIG_FILE  # an imported model's chat template
            if chat.is_file():
                self.model_files[TOKENIZER_CONFIG_FILE] = chat.read_text(encoding="utf-8")
        self.val: TokenDataset | None = None
        if cfg.task == "sft":
            if self.init_tokenizer is None:
                raise ValueError(f"SFT needs the model's tokenizer, but {cfg.init_from} has no tokenizer.json")
            self.tokenizer = self.init_tokenizer
            sft_ds = SFTDataset(read_sft_records(cfg.sft_data), self.tokenizer, max_len=cfg.seq_len)
            data_vocab, data_eos = self.tokenizer.get_vocab_size(with_added_tokens=True), sft_ds.eos_id
            self.stream: WindowStream | SFTStream = SFTStream(sft_ds, cfg.batch_size, cfg.seed + 1)
            self.data_path: str | None = str(Path(cfg.sft_data).resolve())
        elif (found := self._resolve_data(config)) is None:
            # a dry run over the bundled corpus not tokenized yet: its tokenizer's vocabulary stands in
            data_vocab, data_eos = self._bundled_vocab(config)
            self.tokenizer, self.data_path = self.init_tokenizer, None
        else:
            train_dir, val_dir = found
            train_ds = TokenDataset(train_dir)
            train_ds.check_seq_len(cfg.seq_len)
            self.val = TokenDataset(val_dir) if val_dir is not None else None
            self.tokenizer = train_ds.tokenizer()
            if not _same_tokenizer(self.init_tokenizer, self.tokenizer):
                raise ValueError(f"the data at {train_dir} was tokenized with another tokenizer than {cfg.init_from}")
            data_vocab, data_eos = train_ds.vocab_size, train_ds.eos_id
            self.stream = WindowStream(train_ds, cfg.batch_size, cfg.seq_len, cfg.sampling, cfg.seed + 1)
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
        self.plan = self._check_memory(config)  # again with the data's vocabulary, before any weight exists
        if dry_run:  # every check above ran; the model would be the first allocation
            if cfg.init_from is not None:
                self._check_init_weights(config)
            self._check_resume()
            show(self.plan.table())
            return
        torch.manual_seed(cfg.seed)  # same initial weights on every process (FSDP shards them as they are)
        model = RATPlusLM(config)
        if cfg.init_from is not None:
            weights = Path(cfg.init_from) / "model.safetensors"
            state = strip_compile_prefix(load_state_dict_file(weights))
            if cfg.uptrain:  # the dense weights plus closed forget gates: the same function at step 0
                state = add_recurrence(state, load_config(cfg.init_from), cfg.gate_init)
            load_into(model, state, source=str(weights))
        # checkpointing is set on the model itself, so it holds under DDP / FSDP2 wrapping and compile
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        self.model = D.wrap_model(model.to(self.device), info, self.device)
        # the compiled forward is used for training steps only; self.model (eager names, no
        # ``_orig_mod.``) is what checkpoints save and load, so compiled and eager runs resume each other
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model

        # 4. optimisation
        per_step = cfg.batch_size * cfg.grad_accum
        if cfg.task == "sft":
            epochs = cfg.epochs or 4.0
            self.steps = cfg.steps or math.ceil(epochs * sft_ds.batches_per_epoch(per_step))
        else:
            self.steps = cfg.steps or math.ceil(cfg.tokens / (per_step * cfg.seq_len))
        self.warmup_steps = round(cfg.warmup * self.steps)
        self.dense_warmup_steps = round(cfg.dense_warmup * self.steps)  # dense-only batches before joint ones
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps, self.warmup_steps, cfg.lr, cfg.min_lr)
        )
        use_bf16 = uses_bf16(cfg, self.device)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )
        self.step, self.tokens_seen = 0, 0
        self.log = RunLog(self.out, info.is_main, cfg.tensorboard)
        self.last_eval: dict[str, float] = {}

    # -- setup helpers ---------------------------------------------------------------------------------

    def _check_memory(self, config: ModelConfig) -> MemoryPlan:
        """The memory plan per process; a run that cannot fit is refused with the numbers and options."""
        plan = plan_run(self.cfg, config, self.info.world_size, self.device, self.step_patterns)
        if self.dry_run and not plan.fits:
            self.show(plan.table())  # the numbers behind the refusal below
        check_plan(plan, config, sparse=plan_sparse(self.step_patterns), grad_accum=self.cfg.grad_accum)
        return plan

    def _check_init_weights(self, config: ModelConfig) -> None:
        """The dry run's stand-in for loading ``init_from``'s weights: their names and shapes, read from
        the safetensors header (nothing loaded), against the model's, with ``load_into``'s message;
        for uptraining, after ``add_recurrence`` on shape-only (meta) tensors."""
        from safetensors import safe_open

        weights = Path(self.cfg.init_from) / "model.safetensors"
        try:
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
                found = {k.replace(COMPILE_PREFIX, ""): tuple(f.get_slice(k).get_shape()) for k in keys}
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ValueError(f"cannot read weights {weights}: {e}") from e
        if self.cfg.uptrain:
            meta = {k: torch.empty(shape, device="meta") for k, shape in found.items()}
            grown = add_recurrence(meta, load_config(self.cfg.init_from), self.cfg.gate_init)
            found = {k: tuple(v.shape) for k, v in grown.items()}
        if config.tie_embeddings and HEAD_KEY not in found and EMBED_KEY in found:
            found[HEAD_KEY] = found[EMBED_KEY]  # stored once (with_tied_keys)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in RATPlusLM(config).state_dict().items()}
        problems = state_dict_problems(expected, found)
        if problems:
            raise ValueError(f"{weights} does not match the model config: " + " | ".join(problems))

    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a dry run has no process group: its own)."""
        return obj if self.dry_run else D.broadcast_object(obj, self.info)

    def _bundled_vocab(self, config: ModelConfig) -> tuple[int, int | None]:
        """(vocabulary, EOS id) the bundled corpus would be tokenized with (a dry run reads, never trains:
        a BPE is trained to the model's vocab_size at most)."""
        shakespeare_plays()  # the corpus is installed
        if self.init_tokenizer is not None:
            tok = self.init_tokenizer
        elif self.cfg.tokenizer == "bpe":
            check_bpe_vocab(config.vocab_size)  # what train_bpe would refuse
            return config.vocab_size, None
        else:
            tok = get_tokenizer(self.cfg.tokenizer)
        return vocab_size(tok), eos_id(tok)

    def _resolve_data(self, config: ModelConfig) -> tuple[Path, Path | None] | None:
        """(train, val) shard folders; None in a dry run whose bundled corpus is not tokenized yet."""
        cfg = self.cfg
        if cfg.data is None:
            root = self.out / "data"
            if self.dry_run and not (root / "train" / META_FILE).is_file():
                return None
            if self.info.is_main and not (root / "train" / META_FILE).is_file():
                if self.init_tokenizer is not None:
                    tok = self.init_tokenizer
                else:
                    tok = get_tokenizer(cfg.tokenizer, shakespeare_documents("train"), config.vocab_size)
                for split in ("train", "val"):
                    prepare_shards(
                        shakespeare_documents(split), tok, root / split, overwrite=True, show_progress=cfg.progress
                    )
            if not self.dry_run:
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
            "dense_warmup_steps": self.dense_warmup_steps,
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
            task="uptrain" if cfg.uptrain else cfg.task,
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
            data_js, data_tensors = self.stream.state_dict()
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
                model_files=self.model_files,
            )
            ckpt_io.prune_checkpoints(self.ckpt_root, self.cfg.keep_last)
        D.barrier(self.info)

    def _resume_target(self) -> Path | None:
        """The checkpoint ``resume`` names (the newest valid one for True), None to start from scratch."""
        cfg = self.cfg
        if cfg.resume is False:
            return None
        if cfg.resume is not True:
            return Path(cfg.resume)
        found: Path | str | None = None
        if self.info.is_main:
            try:
                found = ckpt_io.latest_checkpoint(self.ckpt_root)
            except ckpt_io.CheckpointError as e:  # every checkpoint damaged: all ranks stop together
                found = f"error: {e}"
        found = self._broadcast(found)
        if isinstance(found, str):
            raise ckpt_io.CheckpointError(found.removeprefix("error: "))
        if found is None:
            logger.info("ratplus: no checkpoint in %s, starting from scratch", self.ckpt_root)
        return found

    def _check_resume(self) -> None:
        """The dry run's stand-in for ``maybe_resume``: the checkpoint is verified and its model
        configuration compared, without loading its tensors."""
        path = self._resume_target()
        if path is not None:
            ckpt_io.verify_checkpoint(path)
            if load_config(path) != self.config:
                raise ValueError(f"checkpoint {path} is for another model configuration than this run")

    def maybe_resume(self) -> None:
        path = self._resume_target()
        if path is None:
            return
        ck = ckpt_io.load_checkpoint(path)
        if ck.config != self.config:
            raise ValueError(f"checkpoint {path} is for another model configuration than this run")
        differs = [
            k
            for k in (
                "seq_len",
                "batch_size",
                "grad_accum",
                "steps",
                "lr",
                "joint_train",
                "step_patterns",
                "dense_warmup_steps",
                "seed",
            )
            if ck.train_config.get(k) != self.resolved().get(k)
        ]
        if differs:
            logger.warning("ratplus: resuming with different settings than the checkpoint: %s", ", ".join(differs))
        D.load_full_state(self.model, strip_compile_prefix(ck.model_state), self.optimizer, ck.optimizer_state)
        self.scheduler.load_state_dict({**ck.trainer_state["scheduler"], "lr_lambdas": [None]})
        self.stream.load_state_dict(ck.trainer_state["data"], ck.tensors)
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
        """One batch: ``optimizer_steps`` over ``step_patterns`` (only the dense one during the dense
        warm-up), then one scheduler step."""
        local = [(self._local(x), self._local(y)) for x, y in batch]
        patterns = self.step_patterns[-1:] if self.step < self.dense_warmup_steps else self.step_patterns
        out = optimizer_steps(
            self.model,
            self.optimizer,
            local,
            patterns,
            n_targets=count_targets(batch),
            grad_clip=self.cfg.grad_clip,
            autocast=self.autocast,
            info=self.info,
            forward=self.forward_model,
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

    def _open_gates(self) -> None:
        """Uptraining's gate curriculum (``gate_open`` > 0): before batch ``self.step`` the forget-gate
        biases take this batch's share of the linear move from ``gate_init`` to ``gate_target`` over the
        first ``gate_open`` fraction of the steps, added to whatever training has learnt. The shift is
        a function of the step alone and lives in the weights, so a resumed run continues it exactly."""
        cfg = self.cfg
        if not cfg.gate_open:
            return
        span = max(1, round(cfg.gate_open * self.steps))
        done = lambda step: min(step, span) / span  # noqa: E731  (fraction of the move made before ``step``)
        delta = (cfg.gate_target - cfg.gate_init) * (done(self.step + 1) - done(self.step))
        if delta:
            with torch.no_grad():
                for module in self.model.modules():
                    if getattr(module, "fgate_bias", None) is not None:
                        module.fgate_bias.add_(delta)

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
            self._open_gates()
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
            ckpt_io.write_model_folder(
                final, self.config, model_state, self.tokenizer, self.metadata(), model_files=self.model_files
            )
            logger.info("ratplus: model written to %s", final)
        D.barrier(info)
        self.log.close()
        return final


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training job; returns the final model folder ``<out_dir>/final``."""
    cfg.validate()
    info, device = D.init_distributed(cfg.distributed, resolve_device(cfg.device))
    try:
        # one writer per output folder (rank 0 holds the lock for the whole job)
        with folder_lock(cfg.out_dir, cfg.task) if info.is_main else contextlib.nullcontext():
            return _Run(cfg, info, device).run()
    finally:
        D.shutdown(info)


def plan_only(cfg: TrainConfig, show: Callable[[str], Any] = print) -> MemoryPlan:
    """``--dry-run``: the real run (``train``) stopped before its first allocation. Every check it makes
    (knobs, patterns, heads, lengths, the data, the memory plan) runs, the memory plan per process
    goes to ``show``, and a run that cannot fit is refused with the numbers and the options that fit.
    Nothing is written and no model is built; the data is read (its index, the SFT records)."""
    import os

    cfg.validate()
    device = resolve_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: plan per process, no process group
    info = D.DistInfo(world_size=world, mode=cfg.distributed if world > 1 else "none")
    return _Run(cfg, info, device, dry_run=True, show=show).plan
