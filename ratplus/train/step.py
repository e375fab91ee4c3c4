"""One training step (docs/DESIGN.md section 5): the optimizer, the LR schedule, the summed loss and the
joint-training step that takes one optimizer step per pattern on the same batch.

Shapes: B batch (sequences), T sequence length, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ratplus.train import distributed as D
from ratplus.train.data import IGNORE_INDEX


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norm weights and biases).

    ``eps``: Adam's epsilon. A gradient far below it gets a step shrunk by about gradient / eps
    instead of a normalised one; uptraining lowers it so the closed forget gates, whose gradients
    pass through sigmoid'(-12) = 6e-6, can move (docs/DESIGN.md section 9).

    The fused implementation is used where it exists (CPU, CUDA): on CPU it is several times faster
    than the per-tensor loop (0.14 s vs 1.0 s per step for the 125m preset, one thread)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type in ("cpu", "cuda"))


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
    forward: torch.nn.Module | None = None,
) -> tuple[dict[str, float], float]:
    """The joint-training step of docs/DESIGN.md section 5, for any list of patterns.

    For each pattern in order (``[sparse, "dense"]`` when joint training, one pattern otherwise):
    forward/backward every micro-batch of ``batch`` (gradients accumulate), clip, ``optimizer.step()``,
    zero the gradients. So a joint step takes two optimizer steps on the *same* batch; the caller
    steps the LR scheduler once afterwards. ``batch``: this process's micro-batches (input_ids,
    labels), each (B, T) int64 on the model's device; ``n_targets``: non-ignored labels in the whole
    step over all processes (default: counted in ``batch``). Returns the mean loss per pattern (over
    all processes) and the last gradient norm (before clipping). ``forward``: the module the losses are
    computed with when it is not ``model`` itself (its ``torch.compile`` wrapper)."""
    n_targets = n_targets or count_targets(batch)
    device = batch[0][0].device
    losses, grad_norm = {}, 0.0
    for pattern in patterns:
        total = torch.zeros((), device=device)
        for i, (x, y) in enumerate(batch):
            with D.gradient_sync(model, info, enabled=i == len(batch) - 1):
                loss = loss_sum(model if forward is None else forward, x, y, pattern, autocast) / n_targets
                # DDP / FSDP average gradients over processes; the loss is already the global mean
                (loss * info.world_size).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[pattern] = float(D.all_reduce_sum(total, info))
    return losses, grad_norm


def lr_factor(step: int, steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """LR multiplier for batch ``step`` (0-based): linear warmup, then cosine from lr down to min_lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr
