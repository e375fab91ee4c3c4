"""What a training run is before it starts: the model configuration a ``TrainConfig`` names (a
preset, a model folder or a ``config.json``, before the data fixes the vocabulary) and the memory
plan of the run per process (``ratplus.train.memory``); the compile prefix of state dicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ratplus.config import ModelConfig
from ratplus.io.folder import load_config
from ratplus.io.manifest import verify_folder
from ratplus.model.uptrain import recurrent_config
from ratplus.runtime import resolve_device
from ratplus.train.config import TrainConfig
from ratplus.train.memory import MemoryPlan, plan_memory


def base_model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture before the data fixes the vocabulary (patterns and lengths are checked on it)."""
    source = cfg.init_from or cfg.model
    p = Path(source)
    if p.is_dir():
        verify_folder(p, require=False)  # before anything is read; a folder of another tool loads with a note
        config = load_config(p)
        if cfg.model_overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **cfg.model_overrides})
        if cfg.baseline and config.apply_re:
            raise ValueError(f"baseline=True but the model at {p} is a RAT+ model (apply_re=True)")
        if cfg.uptrain:
            config = recurrent_config(config)  # refuses a model that already has the recurrence
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


#: The prefix torch.compile's wrapper puts before every parameter name (the paper's checkpoints carry it).
COMPILE_PREFIX = "_orig_mod."


def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict keyed as the eager model: ``_orig_mod.`` dropped wherever it appears in a key."""
    return {k.replace(COMPILE_PREFIX, ""): v for k, v in state.items()}


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")


def plan_run(
    cfg: TrainConfig,
    config: ModelConfig | None = None,
    world_size: int | None = None,
    device: torch.device | None = None,
    step_patterns: list[str] | None = None,
) -> MemoryPlan:
    """The memory plan of ``cfg`` (``ratplus.train.memory``) per process: ``world_size`` processes
    (default: torchrun's WORLD_SIZE), the model config (default: the one ``cfg`` names, before the
    data fixes its vocabulary)."""
    config = config or base_model_config(cfg)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    device = device or resolve_device(cfg.device)
    if step_patterns is None:
        step_patterns = ["sparse", "dense"] if cfg.joint_train else [cfg.train_pattern]
    return plan_memory(
        config,
        micro_batch=max(1, cfg.batch_size // world),
        seq_len=cfg.seq_len,
        device=device,
        checkpoint_every=cfg.activation_checkpointing,
        processes=world,
        mode=cfg.distributed if world > 1 else "none",
        bf16=uses_bf16(cfg, device),
        sparse=plan_sparse(step_patterns),
    )


def plan_sparse(step_patterns: list[str]) -> bool:
    return any(p != "dense" for p in step_patterns)
