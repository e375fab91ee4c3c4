"""Slot arithmetic of the RAT+ decode cache (docs/DESIGN.md section 4): pure ints and index tensors.

Shapes: B batch, T new tokens. D/W/P are pattern sizes; R = W + 1 is the ring size.

``SlotLayout`` says where token p of a dense / dilated / local-only head group lives (``[ P initial |
R ring | dilated ]``, the layout in ``ratplus.model.cache``'s docstring) and which slot moves when a
token arrives; ``CacheStep`` is the bookkeeping of one forward through the cache (where each row's
new columns go). No tensors are held here: ``ratplus.model.layer_cache`` holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ratplus.config import AttentionPattern


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


__all__ = ["CacheStep", "SlotLayout"]
