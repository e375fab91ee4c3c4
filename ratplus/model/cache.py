"""Decoding cache of a RAT+ model (docs/DESIGN.md section 4): state and slot indices.

Shapes: B batch, H heads (h: heads of one head group), T new tokens, S cache slots, K head dim;
Hkv KV heads (h_kv of a group), G = H / Hkv query heads per KV head (grouped-query attention).
D/W/P are pattern sizes (dilation, local window, initial tokens); R = W + 1 is the ring size.

Per layer the cache holds the recurrent state (k~, v~ of the last token, BEFORE RoPE, float32 or
wider) and, per head group, key/value slots (keys AFTER RoPE at their absolute position):

dense / dilated / local-only groups (``SlotLayout``), slots laid out as
    [ P initial | R = W + 1 ring | floor((max_len - 1) / D) dilated ]
  * token p < P goes to initial slot p;
  * token p >= P goes to ring slot P + (p - P) % R; it stays there while it is among the last R
    tokens, i.e. inside the local window of the next query;
  * when it leaves the ring and (p + 1) % D == 0 it moves to the dilated area (slot order = position
    order), otherwise it is dropped.
  After n tokens the filled slots are always the prefix [0, num_valid(n)), holding exactly the key
  set S(n - 1) of the last query. A decode step for token n moves or drops the one token that
  leaves the window and writes token n; the prefix then holds S(n). So it needs no mask: write the
  new token, then attend over the prefix. Dense is D = 1, W = 0, P = 0 (one ring
  slot, every older token "dilated"): max_len slots.

top-k groups: every key at slot = position (max_len slots) plus per-block summaries (Quest: max
  and min, MoBA: mean) of the candidate blocks (see ``ratplus.ops.attention.topk``).

SnapKV groups: nothing until the prefill, which attends densely and then keeps per KV head the
  n_keep = min(T, cache_size + window) prompt keys ``ratplus.ops.attention.snapkv.snapkv_select``
  picks (in position order; ``kept`` holds their positions) in slots [0, n_keep), with room for the
  max_len - T tokens still to come: n_keep + max_len - T slots. Later tokens are appended after the
  kept ones and attend to every filled slot (the kept keys are all older than them).

Slots of a group = ``pattern.kv_slots(max_len - 1)`` (P + W + 1 + floor((max_len - 1) / D); the
"+1" is the slot of the token being decoded), so the bytes are exactly
    sum over groups: B x h_kv x slots x 2 (k and v) x K x itemsize
    + top-k summaries: B x h_kv x floor((max_len - 1 - W - P) / block) x (2 | 1) x K x itemsize
    + state: B x Hkv x 2K x state itemsize (RAT+ only; the attention baseline has no recurrence).
With grouped-query attention only the KV heads are stored (h_kv = h / G): G times fewer bytes; a
head group of the pattern is always whole KV groups (``ModelConfig.resolve_pattern`` refuses others).
``nbytes()`` reports the storage actually allocated.

The cache knows positions and slots only; the attention math is in ``ratplus.ops.attention``. The
model drives it: ``with cache.append(input_ids, pattern, attention_mask) as step`` around one
forward; each layer calls ``hold_padding`` / ``update_state`` / ``attend`` on its ``LayerCache``.
Rows may hold different numbers of tokens (left-padded prompts): positions are per row.

Files: ``slots.py`` (``SlotLayout``, ``CacheStep``: the arithmetic), ``layer_cache.py``
(``LayerCache``: one layer's state and slots, writing and attending), this file (``RATPlusCache``,
``cache_nbytes``, ``compute_dtype``); every name stays importable from ``ratplus.model.cache``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ratplus.config import HeadGroups, ModelConfig, PatternSpec, pattern_to_str
from ratplus.model.layer_cache import LayerCache
from ratplus.model.slots import CacheStep, SlotLayout
from ratplus.runtime import check_fits_memory


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a model with this weight computes its keys and values in, hence the dtype its
    decode cache must hold: autocast's (bf16 / fp16) when autocast is on for the weight's device
    (it casts every floating weight but float64), else the weight's own dtype.

    ``Trainer(bf16=True)`` and TRL leave ``forward`` wrapped in autocast, so a cache sized from the
    float32 weights alone would receive bf16 keys."""
    kind = weight.device.type
    if weight.is_floating_point() and weight.dtype != torch.float64 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def cache_nbytes(config: ModelConfig, pattern: PatternSpec, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes a ``RATPlusCache(config, pattern, batch, max_len, dtype=dtype)`` allocates, from the pattern
    arithmetic alone (module docstring): per layer and head group the ``SlotLayout`` capacity (or
    ``kv_slots(max_len - 1)`` for top-k and SnapKV) in key and value slots for each of its KV heads,
    top-k block summaries, and the float32 (or wider) recurrent state.
    Used to size a cache before building it: the constructor's memory check, admission in the server."""
    item = torch.empty(0, dtype=dtype).element_size()
    state_item = torch.empty(0, dtype=torch.promote_types(dtype, torch.float32)).element_size()
    K, G = config.head_dim, config.kv_group
    total = 0
    for layer in config.resolve_pattern(pattern):
        for p, heads in layer.groups:
            kv_heads = heads // G  # query heads of a group share its KV heads (whole KV groups only)
            # the layout clamps a window or prefix beyond the cache (same key sets, fewer slots)
            slots = p.kv_slots(max_len - 1) if p.is_topk or p.is_snapkv else SlotLayout.for_pattern(p, max_len).capacity
            total += batch * kv_heads * slots * 2 * K * item
            if p.is_topk:
                blocks = max(0, max_len - 1 - p.local_size - p.initial_size) // p.block_size
                total += batch * kv_heads * blocks * (2 if p.scoring == "quest" else 1) * K * item
        if config.apply_re:
            total += batch * config.num_kv_heads * 2 * K * state_item
    return total


class RATPlusCache:
    """Preallocated decoding cache for ``RATPlusLM`` (module docstring has the layout).

    ``RATPlusCache(config, pattern, batch_size, max_len)``: room for ``max_len`` tokens per row
    (prompt + generated), built for one pattern (any pattern spec, resolved per layer and head
    group). Then ``model(input_ids, pattern=..., cache=cache)`` appends tokens: the first call is the
    prefill, later ones decode steps (or several tokens at once). Inference only: run it under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (a cache built inside inference mode can only
    be written inside it, a PyTorch rule for inference tensors).
    """

    def __init__(
        self,
        config: ModelConfig,
        pattern: PatternSpec,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_len > config.max_seq_len:
            raise ValueError(
                f"max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len} (RoPE positions); "
                "build the model with a larger max_seq_len"
            )
        self.config = config
        self.pattern: tuple[HeadGroups, ...] = config.resolve_pattern(pattern)
        self.batch_size, self.max_len = batch_size, max_len
        self.dtype = dtype or torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        need = cache_nbytes(config, self.pattern, batch_size, max_len, self.dtype)
        check_fits_memory(need, f"a decode cache for {batch_size} x {max_len} tokens", self.device)
        self.layers = [
            LayerCache(groups, config, batch_size, max_len, self.device, self.dtype) for groups in self.pattern
        ]
        self.lengths: list[int] = [0] * batch_size  # tokens held per row (padding not counted)
        self.seq_len = 0  # columns appended so far (left padding included), as in input_ids
        self.current_step: CacheStep | None = None
        self._broken = False

    def __repr__(self) -> str:
        return (
            f"RATPlusCache(pattern={pattern_to_str(self.pattern)!r}, batch_size={self.batch_size}, "
            f"max_len={self.max_len}, seq_len={self.seq_len}, nbytes={self.nbytes()})"
        )

    def nbytes(self) -> int:
        """Bytes of storage actually allocated by the cache (slots, summaries, states)."""
        storages = {}
        for layer in self.layers:
            for t in layer.tensors():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def grow(self, max_len: int) -> None:
        """Make room for ``max_len`` tokens per row, keeping everything cached (a new allocation and
        one copy of the held slots; decoding afterwards is exactly as with a cache built that big)."""
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < self.max_len:
            raise ValueError(f"max_len must be an int >= the current max_len={self.max_len}, got {max_len!r}")
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={self.config.max_seq_len}")
        if self.current_step is not None:
            raise ValueError("cannot grow the cache during a forward")
        if max_len == self.max_len:
            return
        for layer in self.layers:
            for g in layer.groups:
                g.grow(max_len)
        self.max_len = max_len

    def reset(self) -> None:
        """Empty the cache (buffers are kept; stale slots are never read)."""
        self.lengths = [0] * self.batch_size
        self.seq_len = 0
        self._broken = False
        for layer in self.layers:
            if layer.state is not None:
                layer.state.zero_()

    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> None:
        """Keep only these rows, in this order (finished rows dropped, beams reordered)."""
        index = torch.as_tensor(batch_indices, dtype=torch.long).flatten()
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.batch_size:
            raise ValueError(f"batch_indices must be non-empty and in [0, {self.batch_size}), got {index.tolist()}")
        rows = index.tolist()
        index = index.to(self.device)
        for layer in self.layers:
            for g in layer.groups:
                g.select(index)
            if layer.state is not None:
                layer.state = layer.state.index_select(0, index)
        self.lengths = [self.lengths[i] for i in rows]
        self.batch_size = len(rows)

    @contextlib.contextmanager
    def append(
        self, input_ids: torch.Tensor, pattern: PatternSpec = None, attention_mask: torch.Tensor | None = None
    ) -> Iterator[CacheStep]:
        """Context of one forward over input_ids (B, T) appended after the cached tokens.

        ``pattern`` None means the cache's own pattern; any other must resolve to it.
        ``attention_mask`` (B, T) or (B, seq_len + T), 1 = token, 0 = padding: only left padding of
        the first call (the prefill) is allowed. Commits the new lengths when the block exits
        normally; after an error inside it the cache refuses further use until ``reset()``."""
        step = self._begin(input_ids, pattern, attention_mask)
        for layer in (self, *self.layers):
            layer.current_step = step
        try:
            yield step
        except BaseException:
            self._broken = True
            raise
        finally:
            for layer in (self, *self.layers):
                layer.current_step = None
        self.lengths = step.ends()
        self.seq_len += step.T

    @property
    def supports_fixed_step(self) -> bool:
        """Whether ``fixed_step`` works: every head group has a slot layout (top-k groups choose
        their blocks with data-dependent shapes and decode through ``append`` only)."""
        return all(g.layout is not None for layer in self.layers for g in layer.groups)

    def begin_fixed_step(self, held: torch.Tensor) -> CacheStep:
        """Start a fixed-shape decode step of one token per row; ``held`` (B,) int64 on the cache's
        device = tokens each row holds (``torch.tensor(cache.lengths)``, advanced by 1 per step by
        the caller). Nothing is checked here (no host reads): the caller checks once per call that
        ``supports_fixed_step``, that the batch matches and that ``max(lengths) + steps <= max_len``.
        ``end_fixed_step()`` commits the token; ``RATPlusLM.decode_step`` does both."""
        step = CacheStep(1, [], [], held.view(-1, 1, 1), None, held=held)
        for layer in (self, *self.layers):
            layer.current_step = step
        return step

    def end_fixed_step(self, ok: bool = True) -> None:
        """Finish a ``begin_fixed_step`` (host bookkeeping only: every row holds one more token)."""
        for layer in (self, *self.layers):
            layer.current_step = None
        if not ok:
            self._broken = True
            return
        self.lengths = [n + 1 for n in self.lengths]
        self.seq_len += 1

    def _begin(self, input_ids, pattern, attention_mask) -> CacheStep:
        if self._broken:
            raise ValueError("the cache was left half-written by an error during a forward; call cache.reset()")
        if self.current_step is not None:
            raise ValueError("the cache is already in use by another forward")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if self.batch_size != B:
            raise ValueError(f"input_ids has batch size {B} but the cache was built for {self.batch_size}")
        if T == 0:
            raise ValueError("input_ids is empty (T = 0)")
        if input_ids.dtype not in (torch.int64, torch.int32) or (
            # the value check reads the ids on the host: skipped while torch.compile traces (a graph break
            # otherwise), as RATPlusLM.check_ids does; out-of-range ids then fail in the embedding lookup
            not torch.compiler.is_compiling()
            and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size)
        ):
            raise ValueError(f"input_ids must be integer token ids in [0, vocab_size={self.config.vocab_size})")
        if pattern is not None:
            resolved = self.config.resolve_pattern(pattern)
            if resolved != self.pattern:
                raise ValueError(
                    f"pattern {pattern_to_str(resolved)!r} differs from the pattern the cache was built for "
                    f"({pattern_to_str(self.pattern)!r}); build a new RATPlusCache for it"
                )
        pads = self._left_padding(attention_mask, B, T)
        ends = [n + T - pad for n, pad in zip(self.lengths, pads)]
        if max(ends) > self.max_len:
            raise ValueError(
                f"{max(ends)} tokens do not fit: the cache holds at most max_len={self.max_len} per row "
                f"({max(self.lengths)} cached + {T} new)"
            )
        device = input_ids.device
        if device.type != self.device.type or (None not in (device.index, self.device.index) and device != self.device):
            raise ValueError(f"input_ids are on {device} but the cache is on {self.device}")
        real = None
        if len(set(self.lengths)) == 1 and not any(pads):
            positions = torch.arange(self.lengths[0], self.lengths[0] + T, device=device)  # (T,)
        else:
            cols = torch.arange(T, device=device)
            start = torch.tensor([n - pad for n, pad in zip(self.lengths, pads)], device=device).view(-1, 1, 1)
            positions = (start + cols).clamp(min=0)  # (B, 1, T); padding columns get position 0 (unused)
            if any(pads):
                real = (cols >= torch.tensor(pads, device=device).view(-1, 1, 1)).unsqueeze(-1)  # (B, 1, T, 1)
        return CacheStep(T, list(self.lengths), pads, positions, real)

    def _left_padding(self, attention_mask, B: int, T: int) -> list[int]:
        if attention_mask is None:
            return [0] * B
        if (
            attention_mask.dim() != 2
            or attention_mask.shape[0] != B
            or attention_mask.shape[1] not in (T, self.seq_len + T)
        ):
            raise ValueError(
                f"attention_mask must be (B, T) = ({B}, {T}) or (B, seq_len + T) = ({B}, {self.seq_len + T}), "
                f"got {tuple(attention_mask.shape)}"
            )
        if any(self.lengths) and torch.compiler.is_compiling():
            # a traced decode step: padding is only ever the prefill's, so the mask's values are not read
            # on the host (a graph break); eager calls check them below
            return [0] * B
        new = attention_mask[:, -T:].to("cpu")
        if not ((new == 0) | (new == 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        new = new.bool()
        if any(self.lengths):
            if not new.all():
                raise ValueError("padding is only allowed on the left of the first call (the prefill)")
            return [0] * B
        pads = (~new).sum(dim=1).tolist()
        for r, pad in enumerate(pads):
            if pad == T:
                raise ValueError(f"row {r} of the prompt is empty (attention_mask is all zeros)")
            if not new[r, pad:].all():
                raise ValueError(f"row {r} of attention_mask is not left padding (zeros, then ones)")
        return pads


__all__ = ["CacheStep", "LayerCache", "RATPlusCache", "SlotLayout", "compute_dtype"]
