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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ratplus.config import SNAPKV_KERNEL, AttentionPattern, HeadGroups, ModelConfig, PatternSpec, pattern_to_str
from ratplus.ops.attention import attention, repeat_kv
from ratplus.ops.attention.masks import mask_mod_values
from ratplus.ops.attention.snapkv import snapkv_select
from ratplus.ops.attention.topk import block_summaries, topk_attention, topk_decode_attention
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


@dataclass(frozen=True)
class SlotLayout:
    """Slot arithmetic of a dense / dilated / local-only head group (module docstring). Pure ints."""

    P: int
    R: int  # ring size W + 1
    D: int | None  # None: no dilated area
    capacity: int

    @classmethod
    def for_pattern(cls, pattern: AttentionPattern, max_len: int) -> SlotLayout:
        if pattern.is_topk:
            raise ValueError("top-k patterns keep every key; they have no slot layout")
        P, W, D = (0, 0, 1) if pattern.is_dense else (pattern.initial_size, pattern.local_size, pattern.dilation_size)
        # A prefix longer than the cache, or a window reaching below P from the last position, changes
        # no key set (those positions are already in it): both are clamped, so P + W + 1 <= max_len + 1.
        P = min(P, max_len)
        W = min(W, max(0, max_len - 1 - P))
        dilated = 0 if D is None else (max_len - 1) // D
        return cls(P, W + 1, D, P + W + 1 + dilated)

    @property
    def first_m(self) -> int:
        """Smallest m with m D - 1 >= P: dilated positions are m D - 1 for m >= first_m."""
        return (self.P + self.D) // self.D

    def is_dilated(self, p: int) -> bool:
        return self.D is not None and p >= self.P and (p + 1) % self.D == 0

    def ring_slot(self, p: int) -> int:
        return self.P + (p - self.P) % self.R

    def dilated_slot(self, p: int) -> int:
        return self.P + self.R + (p + 1) // self.D - self.first_m

    def num_dilated(self, n: int) -> int:
        """Dilated tokens held after n tokens: positions m D - 1 in [P, n - R)."""
        return 0 if self.D is None else max(0, (n - self.R) // self.D - self.first_m + 1)

    def num_valid(self, n: int) -> int:
        """Filled slots after n tokens (always the prefix [0, num_valid))."""
        return min(self.P, n) + min(self.R, max(0, n - self.P)) + self.num_dilated(n)

    def positions(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """(num_valid(n),) int64: the token position held by each filled slot after n tokens."""
        initial = torch.arange(min(self.P, n), device=device)
        in_ring = torch.arange(min(n, max(self.P, n - self.R)), n, device=device)
        ring = torch.empty_like(in_ring)
        ring[(in_ring - self.P) % self.R] = in_ring
        if self.D is None:
            return torch.cat([initial, ring])
        dilated = (self.first_m + torch.arange(self.num_dilated(n), device=device)) * self.D - 1
        return torch.cat([initial, ring, dilated])

    def _dilated(self, p: torch.Tensor) -> torch.Tensor:
        if self.D is None:
            return torch.zeros_like(p, dtype=torch.bool)
        return (p >= self.P) & ((p + 1) % self.D == 0)

    def num_valid_t(self, n: torch.Tensor) -> torch.Tensor:
        """``num_valid`` of an int64 tensor of token counts, elementwise (no host reads)."""
        held = n.clamp(max=self.P) + (n - self.P).clamp(min=0, max=self.R)
        if self.D is None:
            return held
        return held + ((n - self.R).div(self.D, rounding_mode="floor") - self.first_m + 1).clamp(min=0)

    def step_t(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``step`` for an int64 tensor of positions n (B,), elementwise: (move_src, move_dst,
        write_dst). A row that moves nothing gets move_src = move_dst = its write slot, a copy onto
        itself before the write: no branch on the values."""
        write = torch.where(n < self.P, n, self.P + (n - self.P).remainder(self.R))
        if self.D is None:
            return write, write, write
        leaving = n - self.R
        moves = (leaving >= self.P) & ((leaving + 1).remainder(self.D) == 0)
        src = torch.where(moves, self.P + (leaving - self.P).remainder(self.R), write)
        dst = torch.where(
            moves, self.P + self.R + (leaving + 1).div(self.D, rounding_mode="floor") - self.first_m, write
        )
        return src, dst, write

    def plan(self, n: int, N: int, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """Index moves to go from n to N tokens (new tokens are positions n..N-1, column p - n).

        Returns (ring_src, ring_dst): old ring tokens leaving the window into the dilated area, and
        (new_src, new_dst): new tokens (column) into their slot; dropped tokens appear in neither."""
        lo = max(self.P, n - self.R)
        old = torch.arange(lo, max(lo, min(n, N - self.R)), device=device)  # ring tokens that leave
        old = old[self._dilated(old)]
        new = torch.arange(n, N, device=device)
        dst = torch.where(new < self.P, new, -1)
        dst = torch.where((new >= self.P) & (new >= N - self.R), self.ring_slot(new), dst)
        if self.D is not None:
            dst = torch.where((new < N - self.R) & self._dilated(new), self.dilated_slot(new), dst)
            old_dst = self.dilated_slot(old)
        else:
            old_dst = old  # empty
        keep = dst >= 0
        return self.ring_slot(old), old_dst, (new - n)[keep], dst[keep]

    def step(self, n: int) -> tuple[int | None, int | None, int]:
        """The same plan for one new token (position n), in ints: (move_src, move_dst, write_dst)."""
        leaving = n - self.R  # the token that leaves the window when token n arrives
        move = (self.ring_slot(leaving), self.dilated_slot(leaving)) if self.is_dilated(leaving) else (None, None)
        return (*move, n if n < self.P else self.ring_slot(n))


@dataclass
class CacheStep:
    """Bookkeeping of one ``append``: where the T new columns of each row go."""

    T: int
    starts: list[int]  # tokens per row before this call
    pads: list[int]  # leading padding columns per row (prefill of left-padded prompts only)
    positions: torch.Tensor  # RoPE positions: (T,) when all rows agree, else (B, 1, T)
    real: torch.Tensor | None  # (B, 1, T, 1) bool, False on padding columns; None without padding
    _masks: dict = field(default_factory=dict)  # per-step memo of decode key masks
    held: torch.Tensor | None = None  # (B,) int64 tokens per row before a fixed-shape step (else None)

    @property
    def fresh(self) -> bool:
        return all(n == 0 for n in self.starts)

    @property
    def uniform(self) -> bool:
        """Every row at the same position with no padding: whole-batch slices, no masks."""
        return len(set(self.starts)) == 1 and not any(self.pads)

    def ends(self) -> list[int]:
        return [n + self.T - pad for n, pad in zip(self.starts, self.pads)]


def _grown(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (B, h, S, K) copied into zeros (B, h, n, K), n >= S (zeros: see ``_GroupCache.__init__``)."""
    out = t.new_zeros(*t.shape[:2], n, t.shape[-1])
    out[:, :, : t.shape[2]] = t
    return out


class _GroupCache:
    """Slots of one head group of one layer: k, v (B, h_kv, S, K) and top-k summaries (B, h_kv, N, K).

    ``heads``: its query heads; ``kv_heads``: the KV heads they share (the same without GQA)."""

    def __init__(self, pattern, heads, kv_heads, batch_size, max_len, head_dim, device, dtype):
        self.pattern: AttentionPattern = pattern
        self.heads: slice = heads
        self.kv_heads: slice = kv_heads
        self.group = (heads.stop - heads.start) // (kv_heads.stop - kv_heads.start)  # G
        h = kv_heads.stop - kv_heads.start
        self.max_len, self.head_dim = max_len, head_dim
        self.filled: list[int] = [0] * batch_size  # SnapKV: slots filled per row
        self.kept: list[torch.Tensor] | None = None  # SnapKV: (h_kv, n_keep) positions kept per row
        if pattern.is_snapkv:
            self.layout, self.summaries = None, ()
            self.k = torch.zeros(batch_size, h, 0, head_dim, device=device, dtype=dtype)  # sized by the prefill
            self.v = torch.zeros_like(self.k)
            return
        if pattern.is_topk:
            self.layout = None
            slots = max_len
            n_blocks = max(0, max_len - 1 - pattern.local_size - pattern.initial_size) // pattern.block_size
            n_summaries = 2 if pattern.scoring == "quest" else 1
            self.summaries = tuple(
                torch.zeros(batch_size, h, n_blocks, head_dim, device=device, dtype=dtype) for _ in range(n_summaries)
            )
        else:
            self.layout = SlotLayout.for_pattern(pattern, max_len)
            slots = self.layout.capacity
            self.summaries = ()
        # zeros, not empty: rows shorter than others are masked, and 0 * garbage NaN would leak
        self.k = torch.zeros(batch_size, h, slots, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, *self.summaries]

    def grow(self, max_len: int) -> None:
        """Reallocate for ``max_len`` tokens, keeping every slot and summary. Slots only ever get
        appended at the end (the dilated area, or positions for top-k), so contents keep their index."""
        if self.pattern.is_snapkv:  # after the prefill: room for max_len - old max_len more tokens
            if self.k.shape[2]:
                extra = max_len - self.max_len
                self.k, self.v = _grown(self.k, self.k.shape[2] + extra), _grown(self.v, self.v.shape[2] + extra)
            self.max_len = max_len
            return
        if self.pattern.is_topk:
            old_slots, old_blocks = self.k.shape[2], self.summaries[0].shape[-2]
            self.k, self.v = _grown(self.k, max_len), _grown(self.v, max_len)
            P, W, Bs = self.pattern.initial_size, self.pattern.local_size, self.pattern.block_size
            n_blocks = max(0, max_len - 1 - W - P) // Bs
            self.summaries = tuple(_grown(s, n_blocks) for s in self.summaries)
            # a small cache never summarises its last complete blocks (always inside the window of its
            # last query): summarise them now. Blocks not complete yet are summarised again when they are.
            b1 = min(n_blocks, max(0, old_slots - P) // Bs)
            if b1 > old_blocks:
                keys = self.k[:, :, P + old_blocks * Bs : P + b1 * Bs]
                for dst, src in zip(self.summaries, block_summaries(keys, self.pattern)):
                    dst[:, :, old_blocks:b1] = src
            return
        self.layout = SlotLayout.for_pattern(self.pattern, max_len)
        self.k, self.v = _grown(self.k, self.layout.capacity), _grown(self.v, self.layout.capacity)

    def select(self, index: torch.Tensor) -> None:
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        self.summaries = tuple(s.index_select(0, index) for s in self.summaries)
        rows = index.tolist()
        self.filled = [self.filled[i] for i in rows]
        if self.kept is not None:
            self.kept = [self.kept[i] for i in rows]

    def num_valid(self, n: int) -> int:
        return n if self.layout is None else self.layout.num_valid(n)

    def rows(self, r: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Views of row r (batch dim kept)."""
        return self.k[r : r + 1], self.v[r : r + 1], tuple(s[r : r + 1] for s in self.summaries)

    # ---- writing ----------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> None:
        """Store the new keys/values k, v (B, h, T, K) of this step."""
        if step.uniform:
            self._write(self.k, self.v, self.summaries, k, v, step.starts[0])
            return
        for r, (n, pad) in enumerate(zip(step.starts, step.pads)):
            self._write(*self.rows(r), k[r : r + 1, :, pad:], v[r : r + 1, :, pad:], n)

    def _write(self, kb, vb, summaries, k, v, n: int) -> None:
        """kb, vb (b, h, S, K) buffers (views) holding n tokens; k, v (b, h, T, K) at positions n.."""
        T = k.shape[-2]
        if self.layout is None:  # top-k: slot = position, then summaries of newly complete blocks
            kb[:, :, n : n + T] = k
            vb[:, :, n : n + T] = v
            P, Bs = self.pattern.initial_size, self.pattern.block_size
            b0 = max(0, n - P) // Bs
            b1 = min(max(0, n + T - P) // Bs, summaries[0].shape[-2] if summaries else 0)
            if b1 > b0:
                for dst, src in zip(summaries, block_summaries(kb[:, :, P + b0 * Bs : P + b1 * Bs], self.pattern)):
                    dst[:, :, b0:b1] = src
            return
        if T == 1:  # decode: a couple of slot copies, no index tensors
            move_src, move_dst, dst = self.layout.step(n)
            if move_src is not None:
                kb[:, :, move_dst] = kb[:, :, move_src]
                vb[:, :, move_dst] = vb[:, :, move_src]
            kb[:, :, dst] = k[:, :, 0]
            vb[:, :, dst] = v[:, :, 0]
            return
        ring_src, ring_dst, new_src, new_dst = self.layout.plan(n, n + T, device=k.device)
        # leaving ring tokens first: the new tokens may overwrite their ring slots
        kb.index_copy_(2, ring_dst, kb.index_select(2, ring_src))
        vb.index_copy_(2, ring_dst, vb.index_select(2, ring_src))
        kb.index_copy_(2, new_dst, k.index_select(2, new_src))
        vb.index_copy_(2, new_dst, v.index_select(2, new_src))

    # ---- attending --------------------------------------------------------------------------------
    def attend(self, q, k, v, step: CacheStep, backend: str) -> torch.Tensor:
        """q (B, h, T, K), k, v (B, h_kv, T, K) of the new tokens (after RoPE). Returns the attention
        output (B, h, T, K) over the cached tokens plus the new ones, and stores the new ones."""
        if self.pattern.is_snapkv:
            return self._snapkv_attend(q, k, v, step, backend)
        if step.held is not None:
            return self._decode_fixed(q, k, v, step)
        if step.fresh:
            out = self._prefill(q, k, v, step, backend)
            self.write(k, v, step)
            return out
        if step.T == 1:
            self.write(k, v, step)
            return self._decode(q, step)
        out = self._extend(q, k, v, step)
        self.write(k, v, step)
        return out

    # ---- SnapKV -------------------------------------------------------------------------------------
    def _snapkv_attend(self, q, k, v, step: CacheStep, backend: str) -> torch.Tensor:
        if step.fresh:
            out = self._prefill(q, k, v, step, backend)  # dense over the prompt
            self._snapkv_compress(q, k, v, step)
            return out
        G, T = self.group, step.T
        rows = [(0, len(self.filled))] if len(set(self.filled)) == 1 else [(r, r + 1) for r in range(len(self.filled))]
        outs = []
        for r0, r1 in rows:
            S = self.filled[r0]
            keys = torch.cat([self.k[r0:r1, :, :S], k[r0:r1]], dim=2)  # (b, h_kv, S + T, K)
            values = torch.cat([self.v[r0:r1, :, :S], v[r0:r1]], dim=2)
            # every kept key is older than the new tokens; the new ones are causal among themselves
            mask = torch.ones(T, S + T, dtype=torch.bool, device=q.device).tril(S)
            outs.append(F.scaled_dot_product_attention(q[r0:r1], keys, values, attn_mask=mask, enable_gqa=G > 1))
            self.k[r0:r1, :, S : S + T] = k[r0:r1]
            self.v[r0:r1, :, S : S + T] = v[r0:r1]
            for r in range(r0, r1):
                self.filled[r] += T
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _snapkv_compress(self, q, k, v, step: CacheStep) -> None:
        """After the prefill: keep the selected prompt keys of each row, with room for the rest."""
        p = self.pattern
        kept = []
        for r, pad in enumerate(step.pads):
            qr, kr = q[r : r + 1, :, pad:], k[r : r + 1, :, pad:]
            kept.append(snapkv_select(qr[:, :, -p.window :], kr, p.cache_size, SNAPKV_KERNEL)[0])  # (h_kv, n_keep)
        slots = max(idx.shape[-1] + self.max_len - (step.T - pad) for idx, pad in zip(kept, step.pads))
        B, h = k.shape[:2]
        self.k = torch.zeros(B, h, slots, self.head_dim, device=k.device, dtype=k.dtype)
        self.v = torch.zeros_like(self.k)
        for r, (idx, pad) in enumerate(zip(kept, step.pads)):
            n = idx.shape[-1]
            gather = (pad + idx).unsqueeze(-1).expand(h, n, self.head_dim)
            self.k[r, :, :n] = k[r].gather(1, gather)
            self.v[r, :, :n] = v[r].gather(1, gather)
            self.filled[r] = n
        self.kept = kept

    def _prefill(self, q, k, v, step, backend) -> torch.Tensor:
        """Empty cache: the new tokens are the whole sequence, so the full-sequence kernels apply."""
        k, v = repeat_kv(k, self.group), repeat_kv(v, self.group)
        if not any(step.pads):
            return attention(q, k, v, self.pattern, backend=backend)
        out = torch.zeros_like(q)  # padding columns attend to nothing
        for r, pad in enumerate(step.pads):
            out[r : r + 1, :, pad:] = attention(
                q[r : r + 1, :, pad:], k[r : r + 1, :, pad:], v[r : r + 1, :, pad:], self.pattern, backend=backend
            )
        return out

    def _decode_fixed(self, q, k, v, step: CacheStep) -> torch.Tensor:
        """Fixed-shape decode step (reference: ``write`` + ``_decode``): one token per row at
        positions ``held`` (B,) int64, written with index tensors, attention over every slot with a
        (B, 1, 1, S) mask of the filled prefix. Shapes never depend on the values."""
        key = (self.layout, self.k.shape[2])
        if key not in step._masks:  # indices and mask shared by every layer with this layout
            held = step.held
            rows = torch.arange(q.shape[0], device=q.device)
            mask = torch.arange(key[1], device=q.device) < self.layout.num_valid_t(held + 1).view(-1, 1, 1, 1)
            step._masks[key] = (rows, *self.layout.step_t(held), mask)  # mask (B, 1, 1, S)
        rows, src, dst, write, mask = step._masks[key]
        for buf, new in ((self.k, k), (self.v, v)):
            buf[rows, :, dst] = buf[rows, :, src]  # leaving ring token -> dilated area (or a no-op)
            buf[rows, :, write] = new[:, :, 0]
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask, enable_gqa=self.group > 1)

    def _decode(self, q, step) -> torch.Tensor:
        """One new token per row, already written: attend over each row's filled prefix."""
        ends = step.ends()
        if self.layout is None:
            if len(set(ends)) == 1:
                kb, vb, summaries = self.k, self.v, self.summaries
                return topk_decode_attention(q, *self._repeat(kb, vb, summaries), ends[0] - 1, self.pattern)
            outs = []
            for r, N in enumerate(ends):
                kb, vb, summaries = self.rows(r)
                outs.append(topk_decode_attention(q[r : r + 1], *self._repeat(kb, vb, summaries), N - 1, self.pattern))
            return torch.cat(outs)
        valid = [self.layout.num_valid(N) for N in ends]
        S = max(valid)
        mask = None
        if len(set(valid)) > 1:
            key = (self.layout, S)
            if key not in step._masks:  # shared by every layer with this layout
                lengths = torch.tensor(valid, device=q.device).view(-1, 1, 1, 1)
                step._masks[key] = torch.arange(S, device=q.device) < lengths  # (B, 1, 1, S)
            mask = step._masks[key]
        return F.scaled_dot_product_attention(
            q, self.k[:, :, :S], self.v[:, :, :S], attn_mask=mask, enable_gqa=self.group > 1
        )

    def _repeat(self, kb, vb, summaries):
        """Top-k keys, values and block summaries for every query head (repeated KV heads)."""
        G = self.group
        return repeat_kv(kb, G), repeat_kv(vb, G), tuple(repeat_kv(s, G) for s in summaries)

    def _extend(self, q, k, v, step) -> torch.Tensor:
        """Several new tokens after cached ones: cached slots + new keys, masked by their positions."""
        if step.uniform:
            return self._extend_rows(self.k, self.v, q, k, v, step.starts[0])
        outs = []
        for r, n in enumerate(step.starts):
            kb, vb, _ = self.rows(r)
            outs.append(self._extend_rows(kb, vb, q[r : r + 1], k[r : r + 1], v[r : r + 1], n))
        return torch.cat(outs)

    def _extend_rows(self, kb, vb, q, k, v, n) -> torch.Tensor:
        T = q.shape[-2]
        G = self.group
        if self.layout is None:  # top-k keeps every key in order: plain keys 0..n+T-1
            keys, values = torch.cat([kb[:, :, :n], k], dim=2), torch.cat([vb[:, :, :n], v], dim=2)
            return topk_attention(q, repeat_kv(keys, G), repeat_kv(values, G), self.pattern, q_offset=n)
        S = self.layout.num_valid(n)
        keys, values = torch.cat([kb[:, :, :S], k], dim=2), torch.cat([vb[:, :, :S], v], dim=2)
        q_pos = torch.arange(n, n + T, device=q.device)
        k_pos = torch.cat([self.layout.positions(n, device=q.device), q_pos])
        mask = mask_mod_values(self.pattern, q_pos.unsqueeze(1), k_pos.unsqueeze(0))  # (T, S + T)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=G > 1)


class LayerCache:
    """One layer: the recurrent state and the head groups' slots. Used by ``RATPlusLayer``."""

    def __init__(self, groups: HeadGroups, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        B, K = batch_size, config.head_dim
        # set by RATPlusCache.append for the duration of a forward (no back-reference to the owner:
        # a reference cycle would keep a dropped cache's memory alive until the next gc pass)
        self.current_step: CacheStep | None = None
        self.groups: list[_GroupCache] = []
        h0, G = 0, config.kv_group  # head groups are whole KV groups (ModelConfig.resolve_pattern)
        for pattern, n in groups.groups:
            heads, kv_heads = slice(h0, h0 + n), slice(h0 // G, (h0 + n) // G)
            self.groups.append(_GroupCache(pattern, heads, kv_heads, B, max_len, K, device, dtype))
            h0 += n
        # [k~, v~] of the last token, before RoPE; float32 even for a bf16 cache (float64 stays float64)
        state_dtype = torch.promote_types(dtype, torch.float32)
        self.state = (
            torch.zeros(B, config.num_kv_heads, 2 * K, device=device, dtype=state_dtype) if config.apply_re else None
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for g in self.groups for t in g.tensors()] + ([self.state] if self.state is not None else [])

    def hold_padding(
        self, g: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g, k, v (B, Hkv, T, K): on left-padding columns set the gate to 1 and k = v = 0, so the
        recurrence carries its (zero) state through the padding untouched."""
        real = self.current_step.real
        if real is None:
            return g, k, v
        return g.masked_fill(~real, 1.0), k.masked_fill(~real, 0.0), v.masked_fill(~real, 0.0)

    def update_state(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep [k~, v~] of the last column, k, v (B, Hkv, T, K) before RoPE (the last column is real
        in every row: padding is on the left)."""
        K = k.shape[-1]
        self.state[..., :K] = k[:, :, -1]
        self.state[..., K:] = v[:, :, -1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """q (B, H, T, K), k, v (B, Hkv, T, K) of the new tokens after RoPE -> attention output (B, H, T, K)."""
        held = self.groups[0].k.dtype
        if q.dtype != held or k.dtype != held or v.dtype != held:
            raise ValueError(
                f"the cache holds {held} but the layer computes in {q.dtype} (keys {k.dtype}); build "
                "RATPlusCache with dtype=compute_dtype(weight) (autocast's dtype when autocast is on)"
            )
        step = self.current_step
        outs = [g.attend(q[:, g.heads], k[:, g.kv_heads], v[:, g.kv_heads], step, backend) for g in self.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


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
        if (
            input_ids.dtype not in (torch.int64, torch.int32)
            or int(input_ids.min()) < 0
            or int(input_ids.max()) >= self.config.vocab_size
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
