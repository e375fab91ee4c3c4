"""Per-layer decode cache of a RAT+ model: the recurrent state and each head group's key/value slots.

Shapes: B batch, H heads (h: heads of one head group), T new tokens, S cache slots, K head dim;
Hkv KV heads (h_kv of a group), G = H / Hkv query heads per KV head (grouped-query attention).

``LayerCache`` is what a ``RATPlusLayer`` talks to during a cached forward (``hold_padding``,
``update_state``, ``attend``); ``_GroupCache`` holds one head group's slots (slot layout, top-k
summaries or SnapKV's kept keys) and writes and attends over them. The layout itself is in
``ratplus.model.cache``'s docstring and the arithmetic in ``ratplus.model.slots``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratplus.config import SNAPKV_KERNEL, AttentionPattern, HeadGroups, ModelConfig
from ratplus.model.slots import CacheStep, SlotLayout
from ratplus.ops.attention import attention, repeat_kv
from ratplus.ops.attention.masks import mask_mod_values
from ratplus.ops.attention.snapkv import snapkv_select
from ratplus.ops.attention.topk import block_summaries, topk_attention, topk_decode_attention


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


__all__ = ["LayerCache"]
