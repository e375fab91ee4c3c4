"""The RAT+ language model in one readable file (docs/DESIGN.md section 2).

Shapes: B batch, T sequence length, H heads, K head dim, C model width (d_model), V vocab.
Hkv KV heads (``num_kv_heads``; = H without grouped-query attention), G = H / Hkv query heads per KV head.

A block is ``x = x + RATPlus(x); x = x + FFN(x)``. The RAT+ layer projects the normed input to
[o, q, k, v, f], runs a gated linear recurrence over k and v (gate g = sigmoid(f), float32, zero
start state), applies RoPE to q and the recurrent k *after* the recurrence, attends with the chosen
pattern, gates the result with sigmoid(o) and projects back. ``apply_re=False`` drops f and the
recurrence: that is the gated-attention baseline of the paper.

Module names mirror the paper's reference checkpoints key for key (``embedding.wte``,
``backbone.layers.{i}.seq_layer.in_proj``, ``...hidden_layer.fc1``, ``backbone.ln``,
``head.lm_head``), so converting one is a plain ``load_state_dict``.

The attention pattern is an argument of ``forward``, not of the module: one set of weights serves
dense training, joint training and every sparse inference pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ratplus.config import HeadGroups, ModelConfig, PatternSpec
from ratplus.ops.attention import attention, repeat_kv
from ratplus.ops.rope import apply_rope, rope_cos_sin
from ratplus.ops.scan import gated_scan
from ratplus.runtime import check_fits_memory

if TYPE_CHECKING:
    from ratplus.model.cache import LayerCache, RATPlusCache


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The recurrence and its gate run in float32 even under bf16 autocast (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class LMOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RATPlusLayer(nn.Module):
    """Recurrence-augmented attention (the paper's ``seq_layer``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.d_model
        self.num_heads, self.head_dim, self.apply_re = config.num_heads, config.head_dim, config.apply_re
        self.num_kv_heads, self.kv_group = config.num_kv_heads, config.kv_group
        self.input_norm = RMSNorm(C, config.norm_eps)
        # packed rows: o, q (C each), k, v, f (Hkv x K each; f = forget-gate logits, absent in the
        # attention baseline). Without GQA that is 5C rows, the reference checkpoints' layout.
        self.split_sizes = [C, C] + [config.kv_dim] * (3 if config.apply_re else 2)
        self.in_proj = nn.Linear(C, sum(self.split_sizes), bias=False)
        self.out_proj = nn.Linear(C, C, bias=False)
        # A bias on the forget-gate logits only (``gate_bias``): a dense model gains the recurrence with
        # f rows zero and this bias very negative, so g ~ 0 and k~ = k, v~ = v at the start (uptraining).
        self.fgate_bias = nn.Parameter(torch.zeros(config.kv_dim)) if config.gate_bias else None

    def project(self, x: torch.Tensor):
        """x (B, T, C) -> o (B, T, C); q (B, H, T, K); k, v (B, Hkv, T, K); g (B, Hkv, T, K) float32 or None."""
        B, T, _ = x.shape
        parts = self.in_proj(self.input_norm(x)).split(self.split_sizes, dim=-1)
        o, q, k, v = parts[:4]
        heads = lambda t, n: t.view(B, T, n, self.head_dim).transpose(1, 2)  # noqa: E731  (B, n, T, K)
        Hkv = self.num_kv_heads
        g = None
        if self.apply_re:
            f = _at_least_fp32(parts[4])
            if self.fgate_bias is not None:
                f = f + self.fgate_bias
            g = heads(torch.sigmoid(f), Hkv)
        return o, heads(q, self.num_heads), heads(k, Hkv), heads(v, Hkv), g

    def recur(
        self,
        g: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: torch.Tensor | None = None,
        scan_backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated recurrence over k and v with one shared gate, in float32 as in the paper.

        g, k, v (B, Hkv, T, K); state: (B, Hkv, 2K) float32 = [k~, v~] before the first step (None = zeros).
        Returns recurrent k~, v~ (B, Hkv, T, K) in float32."""
        # k and v share the gate; two scans over strided views avoid copying g or concatenating k, v.
        k_state, v_state = (None, None) if state is None else state.split(self.head_dim, dim=-1)
        if g.shape[-2] == 1 and state is not None:
            # one decode step: h = g h_prev + (1 - g) x directly, without the scan's chunking overhead
            step = lambda x, h: torch.addcmul((1 - g) * _at_least_fp32(x).to(g.dtype), g, h.unsqueeze(-2))  # noqa: E731
            return step(k, k_state), step(v, v_state)
        k = gated_scan(g, _at_least_fp32(k).to(g.dtype), k_state, backend=scan_backend)
        v = gated_scan(g, _at_least_fp32(v).to(g.dtype), v_state, backend=scan_backend)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        pattern: HeadGroups,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: str = "auto",
        scan_backend: str = "auto",
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); cos/sin (T, K) or (B, 1, T, K) for its positions. Returns y (B, T, C).

        Without ``cache`` x is a whole sequence at positions 0..T-1. With it, x follows the cached
        tokens: the recurrence starts from the cached state, attention sees the cached keys, and
        the cache stores the new state and keys (``ratplus.model.cache``)."""
        B, T, C = x.shape
        o, q, k, v, g = self.project(x)
        if g is not None:
            if cache is not None:
                g, k, v = cache.hold_padding(g, k, v)
            k, v = self.recur(g, k, v, None if cache is None else cache.state, scan_backend=scan_backend)
            if cache is not None:
                cache.update_state(k, v)  # k~, v~ before RoPE
            # Attention runs in the activation dtype (bf16 under autocast); the recurrence stayed fp32.
            k, v = k.to(q.dtype), v.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoPE after the recurrence, not on v
        # (B, H, T, K); with a cache, over the cached keys plus the new ones (the cache keeps Hkv heads)
        if cache is None:
            a = attention(q, repeat_kv(k, self.kv_group), repeat_kv(v, self.kv_group), pattern, backend=backend)
        else:
            a = cache.attend(q, k, v, backend)
        a = a.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(a * torch.sigmoid(o))


class FFN(nn.Module):
    """fc2(GELU(fc1(RMSNorm(x)))), exact GELU, no bias (the paper's ``hidden_layer``).

    ``ffn_act="swiglu"`` (imported Llama-family models): fc1 packs the gate rows then the up rows
    (2F, C) and the block is fc2(silu(gate) * up), Llama's MLP with one matmul for both inputs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.ffn_act == "swiglu"
        self.ln = RMSNorm(config.d_model, config.norm_eps)
        self.fc1 = nn.Linear(config.d_model, (2 if self.swiglu else 1) * config.d_ffn, bias=False)
        self.fc2 = nn.Linear(config.d_ffn, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.ln(x))  # (B, T, F), or (B, T, 2F) for SwiGLU
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, F) each
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.seq_layer = RATPlusLayer(config)
        self.hidden_layer = FFN(config)

    def forward(self, x, pattern, cos, sin, backend="auto", scan_backend="auto", cache=None):
        x = x + self.seq_layer(x, pattern, cos, sin, backend, scan_backend, cache)
        return x + self.hidden_layer(x)


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.ln = RMSNorm(config.d_model, config.norm_eps)


class LMHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)


class RATPlusLM(nn.Module):
    """RAT+ causal language model. ``forward(input_ids, pattern=...)`` returns logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # sized before allocating: a typo such as d_model=2**40 is a clear error, not an allocator failure
        # (nothing is checked on the meta device, where nothing is allocated)
        device = torch.get_default_device()
        nbytes = torch.get_default_dtype().itemsize * config.num_params()
        check_fits_memory(nbytes, f"the {config.num_params():,}-parameter model ({config.name or 'RATPlusLM'})", device)
        self.config = config
        self.embedding = Embedding(config)
        self.backbone = Backbone(config)
        self.head = LMHead(config)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.head.lm_head.weight = self.embedding.wte.weight
        self.checkpoint_every = 0  # activation checkpointing: 0 = off, n = every n-th block (0, n, 2n, ...)

    def set_activation_checkpointing(self, every: int | bool = 1) -> None:
        """Recompute block activations in backward instead of keeping them: ``every`` = 1 checkpoints every
        block, n every n-th block (blocks 0, n, 2n, ...), 0 / False turns it off.

        Applies to full forwards with gradients (training); forwards with a cache or under ``no_grad`` run
        as before. Outputs and gradients equal the run without it: the recomputation is the same forward
        (``torch.utils.checkpoint``, non-reentrant, so it composes with DDP, FSDP2 and torch.compile)."""
        if isinstance(every, bool):
            every = int(every)
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"activation checkpointing: every must be an int >= 0 (0 = off), got {every!r}")
        self.checkpoint_every = every

    def checkpointed(self, index: int) -> bool:
        """Whether block ``index`` recomputes its activations in backward (training forwards only)."""
        return bool(self.checkpoint_every) and index % self.checkpoint_every == 0 and torch.is_grad_enabled()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def num_params(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def resolve_pattern(self, pattern: PatternSpec) -> tuple[HeadGroups, ...]:
        return self.config.resolve_pattern(pattern)

    def check_length(self, T: int, offset: int = 0) -> None:
        if offset + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence reaches position {offset + T - 1} but max_seq_len={self.config.max_seq_len}; "
                "build the model with a larger max_seq_len"
            )

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_base, dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: h (B, T, C) -> logits (B, T, V)."""
        return self.head.lm_head(self.backbone.ln(h))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pattern: PatternSpec = None,
        labels: torch.Tensor | None = None,
        *,
        backend: str = "auto",
        scan_backend: str = "auto",
        cache: RATPlusCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | LMOutput:
        """input_ids (B, T) int64 (or ``inputs_embeds`` (B, T, C) instead, without a cache).
        ``pattern``: any pattern spec (None = dense causal).

        Without ``labels`` returns logits (B, T, V). With ``labels`` (B, T) of next-token targets
        aligned with the logits (labels[:, t] is the token after input_ids[:, t]; -100 = ignore)
        returns ``LMOutput(loss, logits)`` with the mean cross-entropy in float32.

        With ``cache`` (a ``RATPlusCache``; inference) the tokens are appended after those already
        cached (the first call is the prefill, then decode steps) and the logits are those of the
        new tokens. ``pattern`` None then means the cache's pattern; another pattern raises.
        ``attention_mask`` (B, T), 0 = left padding, is accepted with a cache only here
        (``hidden`` takes any padding without a cache).
        """
        if cache is not None and labels is not None:
            raise ValueError("labels are not supported together with a cache (inference only)")
        if cache is None and attention_mask is not None:
            raise ValueError("attention_mask (left padding) needs a cache: pass cache=RATPlusCache(...)")
        h = self.hidden(
            input_ids,
            pattern,
            inputs_embeds=inputs_embeds,
            cache=cache,
            attention_mask=attention_mask,
            backend=backend,
            scan_backend=scan_backend,
        )
        logits = self.logits(h)
        if labels is None:
            return logits
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input shape {tuple(logits.shape[:2])}")
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return LMOutput(loss, logits)

    def hidden(
        self,
        input_ids: torch.Tensor | None = None,
        pattern: PatternSpec = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RATPlusCache | None = None,
        backend: str = "auto",
        scan_backend: str = "auto",
        all_hidden: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The last block's output h (B, T, C), before the final norm (``logits(h)`` gives the logits).

        Takes input_ids (B, T) or inputs_embeds (B, T, C) (the latter without a cache). With a cache,
        as ``forward``. Without one, ``attention_mask`` (B, T) may mark padding anywhere (0 = pad):
        each row then runs as the sequence of its unmasked tokens alone (positions from 0, the
        recurrence and attention skip the pads), with gradients; outputs at padded positions are
        unspecified. ``all_hidden``: a list that receives the embeddings and every block's output."""
        if inputs_embeds is not None:
            if input_ids is not None:
                raise ValueError("pass input_ids or inputs_embeds, not both")
            if cache is not None:
                raise ValueError("inputs_embeds is not supported together with a cache; pass input_ids")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
                raise ValueError(
                    f"inputs_embeds must be (B, T, d_model={self.config.d_model}), got {tuple(inputs_embeds.shape)}"
                )
            x = inputs_embeds
        else:
            self.check_ids(input_ids, values=cache is None)
            if cache is not None:
                return self._forward_cached(
                    input_ids, pattern, cache, attention_mask, backend, scan_backend, all_hidden
                )
            x = self.embedding.wte(input_ids)  # (B, T, C)
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("input_ids is empty (T = 0)")
        self.check_length(T)
        layers = self.resolve_pattern(pattern)
        restore = None
        if all_hidden is not None:
            all_hidden.append(x)  # the embeddings as given (in the graph of the output, for retain_grad)
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be (B, T) = ({B}, {T}), got {tuple(attention_mask.shape)}")
            # Move each row's tokens to its front, pads after them (a stable sort, no host sync): causal
            # outputs of the tokens are then exactly those of the row without its pads.
            order = torch.argsort((attention_mask == 0).to(torch.uint8), dim=1, stable=True)  # (B, T)
            x = x.gather(1, order.unsqueeze(-1).expand_as(x))
            inverse = torch.argsort(order, dim=1).unsqueeze(-1).expand_as(x)  # (B, T, C)
            restore = lambda t: t.gather(1, inverse)  # noqa: E731
        cos, sin = self.rope(torch.arange(T, device=x.device), x.dtype)
        for i, (block, layer_pattern) in enumerate(zip(self.backbone.layers, layers, strict=True)):
            if self.checkpointed(i):
                x = checkpoint(block, x, layer_pattern, cos, sin, backend, scan_backend, use_reentrant=False)
            else:
                x = block(x, layer_pattern, cos, sin, backend, scan_backend)
            if all_hidden is not None:
                all_hidden.append(x)
        if restore is not None:
            x = restore(x)
            if all_hidden is not None:
                all_hidden[1:] = [restore(t) for t in all_hidden[1:]]
        return x

    def check_ids(self, input_ids: torch.Tensor, values: bool = True) -> None:
        """ValueError unless input_ids is (B, T) integer ids; with ``values``, also in [0, vocab_size).

        The value check reads the ids on the host, so it is skipped while ``torch.compile`` traces (a
        graph break otherwise); out-of-range ids then fail inside the embedding lookup."""
        if input_ids is None:
            raise ValueError("input_ids is required (or inputs_embeds)")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"input_ids must be a (B, T) tensor of token ids, got {type(input_ids).__name__}; for ragged "
                "lists of ids use ratplus.generate (it left-pads them) or pad them into a tensor"
            )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if values and input_ids.numel() and not torch.compiler.is_compiling():
            # full forwards (training, scoring) check the ids here; decoding checks them once in generation.py
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids hold token id {bad} outside [0, vocab_size={self.config.vocab_size})")

    def decode_step(
        self,
        token: torch.Tensor,
        cache: RATPlusCache,
        held: torch.Tensor,
        core: Callable[[torch.Tensor, RATPlusCache, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One fixed-shape decode step: token (B, 1) int64 after ``held`` (B,) int64 cached tokens per
        row (on the model's device). Returns the next-token logits (B, V).

        Same result as ``self(token, cache=cache)[:, -1]`` (the reference), but with no host reads and
        no branching on values, so ``torch.compile`` can capture ``decode_step_core`` as one graph.
        Nothing is validated per token: ``ratplus.generation`` checks the inputs once per call. The
        cache must ``supports_fixed_step`` and have room for the token. ``core``: the tensor work to run
        instead of ``decode_step_core``, e.g. ``torch.compile(model.decode_step_core)``."""
        cache.begin_fixed_step(held)
        try:
            logits = (core or self.decode_step_core)(token, cache, held)
        except BaseException:
            cache.end_fixed_step(ok=False)
            raise
        cache.end_fixed_step()
        return logits

    def decode_step_core(self, token: torch.Tensor, cache: RATPlusCache, held: torch.Tensor) -> torch.Tensor:
        """The tensor work of ``decode_step`` (between ``cache.begin_fixed_step`` and ``end_fixed_step``)."""
        return self.logits(self.decode_step_hidden(token, cache, held))[:, -1]

    def decode_step_hidden(self, token: torch.Tensor, cache: RATPlusCache, held: torch.Tensor) -> torch.Tensor:
        """``decode_step_core`` up to the last block: its output (B, 1, C) before the final norm (the HF
        model applies the norm and head itself)."""
        x = self.embedding.wte(token)  # (B, 1, C)
        cos, sin = self.rope(held.view(-1, 1, 1), x.dtype)  # (B, 1, 1, K): each row at its own position
        for block, layer_pattern, layer_cache in zip(self.backbone.layers, cache.pattern, cache.layers, strict=True):
            x = block(x, layer_pattern, cos, sin, cache=layer_cache)
        return x

    def _forward_cached(self, input_ids, pattern, cache, attention_mask, backend, scan_backend, all_hidden=None):
        # The cache is inference-only: its buffers are written in place, so a graph through them could not
        # be differentiated. The blocks run without autograd (only the caller's final norm and head may
        # build a graph; forward refuses labels with a cache, and so does the HF layer while training).
        with torch.no_grad(), cache.append(input_ids, pattern, attention_mask) as step:  # checks pattern, room, padding
            x = self.embedding.wte(input_ids)  # (B, T, C)
            if all_hidden is not None:
                all_hidden.append(x)
            cos, sin = self.rope(step.positions, x.dtype)  # (T, K), or (B, 1, T, K) when rows differ
            for block, layer_pattern, layer_cache in zip(
                self.backbone.layers, cache.pattern, cache.layers, strict=True
            ):
                x = block(x, layer_pattern, cos, sin, backend, scan_backend, layer_cache)
                if all_hidden is not None:
                    all_hidden.append(x)
        return x
