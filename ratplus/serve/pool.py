"""The rows of one pattern's pool and the byte arithmetic that keeps it inside ``--kv-memory``.

Shapes: C rows of the pool (capacity), n running rows, S the pool's cache length in tokens,
h_kv KV heads of a head group, K head dim.

A pool is one ``RATPlusCache`` of C rows x S tokens. Row ranges are used through *views*
(``row_view``): a ``RATPlusCache`` whose tensors are slices ``[a, b)`` of the pool's tensors, so
  * a request is prefilled straight into its own pool row (no one-row cache beside the pool,
    no copy when it starts decoding), and
  * the decode step runs over the running rows ``[0, n)`` only (no dummy rows computed).
Rows are kept dense: running rows ``[0, n)``, rows being prefilled ``[n, n + p)``, free rows
after. A leaving row is replaced by the last one of its kind (a row copy; ``RowPool.remove``).

Why slots survive a change of S: the slot of a token depends only on its position and the
pattern's P, W, D (``SlotLayout``), not on the cache length, while every token a row will hold fits
(a cache too short for P + W + 1 clamps W, but then no token has left the window yet and every
token sits at slot = position under both lengths). So ``reshape`` keeps the slots ``[0, min)`` of
the kept rows.

The memory bound (docs/DESIGN.md section 10): what is allocated is exactly the pools' tensors, and
``reshape`` replaces them one tensor at a time (allocate the new one, copy, drop the old one), so
during a reshape at most one tensor is held twice. ``reshape_peak`` gives the bytes at the worst
moment of a reshape from the tensor sizes alone (``tensor_sizes``), and the engine reshapes only
when that peak plus the other pools fits the budget.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ratplus.config import ModelConfig, PatternSpec
from ratplus.model.cache import RATPlusCache, SlotLayout

if TYPE_CHECKING:
    from ratplus.serve.engine import Request

#: Cache lengths are rounded up to this many tokens when the budget has room, so requests of
#: similar length share a pool without a reshape each time one arrives.
LENGTH_QUANTUM = 256


def rows_bucket(n: int, max_rows: int) -> int:
    """n rounded up to a power of two, at most ``max_rows`` (and at least n)."""
    return max(n, min(max_rows, 1 << max(0, n - 1).bit_length()))


def tensor_sizes(config: ModelConfig, pattern: PatternSpec, rows: int, max_len: int, dtype: torch.dtype) -> list[int]:
    """Bytes of each tensor of ``RATPlusCache(config, pattern, rows, max_len, dtype=dtype)``, in the
    order ``reshape`` replaces them: every head group's k and v, layer by layer, then the recurrent
    states. Slot patterns only; sums to ``ratplus.model.cache.cache_nbytes`` (tests/serve check it)."""
    if rows == 0:
        return []
    item = torch.empty(0, dtype=dtype).element_size()
    state_item = torch.empty(0, dtype=torch.promote_types(dtype, torch.float32)).element_size()
    K, G = config.head_dim, config.kv_group
    kv, states = [], []
    for layer in config.resolve_pattern(pattern):
        for p, heads in layer.groups:
            slots = SlotLayout.for_pattern(p, max_len).capacity
            kv += [rows * (heads // G) * slots * K * item] * 2  # k and v
        if config.apply_re:
            states.append(rows * config.num_kv_heads * 2 * K * state_item)
    return kv + states


def reshape_peak(old: Sequence[int], new: Sequence[int]) -> int:
    """Most bytes held at once while ``reshape`` replaces tensors of sizes ``old`` by ``new`` one at a
    time (either list may be empty: allocating from nothing, or freeing everything)."""
    if not old or not new:
        return max(sum(old), sum(new))
    held = sum(old)
    peak = held
    for a, b in zip(old, new, strict=True):
        peak = max(peak, held + b)  # the new tensor is allocated before the old one is dropped
        held += b - a
    return max(peak, held)


def _tensors(cache: RATPlusCache) -> list[tuple[Any, str]]:
    """(owner, attribute) of every tensor, in ``tensor_sizes`` order."""
    out = [(g, name) for layer in cache.layers for g in layer.groups for name in ("k", "v")]
    return out + [(layer, "state") for layer in cache.layers if layer.state is not None]


def reshape(cache: RATPlusCache, rows: int, max_len: int, keep: int) -> None:
    """Give ``cache`` (slot patterns only) ``rows`` rows of ``max_len`` tokens in place, keeping rows
    ``[0, keep)`` and their slots (module docstring); new rows and slots are zeros. One tensor at a
    time, so at most one is held twice (``reshape_peak``). No view of the cache may be alive."""
    keep = min(keep, rows, cache.batch_size)
    layouts = {}
    for owner, name in _tensors(cache):
        old = getattr(owner, name)
        if name == "state":
            new = old.new_zeros(rows, *old.shape[1:])
            new[:keep] = old[:keep]
        else:
            layout = layouts.setdefault(id(owner), SlotLayout.for_pattern(owner.pattern, max_len))
            new = old.new_zeros(rows, old.shape[1], layout.capacity, old.shape[3])
            s = min(old.shape[2], layout.capacity)
            new[:keep, :, :s] = old[:keep, :, :s]
        setattr(owner, name, new)
        del old
    for layer in cache.layers:
        for g in layer.groups:
            g.layout, g.max_len, g.filled = layouts[id(g)], max_len, [0] * rows
    cache.batch_size, cache.max_len = rows, max_len
    cache.lengths, cache.seq_len = [0] * rows, 0


def row_view(cache: RATPlusCache, start: int, stop: int, held: int = 0) -> RATPlusCache:
    """A ``RATPlusCache`` over rows ``[start, stop)`` of ``cache``: its tensors are slices (views) of
    the pool's, so a forward or decode step through it writes the pool's rows. ``held``: tokens each
    row holds already (its host bookkeeping; the decode step takes positions as a tensor)."""
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        lv = copy.copy(layer)
        lv.current_step = None
        lv.groups = []
        for g in layer.groups:
            gv = copy.copy(g)
            gv.k, gv.v = g.k[start:stop], g.v[start:stop]
            gv.summaries = tuple(s[start:stop] for s in g.summaries)
            gv.filled = [0] * (stop - start)
            lv.groups.append(gv)
        lv.state = None if layer.state is None else layer.state[start:stop]
        view.layers.append(lv)
    view.batch_size = stop - start
    view.lengths, view.seq_len = [held] * (stop - start), held
    view.current_step, view._broken = None, False
    return view


def copy_row(cache: RATPlusCache, dst: int, src: int) -> None:
    for owner, name in _tensors(cache):
        t = getattr(owner, name)
        t[dst] = t[src]


def swap_rows(cache: RATPlusCache, a: int, b: int) -> None:
    for owner, name in _tensors(cache):
        t = getattr(owner, name)
        t[[a, b]] = t[[b, a]]  # the right side is a copy of both rows


class RowPool:
    """The rows of one pattern (module docstring): running rows ``[0, n)`` (``rows``, with the
    tokens they hold and the token each feeds to the next step), rows being prefilled after them
    (``prefilling``, in row order), in one cache of ``capacity`` rows x ``max_len`` tokens."""

    def __init__(self, config: ModelConfig, pattern: str, device: torch.device, dtype: torch.dtype):
        self.config, self.pattern, self.device, self.dtype = config, pattern, device, dtype
        self.cache: RATPlusCache | None = None
        self.rows: list[Request] = []
        self.held: list[int] = []
        self.next: list[int] = []
        self.prefilling: list[Request] = []

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return len(self.rows) + len(self.prefilling)

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.batch_size

    @property
    def max_len(self) -> int:
        return 0 if self.cache is None else self.cache.max_len

    def need_len(self) -> int:
        """The longest request in the pool (prompt + max_tokens): the least ``max_len`` it can have."""
        return max((r.length for r in (*self.rows, *self.prefilling)), default=0)

    def nbytes(self) -> int:
        cache = self.cache  # read once: the engine thread may replace it meanwhile
        return 0 if cache is None else sum(getattr(o, n).nbytes for o, n in _tensors(cache))

    def sizes(self, rows: int, max_len: int) -> list[int]:
        return tensor_sizes(self.config, self.pattern, rows, max_len, self.dtype)

    def peak(self, rows: int, max_len: int) -> int:
        """Most bytes this pool holds while reshaping to ``rows`` x ``max_len`` (0 rows: freed)."""
        old = [] if self.cache is None else [getattr(o, n).nbytes for o, n in _tensors(self.cache)]
        return reshape_peak(old, self.sizes(rows, max_len) if rows else [])

    def reshape(self, rows: int, max_len: int) -> None:
        """To ``rows`` x ``max_len`` (0 rows frees the cache); keeps every used row."""
        if rows < self.used or (rows and max_len < self.need_len()):
            raise ValueError(f"a pool of {rows} x {max_len} cannot hold its {self.used} rows")
        if rows == 0:
            self.cache = None
        elif self.cache is None:
            self.cache = RATPlusCache(self.config, self.pattern, rows, max_len, device=self.device, dtype=self.dtype)
        elif (rows, max_len) != (self.capacity, self.max_len):
            reshape(self.cache, rows, max_len, self.used)

    # ---- rows ----------------------------------------------------------------------------------
    def index(self, request: Request) -> int:
        return len(self.rows) + self.prefilling.index(request)

    def add_prefill(self, request: Request) -> None:
        """Give a request the first free row (the caller made room) and clear its recurrent state:
        a fresh prefill starts from zeros, as in a new cache."""
        if self.used >= self.capacity or request.length > self.max_len:
            raise ValueError("no free row: reshape the pool first")
        self.prefilling.append(request)
        row = self.used - 1
        for layer in self.cache.layers:
            if layer.state is not None:
                layer.state[row].zero_()

    def prefill_view(self, request: Request, done: int) -> RATPlusCache:
        """The request's row as a one-row cache holding its first ``done`` prompt tokens."""
        i = self.index(request)
        return row_view(self.cache, i, i + 1, held=done)

    def decode_view(self) -> RATPlusCache:
        return row_view(self.cache, 0, len(self.rows))

    def start_decoding(self, request: Request, token: int) -> None:
        """A prefilled request becomes running row n (swapped there when it is not the first
        prefilling row), feeding ``token`` to the next step."""
        n, j = len(self.rows), self.prefilling.index(request)
        if j:
            swap_rows(self.cache, n, n + j)
            self.prefilling[0], self.prefilling[j] = self.prefilling[j], self.prefilling[0]
        self.prefilling.pop(0)
        self.rows.append(request)
        self.held.append(len(request.prompt))
        self.next.append(token)

    def remove(self, i: int) -> None:
        """Free running row i: the last running row moves into it, then the last prefilling row
        into the hole the running rows left (row copies)."""
        last = len(self.rows) - 1
        if i != last:
            copy_row(self.cache, i, last)
            self.rows[i], self.held[i], self.next[i] = self.rows[last], self.held[last], self.next[last]
        del self.rows[last], self.held[last], self.next[last]
        if self.prefilling:
            copy_row(self.cache, last, last + len(self.prefilling))
            self.prefilling.insert(0, self.prefilling.pop())
        if not self.used:
            self.cache = None

    def drop_prefill(self, request: Request) -> None:
        """Free a prefilling row: the last prefilling row moves into it."""
        j, last = self.prefilling.index(request), len(self.prefilling) - 1
        if j != last:
            copy_row(self.cache, len(self.rows) + j, len(self.rows) + last)
            self.prefilling[j] = self.prefilling[last]
        self.prefilling.pop()
        if not self.used:
            self.cache = None

    def clear(self) -> list[Request]:
        """Forget every row and free the cache; returns the requests that held rows."""
        gone = [*self.rows, *self.prefilling]
        self.rows, self.held, self.next, self.prefilling, self.cache = [], [], [], [], None
        return gone


__all__ = ["LENGTH_QUANTUM", "RowPool", "reshape", "reshape_peak", "row_view", "rows_bucket", "tensor_sizes"]
