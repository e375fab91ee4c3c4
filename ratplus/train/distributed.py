"""Multi-process training under ``torchrun``: DDP or FSDP2, and full (unsharded) state dicts.

Launch: ``torchrun --nproc_per_node N -m ratplus train ...``. Without ``torchrun`` (WORLD_SIZE
unset or 1) everything here is a no-op and the model is used as is. Backend: NCCL on CUDA, gloo on
CPU. FSDP2 shards every block (``fully_shard`` per ``Block``) and then the root, which holds the
tied embedding / LM head.

Checkpoints are written from *full* state dicts (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict=True``), keyed by parameter name, so one,
two or N processes, DDP or FSDP, all produce and read the same files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ratplus.model.rat import Block

MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()  # a plain single-process run


def init_distributed(mode: str, device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by ``torchrun`` with more than one process.

    Returns the process's rank info and its device (``cuda:<local_rank>`` on GPUs)."""
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {', '.join(MODES)}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, mode=mode, owns_group=owns), device


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over processes (``t`` itself when single-process)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per block, then the root); the model itself when single-process."""
    if not info.enabled:
        return model
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The ``RATPlusLM`` inside a DDP wrapper (an FSDP2 model is its own module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, info: DistInfo, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not info.enabled or enabled:
        yield
    elif info.mode == "ddp":
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded float CPU weights keyed by parameter name (a collective under FSDP: call on all ranks)."""
    return get_model_state_dict(unwrap(model), options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Unsharded optimizer state keyed by parameter name (a collective under FSDP)."""
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_state(
    model: nn.Module,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict | None = None,
) -> None:
    """Load full state dicts (every rank holds the whole dict) into a plain, DDP or FSDP2 model."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(unwrap(model), model_state, options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(unwrap(model), optimizer, optimizer_state, options=opts)
