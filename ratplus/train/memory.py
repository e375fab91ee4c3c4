"""The memory plan of a training run: peak bytes per process estimated from the configuration, compared
with the memory *available* on the device before the first step (``ratplus train --dry-run`` prints it).

Shapes: B batch (sequences per process), T sequence length, C d_model, F d_ffn (ffn_mult x C),
kv the k/v width (num_kv_heads x head dim), H heads, V vocab, L layers, P parameters.

What a step holds at its peak (float32 master weights, AdamW, as ``train/step.py`` runs it):

* weights 4P, gradients 4P, AdamW moments 8P bytes: divided by the process count under FSDP2
  (each process keeps its shard, plus one block gathered whole at a time, and the next one
  prefetched); whole on every process under DDP, which adds its gradient buckets (4P).
* activations saved for backward, per token of the micro-batch (B x T tokens), per layer:
  float32: 4 x (15C + 2F + 3H) bytes, + 4 x 4kv for the recurrence (g, k~, v~ and the scan's own),
  + 4 x 2kv in a sparse pattern (the segmented attention's gathered keys); under bf16 autocast
  2 x 19C + 4F + 14kv + 12H bytes (matmul inputs in bf16, the recurrence and norms in float32), plus
  a bf16 copy of every weight (2P) that autocast keeps until backward. These coefficients are the
  autograd graph's saved tensors counted on the model (``tests/train/test_memory.py`` checks them
  against ``torch.autograd.graph.saved_tensors_hooks`` on small models); a checkpointed block
  keeps only its input (C values), and backward recomputes one block at a time (one block's
  activations on top).
* the head: final norm and embedding output (4C) and the cross-entropy's log-softmax, its
  gradient and the logits' gradient in float32 (3 x 4V bytes per token) at the start of backward.
* a fixed runtime: Python, PyTorch and the libraries on the CPU (``CPU_RUNTIME``); on CUDA the
  kernels' workspaces (``CUDA_RUNTIME``). Plus the allocator's overhead on all of the above tensors
  (``ALLOCATOR_OVERHEAD``): on the CPU glibc's malloc keeps freed blocks resident (one block's
  forward and backward at C=256 measured 2% to 29% above its live tensors depending on T); on CUDA
  the caching allocator's fragmentation.

The joint step runs its patterns one after the other, so its peak is the largest pattern's.
Checked against the peak RSS of real CPU runs in docs/benchmarks/memory_plan_cpu_20261205.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ratplus.config import ModelConfig
from ratplus.runtime import available_memory

GiB = 2**30
#: Resident memory of the training process before any model exists (interpreter, torch, tokenizers,
#: the libraries ratplus imports), measured on CPU: about 0.40 GiB.
CPU_RUNTIME = int(0.40 * GiB)
#: CUDA kernels' workspaces (cuBLAS, attention) beyond the allocator's tensors.
CUDA_RUNTIME = int(0.75 * GiB)
#: Resident bytes beyond the live tensors, as a share of them, per device type.
ALLOCATOR_OVERHEAD = {"cpu": 0.15, "cuda": 0.10}


@dataclass(frozen=True)
class MemoryPlan:
    """Peak bytes per process of one training configuration (module docstring), by part."""

    device: str
    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    head: int
    runtime: int
    micro_batch: int  # sequences per process per micro-batch
    seq_len: int
    checkpoint_every: int
    processes: int
    mode: str  # none | ddp | fsdp
    dtype: str  # float32 | bfloat16 (autocast)
    available: int | None = None

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.head + self.runtime

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer (AdamW)", self.optimizer),
            ("activations", self.activations),
            ("head (logits, loss)", self.head),
            ("runtime + allocator", self.runtime),
            ("total per process", self.total),
        ]
        ckpt = "off" if not self.checkpoint_every else f"every {self.checkpoint_every} block(s)"
        lines = [
            f"memory plan: {self.params / 1e6:,.1f}M params, micro-batch {self.micro_batch} x {self.seq_len} tokens "
            f"per process, {self.processes} process(es) ({self.mode}), {self.dtype}, checkpointing {ckpt}"
        ]
        lines += [f"  {name:<22}{b / GiB:9.2f} GiB" for name, b in rows]
        if self.available is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {'available on ' + self.device:<22}{self.available / GiB:9.2f} GiB  -> {verdict}")
        return "\n".join(lines)


def layer_activation_bytes(config: ModelConfig, sparse: bool, bf16: bool) -> int:
    """Bytes one block saves for backward per token (module docstring's coefficients)."""
    C, F, H, kv = config.d_model, config.d_ffn, config.num_heads, config.kv_dim
    if config.ffn_act == "swiglu":
        F *= 2  # fc1's output is 2F wide, and silu(gate) and silu(gate) * up are saved beside it
    if bf16:
        n = 38 * C + 4 * F + 12 * H + (14 * kv if config.apply_re else 0)
    else:
        n = 4 * (15 * C + 2 * F + 3 * H) + (16 * kv if config.apply_re else 0)
    if sparse and config.apply_re:
        n += (4 if bf16 else 8) * kv
    return n


def _block_params(config: ModelConfig) -> int:
    return (config.num_params() - config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)) // max(
        config.num_layers, 1
    )


def plan_memory(
    config: ModelConfig,
    micro_batch: int,
    seq_len: int,
    device: torch.device | str = "cpu",
    checkpoint_every: int = 0,
    processes: int = 1,
    mode: str = "none",
    bf16: bool = False,
    sparse: bool = True,
    available: int | None = None,
) -> MemoryPlan:
    """The peak memory per process of a training step (module docstring). ``micro_batch``: sequences
    per process per micro-batch; ``sparse``: whether a step pattern is sparse (joint training);
    ``available``: compare with this many bytes (default: ``available_memory(device)`` now)."""
    device = torch.device(device)
    P, L = config.num_params(), config.num_layers
    shard = processes if mode == "fsdp" and processes > 1 else 1
    weights, gradients, optimizer = 4 * P // shard, 4 * P // shard, 8 * P // shard
    if shard > 1:  # one block gathered whole (and the next prefetched), with its gradient
        weights += 2 * 4 * _block_params(config)
        gradients += 4 * _block_params(config)
    if mode == "ddp" and processes > 1:
        gradients += 4 * P  # DDP's gradient buckets
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes(config, sparse, bf16)
    if checkpoint_every:
        kept = len(range(0, L, checkpoint_every))
        act = tokens * (kept * 4 * config.d_model + (L - kept) * per_layer + per_layer)
    else:
        act = tokens * L * per_layer
    if bf16:
        act += 2 * P // shard + (2 * 4 * _block_params(config) if shard > 1 else 0)  # autocast's weight copies
    head = tokens * (4 * 4 * config.d_model + 3 * 4 * config.vocab_size)
    tensors = weights + gradients + optimizer + act + head
    base = CUDA_RUNTIME if device.type == "cuda" else CPU_RUNTIME
    runtime = base + int(ALLOCATOR_OVERHEAD.get(device.type, 0.0) * tensors)
    return MemoryPlan(
        device=str(device),
        params=P,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=act,
        head=head,
        runtime=runtime,
        micro_batch=micro_batch,
        seq_len=seq_len,
        checkpoint_every=checkpoint_every,
        processes=processes,
        mode=mode if processes > 1 else "none",
        dtype="bfloat16" if bf16 else "float32",
        available=available if available is not None else available_memory(device),
    )


def fitting_options(plan: MemoryPlan, config: ModelConfig, sparse: bool, grad_accum: int = 1) -> list[str]:
    """Changes of the run that would make ``plan`` fit its available memory, each with its total."""
    if plan.available is None:
        return []
    args = dict(
        config=config,
        seq_len=plan.seq_len,
        device=plan.device,
        checkpoint_every=plan.checkpoint_every,
        processes=plan.processes,
        mode=plan.mode,
        bf16=plan.dtype == "bfloat16",
        sparse=sparse,
        available=plan.available,
    )
    out = []
    world = plan.processes
    for b in (plan.micro_batch // 2, plan.micro_batch // 4, 1):
        if 1 <= b < plan.micro_batch:
            p = plan_memory(micro_batch=b, **args)
            if p.fits:
                k = plan.micro_batch // b
                out.append(
                    f"--batch-size {b * world} --grad-accum {grad_accum * k} (same tokens per step): "
                    f"{p.total / GiB:.2f} GiB"
                )
                break
    if plan.checkpoint_every != 1:
        for b in sorted({plan.micro_batch, max(1, plan.micro_batch // 2), 1}, reverse=True):
            p = plan_memory(micro_batch=b, **{**args, "checkpoint_every": 1})
            if p.fits:
                batch = (
                    ""
                    if b == plan.micro_batch
                    else f" --batch-size {b * world} --grad-accum {grad_accum * plan.micro_batch // b}"
                )
                out.append(f"--activation-checkpointing 1{batch}: {p.total / GiB:.2f} GiB")
                break
    if torch.device(plan.device).type == "cuda":
        for n in (2, 4, 8, 16, 32, 64):
            if n <= world:
                continue
            p = plan_memory(
                micro_batch=max(1, plan.micro_batch * world // n), **{**args, "processes": n, "mode": "fsdp"}
            )
            p1 = plan_memory(micro_batch=1, **{**args, "processes": n, "mode": "fsdp", "checkpoint_every": 1})
            if p.fits or p1.fits:
                extra = "" if p.fits else " --activation-checkpointing 1 and a micro-batch of 1 per process"
                best = p if p.fits else p1
                run = f"torchrun --nproc_per_node {n} ... --distributed fsdp{extra}"
                out.append(f"{run}: {best.total / GiB:.2f} GiB per process")
                break
    else:
        kind = torch.device(plan.device).type
        base = CUDA_RUNTIME if kind == "cuda" else CPU_RUNTIME
        state = int((plan.weights + plan.gradients + plan.optimizer) * (1 + ALLOCATOR_OVERHEAD.get(kind, 0.0))) + base
        if state > plan.available:
            out.append(
                f"the weights, gradients and AdamW state alone need {state / GiB:.2f} GiB: a smaller model, or "
                "FSDP over several machines or GPUs (torchrun ... --distributed fsdp), each holding 1/N of them"
            )
    return out


def check_plan(plan: MemoryPlan, config: ModelConfig, sparse: bool, grad_accum: int = 1) -> None:
    """ValueError with the plan's numbers and the options that would fit when ``plan`` does not fit."""
    if plan.fits:
        return
    options = fitting_options(plan, config, sparse, grad_accum)
    parts = ", ".join(
        f"{name} {b / GiB:.2f}"
        for name, b in (
            ("weights", plan.weights),
            ("gradients", plan.gradients),
            ("AdamW", plan.optimizer),
            ("activations", plan.activations),
            ("head", plan.head),
            ("runtime + allocator", plan.runtime),
        )
    )
    fix = "; ".join(options) if options else "none found here: use a machine with more memory"
    raise ValueError(
        f"the memory plan needs about {plan.total / GiB:.2f} GiB per process ({parts} GiB; micro-batch "
        f"{plan.micro_batch} x {plan.seq_len} tokens, {plan.dtype}) but only {plan.available / GiB:.2f} GiB are "
        f"available on {plan.device}: the run would end in the out-of-memory killer. Options that fit: {fix}. "
        "(--dry-run prints the plan.)"
    )
