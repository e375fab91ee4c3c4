"""Continuous batching over generation's fixed-shape decode step (``RATPlusLM.decode_step``).

Shapes: n running rows of a pattern's pool, V vocab.

One engine thread owns the model and every cache. Each iteration it
  1. admits queued requests in arrival order while fewer than ``max_batch`` run and the request's
     pool has, or can be given within ``--kv-memory``, a free row long enough (``_make_room``: the
     allocated bytes, reshapes included, never pass the budget; docs/DESIGN.md section 10);
  2. runs one prefill chunk (at most ``prefill_chunk`` tokens) of the oldest admitted request,
     straight into its pool row, so a long prompt never stalls the running rows for more than one
     chunk (a prompt that starts with a stored prefix restores it first: ``ratplus.serve.prefix``);
  3. runs one decode step per pattern pool that has running rows (over those rows only), samples
     each row with its own settings, hands every token to its request, and retires finished or
     cancelled rows.
Requests join and leave between steps; the HTTP side only queues requests and sets ``cancelled``.

Why a pool of rows per pattern (``ratplus.serve.pool``), not one cache per request: the decode step
is one batched call over a ``RATPlusCache`` whose tensors are (B, h_kv, S, K). Each loaded pattern
keeps one cache; a request's row is seen as a one-row cache while it is prefilled (the chunks run
as ``ratplus.generate``'s prefill of that request alone), and the running rows ``[0, n)`` as an
n-row cache for the decode step. The slot of a token depends only on its position and the
pattern's P, W, D (``SlotLayout``), so rows keep their slots when the pool is reshaped. Every row
decodes at its own position (``held``), so each row's tokens are those it would get alone (greedy;
tests/serve compare with ``ratplus.generate``).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ratplus.generation import SamplingParams, sample_next, sample_row, token_logprobs
from ratplus.model.cache import RATPlusCache
from ratplus.model.rat import RATPlusLM
from ratplus.serve.admission import KVBudget, kv_bytes
from ratplus.serve.pool import LENGTH_QUANTUM, RowPool, rows_bucket
from ratplus.serve.prefix import PrefixCache

logger = logging.getLogger("ratplus")

#: An event for a request's sink: ("token", id), ("end", finish_reason) or ("error", message).
Event = tuple[str, Any]

_ids = itertools.count(1)


class QueueFull(Exception):
    """The waiting queue is at ``max_queue`` (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is draining or stopped (HTTP 503)."""


@dataclass
class Request:
    """One generation: token ids in, events out through ``sink`` (called from the engine thread).

    ``sink`` gets every new token, then exactly one terminal event (``end`` with the finish
    reason ``stop`` / ``length`` / ``cancelled``, or ``error``)."""

    prompt: list[int]
    max_tokens: int
    pattern: str
    sink: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    kv_bytes: int = 0
    # penalties, logit_bias, top_k, min_p, min_tokens (ratplus.generation.sample_row); None: the
    # temperature / top_p above only
    sampling: SamplingParams | None = None
    logprobs: int | None = None  # per generated token: its logprob and the top-N (None: not asked)
    prompt_logprobs: int | None = None  # per prompt token after the first (echo), from the prefill
    # (logprob, [(id, logprob), ...]) per sampled token, appended before its event is sent
    token_logprobs: list = field(default_factory=list)
    prompt_logprob_rows: list = field(default_factory=list)  # the same per prompt token 1..T-1
    # response_format: masks each row's logits to what the grammar allows and is told each chosen
    # token (ratplus.serve.constrain.Constraint); None: no constraint
    constraint: Any = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_end: float | None = None
    generator: torch.Generator | None = None

    @property
    def length(self) -> int:
        """Tokens the request's cache must hold: prompt + max_tokens."""
        return len(self.prompt) + self.max_tokens


@dataclass
class _Prefill:
    request: Request
    done: int = 0  # prompt tokens already in its pool row
    reused: int = 0  # of which restored from a prefix snapshot


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps freed cache memory otherwise, so the
    resident size would stay at its peak after a burst of requests). A no-op off glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018  (raises AttributeError off glibc)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


class Engine:
    """The batching loop in its own thread (module docstring). Thread-safe API: ``submit``,
    ``cancel``, ``snapshot``, ``drain``, ``stop``."""

    def __init__(
        self,
        model: RATPlusLM,
        patterns: list[str],
        kv_memory: int,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        compile: bool = False,
        prefix_memory: int = 0,
    ):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value!r}")
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = model.embedding.wte.weight.dtype
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.budget = KVBudget(kv_memory)
        for p in patterns:
            if any(g.is_topk or g.is_snapkv for layer in model.config.resolve_pattern(p) for g, _ in layer.groups):
                raise ValueError(f"--patterns: {p} has no fixed-shape decode step (top-k, SnapKV); serve slot patterns")
        for p in patterns:  # a budget no request fits would queue every request forever
            least = kv_bytes(model.config, p, 2, self.dtype)
            if least > kv_memory:
                raise ValueError(
                    f"--kv-memory {kv_memory:,} B is smaller than the smallest request under {p} (1 prompt "
                    f"token + 1 new token needs {least:,} B of KV cache); raise --kv-memory"
                )
        self.pools = {p: RowPool(model.config, p, self.device, self.dtype) for p in patterns}
        self.prefix = PrefixCache(prefix_memory, prefill_chunk)
        self.peak_allocated = 0  # most KV bytes held at once, reshapes' transients included
        # dynamic=None: the first shape compiles static, a second one (rows, slots) compiles dynamic once
        self._compiled = torch.compile(model.decode_step_core, dynamic=None) if compile else None
        self.warm_up_seconds = 0.0
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefills: list[_Prefill] = []
        self._cv = threading.Condition()
        self._state = "new"  # new -> running -> draining -> stopped
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        # figures for /metrics
        self.tokens_total = 0
        self.prompt_tokens_total = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.ttft_sum, self.ttft_count = 0.0, 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self.peak_running = 0

    # ---- the API the HTTP side calls (any thread) ------------------------------------------------
    def request_bytes(self, pattern: str, length: int) -> int:
        return kv_bytes(self.model.config, pattern, length, self.dtype)

    def submit(self, request: Request) -> None:
        """Queue a request; raises ``QueueFull`` or ``ShuttingDown``. Its sink gets the events."""
        if request.pattern not in self.pools:
            raise ValueError(f"pattern {request.pattern!r} is not loaded; loaded: {', '.join(self.pools)}")
        if request.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            if request.seed is None:
                request.generator.seed()
            else:
                request.generator.manual_seed(request.seed)
        with self._cv:
            if self._state not in ("new", "running"):
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._cv.notify()  # the engine thread admits it (admission may reshape a pool it owns)

    def cancel(self, request: Request) -> None:
        """The client is gone: its row and memory are freed before the next step."""
        request.cancelled = True
        with self._cv:
            self._cv.notify()

    def start(self) -> None:
        with self._cv:
            self._state = "running"
        self._thread = threading.Thread(target=self._run, name="ratplus-engine", daemon=True)
        self._thread.start()

    def drain(self, grace: float) -> None:
        """Stop accepting; queued requests end with an error now, running ones may finish within
        ``grace`` seconds, then end with an error. Called again while draining, it can only bring
        the deadline closer (``stop``, a second signal)."""
        with self._cv:
            if self._state in ("new", "running"):
                self._state = "draining"
                self._deadline = time.monotonic() + grace
                while self._waiting:
                    self._fail(self._waiting.popleft(), "the server is shutting down")
            elif self._state == "draining":
                self._deadline = min(self._deadline, time.monotonic() + grace)
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        self.drain(0.0)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def state(self) -> str:
        return self._state

    def snapshot(self) -> dict[str, Any]:
        """The figures /metrics and /health report."""
        with self._cv:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
            rate = sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0
            return {
                "state": self._state,
                "running": len(self._prefills) + sum(len(p.rows) for p in self.pools.values()),
                "running_per_pattern": {k: len(p.rows) for k, p in self.pools.items()},
                "queued": len(self._waiting),
                "kv_bytes_in_use": self.budget.in_use,
                "kv_bytes_budget": self.budget.budget,
                "kv_bytes_allocated": self.allocated(),
                "kv_bytes_allocated_peak": self.peak_allocated,
                "prefix_cache": self.prefix.stats(),
                "tokens_total": self.tokens_total,
                "prompt_tokens_total": self.prompt_tokens_total,
                "tokens_per_second": rate,
                "ttft_seconds_sum": self.ttft_sum,
                "ttft_seconds_count": self.ttft_count,
                "finished": dict(self.finished),
                "peak_running": self.peak_running,
            }

    def warm_up(self) -> float:
        """Run the decode step once per pattern at 1 and 2 rows (compiling it, when compiled: the
        second shape makes torch compile the batch dimension dynamic). Returns the seconds it took."""
        t0 = time.perf_counter()
        for pattern in self.pools:
            for rows in (1, 2):
                cache = RATPlusCache(self.model.config, pattern, rows, LENGTH_QUANTUM, self.device, self.dtype)
                tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
                self.decode_step(tokens, cache, torch.zeros(rows, dtype=torch.long, device=self.device))
        self.warm_up_seconds = time.perf_counter() - t0
        return self.warm_up_seconds

    def allocated(self) -> int:
        """KV bytes the pools hold now (every cache the engine has: requests are prefilled in place)."""
        return sum(p.nbytes() for p in self.pools.values())

    # ---- the engine thread -------------------------------------------------------------------------
    def decode_step(self, tokens: torch.Tensor, cache: RATPlusCache, held: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(tokens, cache, held, core=self._compiled)

    def _run(self) -> None:
        was_busy = False
        with torch.inference_mode():
            while True:
                with self._cv:
                    if self._state == "draining" and time.monotonic() >= self._deadline:
                        self._abort_all("the server is shutting down")
                    self._drop_cancelled()
                    self._admit()
                    busy = bool(self._prefills) or any(p.rows for p in self.pools.values())
                    if not busy:
                        if self._state != "running":
                            self._state = "stopped"
                            return
                        if was_busy:
                            _trim_heap()
                        was_busy = False
                        self._cv.wait(0.5)
                        continue
                    was_busy = True
                try:
                    self._iteration()
                except Exception as e:  # a bug or an out-of-memory: end the running requests, keep serving
                    logger.exception("ratplus serve: the engine step failed; ending the running requests")
                    with self._cv:
                        self._abort_all(f"internal error in the engine step: {type(e).__name__}")

    def _iteration(self) -> None:
        if self._prefills:
            self._prefill_chunk(self._prefills[0])
        for pool in self.pools.values():
            if pool.rows:
                self._decode(pool)

    def _admit(self) -> None:
        """Admit waiting requests in arrival order while a row is free and their pool can take them
        within the budget (``_make_room``); the first that cannot waits, and so do the ones behind
        it (a large request is not overtaken forever). Caller holds the lock."""
        running = len(self._prefills) + sum(len(p.rows) for p in self.pools.values())
        while self._waiting and running < self.max_batch:
            r = self._waiting[0]
            pool = self.pools[r.pattern]
            if not self._make_room(pool, r):
                break
            self._waiting.popleft()
            self.budget.reserve(r.kv_bytes)
            pool.add_prefill(r)
            self._prefills.append(_Prefill(r))
            running += 1
        self.peak_running = max(self.peak_running, running)

    def _fits(self, others: int, pool: RowPool, rows: int, length: int) -> bool:
        """Whether reshaping ``pool`` to rows x length keeps every moment within the budget, the
        other pools holding ``others`` bytes."""
        return others + pool.peak(rows, length) <= self.budget.budget

    def _reshape(self, pool: RowPool, rows: int, length: int) -> None:
        others = self.allocated() - pool.nbytes()
        self.peak_allocated = max(self.peak_allocated, others + pool.peak(rows, length))
        pool.reshape(rows, length)

    def _make_room(self, pool: RowPool, r: Request) -> bool:
        """Make a free row of at least ``r.length`` tokens in ``pool`` without the allocated bytes
        ever passing ``--kv-memory`` (docs/DESIGN.md section 10). In order of preference:
          1. a free row is there already (nothing allocated);
          2. reshape the pool, rounding rows up to a power of two (room for the same-pattern requests
             waiting behind) and the length up to ``LENGTH_QUANTUM``, as far as the budget allows;
          3. shrink the other pools to their used rows and length first, then give this pool exactly
             what it needs.
        False: wait for rows to finish."""
        used, need = pool.used + 1, max(pool.need_len(), r.length)
        if pool.capacity >= used and pool.max_len >= r.length:
            return True
        limit = self.model.config.max_seq_len
        others = self.allocated() - pool.nbytes()
        waiting = sum(1 for w in self._waiting if w.pattern == r.pattern)
        hi = rows_bucket(min(self.max_batch, pool.used + waiting), self.max_batch)
        quantized = min(limit, -(-need // LENGTH_QUANTUM) * LENGTH_QUANTUM)
        for length in dict.fromkeys((max(quantized, pool.max_len), quantized, need)):
            if not self._fits(others, pool, used, length):
                continue
            lo, top = used, max(used, hi)
            while lo < top:  # the most rows in [used, hi] that fit (the peak grows with the rows)
                mid = (lo + top + 1) // 2
                lo, top = (mid, top) if self._fits(others, pool, mid, length) else (lo, mid - 1)
            self._reshape(pool, lo, length)
            return True
        # shrink the other pools to what their rows need, where that itself stays within the budget
        plan, total = [], self.allocated()
        for q in self.pools.values():
            if q is pool or q.cache is None or (q.capacity, q.max_len) == (q.used, q.need_len()):
                continue
            if total - q.nbytes() + q.peak(q.used, q.need_len()) <= self.budget.budget:
                plan.append(q)
                total += sum(q.sizes(q.used, q.need_len())) - q.nbytes()
        if total - pool.nbytes() + pool.peak(used, need) > self.budget.budget:
            return False
        for q in plan:
            self._reshape(q, q.used, q.need_len())
        self._reshape(pool, used, need)
        return True

    def _shrink(self, pool: RowPool) -> None:
        """After rows left: a pool a quarter used (or twice as long as its rows need) gives memory
        back, when the reshape's own peak fits. Caller holds the lock."""
        if pool.cache is None:
            return
        rows = rows_bucket(pool.used, self.max_batch)
        need = min(self.model.config.max_seq_len, -(-pool.need_len() // LENGTH_QUANTUM) * LENGTH_QUANTUM)
        if 4 * pool.used <= pool.capacity or 2 * need <= pool.max_len:
            rows, need = min(rows, pool.capacity), min(need, pool.max_len)
            if self._fits(self.allocated() - pool.nbytes(), pool, rows, need):
                self._reshape(pool, rows, need)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._end(r, "cancelled", reserved=False)
        for f in [f for f in self._prefills if f.request.cancelled]:
            self._prefills.remove(f)
            self.pools[f.request.pattern].drop_prefill(f.request)
            self._end(f.request, "cancelled")
            self._shrink(self.pools[f.request.pattern])
        for pool in self.pools.values():
            gone = False
            for i in reversed(range(len(pool.rows))):
                if pool.rows[i].cancelled:
                    r = pool.rows[i]
                    pool.remove(i)
                    self._end(r, "cancelled")
                    gone = True
            if gone:
                self._shrink(pool)

    def _prefill_chunk(self, f: _Prefill) -> None:
        """One chunk of the oldest admitted prompt, straight into its pool row (``RowPool``): the
        row is a one-row cache that holds the first ``f.done`` tokens, so the chunks run exactly as
        ``ratplus.generate`` runs its prefill for this request alone (and a shared prefix comes from
        a snapshot instead, ``ratplus.serve.prefix``)."""
        r = f.request
        pool = self.pools[r.pattern]
        if f.done == 0 and r.prompt_logprobs is None:  # echo scores every prompt token: no reuse
            view = pool.prefill_view(r, 0)
            f.done = f.reused = self.prefix.restore(r.pattern, r.prompt, view)
        view = pool.prefill_view(r, f.done)
        chunk = r.prompt[f.done : f.done + self.prefill_chunk]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        if r.prompt_logprobs is not None:  # echo: position q's logits score prompt token q + 1
            full = self.model(ids, cache=view)  # (1, T, V)
            targets = r.prompt[f.done + 1 : f.done + 1 + len(chunk)]
            if targets:
                lp, top = token_logprobs(full[0, : len(targets)], torch.tensor(targets), r.prompt_logprobs)
                r.prompt_logprob_rows.extend(zip(lp, top))
            logits = full[:, -1]  # (1, V)
        else:  # the head on the last position only, as ratplus.generate does
            logits = self.model.logits(self.model.hidden(ids, cache=view)[:, -1:])[:, -1]  # (1, V)
        f.done += len(chunk)
        self.prefix.store(r.pattern, r.prompt[: f.done], view)
        if f.done < len(r.prompt):
            return
        self.prompt_tokens_total += len(r.prompt)
        self.prefix.count(f.reused, len(r.prompt))
        if r.max_tokens == 0:  # echo scoring: the prompt's logprobs and no token
            with self._cv:
                self._prefills.remove(f)
                pool.drop_prefill(r)
                self._end(r, "length")
                self._shrink(pool)
            return
        token = self._sample(r, logits)[0]
        keep = self._deliver(r, token)
        with self._cv:  # from prefill to decoding in one step, as /metrics sees it
            self._prefills.remove(f)
            if keep:
                pool.start_decoding(r, token)
            else:
                pool.drop_prefill(r)
                self._shrink(pool)

    def _decode(self, pool: RowPool) -> None:
        n = len(pool.rows)
        tokens = torch.tensor(pool.next, dtype=torch.long, device=self.device).view(n, 1)
        held = torch.tensor(pool.held, dtype=torch.long, device=self.device)
        logits = self.decode_step(tokens, pool.decode_view(), held)  # (n, V): running rows only
        pool.held = [h + 1 for h in pool.held]
        tokens = self._sample_rows(pool.rows, logits)
        done = []
        for i, (r, t) in enumerate(zip(pool.rows, tokens)):
            if self._deliver(r, t):
                pool.next[i] = t
            else:
                done.append(i)
        with self._cv:
            for i in reversed(done):
                pool.remove(i)
            if done:
                self._shrink(pool)
            now = time.monotonic()
            self._recent.append((now, len(tokens)))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()

    def _sample(self, r: Request, logits: torch.Tensor) -> list[int]:
        return self._sample_rows([r], logits)

    def _sample_rows(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Plain greedy rows in one argmax; the others one by one with their own settings and
        generator (``sample_row``: penalties, logit_bias, min_tokens, top_k, min_p, top_p); logprobs
        of the raw logits for the rows that asked."""
        tokens = logits.argmax(dim=-1)
        for i, r in enumerate(rows):
            if r.constraint is not None:
                row = r.constraint.mask(logits[i])
                tokens[i] = sample_row(row, r.sampling or SamplingParams(r.temperature, top_p=r.top_p), r.prompt,
                                       r.tokens, r.stop_ids, r.generator)  # fmt: skip
                r.constraint.consume(int(tokens[i]))
            elif r.sampling is not None and (r.sampling.transforms_logits or r.temperature > 0):
                tokens[i] = sample_row(logits[i], r.sampling, r.prompt, r.tokens, r.stop_ids, r.generator)
            elif r.temperature > 0:
                tokens[i] = sample_next(logits[i : i + 1], r.temperature, None, r.top_p, r.generator)[0]
        for i, r in enumerate(rows):
            if r.logprobs is not None:
                lp, top = token_logprobs(logits[i : i + 1], tokens[i : i + 1], r.logprobs)
                r.token_logprobs.append((lp[0], top[0]))
        return tokens.tolist()

    def _deliver(self, r: Request, token: int) -> bool:
        """Hand one token to its request; False when the request is finished (its row must go)."""
        if r.t_first is None:
            r.t_first = time.perf_counter()
            self.ttft_sum += r.t_first - r.t_submit
            self.ttft_count += 1
        if r.cancelled:
            self._end(r, "cancelled")
            return False
        if token in r.stop_ids:
            self._end(r, "stop")
            return False
        r.tokens.append(token)
        self.tokens_total += 1
        r.sink(("token", token))
        if len(r.tokens) >= r.max_tokens:
            self._end(r, "length")
            return False
        return True

    def _end(self, r: Request, reason: str, reserved: bool = True) -> None:
        if r.done:
            return
        r.done, r.finish_reason, r.t_end = True, reason, time.perf_counter()
        if reserved:
            self.budget.release(r.kv_bytes)
        self.finished[reason] += 1
        r.sink(("end", reason))

    def _fail(self, r: Request, message: str, reserved: bool = False) -> None:
        if r.done:
            return
        r.done, r.finish_reason, r.t_end = True, "error", time.perf_counter()
        if reserved:
            self.budget.release(r.kv_bytes)
        self.finished["error"] += 1
        r.sink(("error", message))

    def _abort_all(self, message: str) -> None:
        """End every admitted request with an error and free every cache (caller holds the lock)."""
        for f in self._prefills:
            self._fail(f.request, message, reserved=True)
        self._prefills.clear()
        for pool in self.pools.values():
            for r in pool.clear():
                self._fail(r, message, reserved=True)
        while self._waiting:
            self._fail(self._waiting.popleft(), message)


#: Folder names that say where a model sits in a run, not what it is (``runs/demo/final``).
_GENERIC_FOLDERS = re.compile(r"(final|best|last|latest|model|checkpoint|ckpt|step)([-_.]?\d*)", re.IGNORECASE)


def served_name(folder: str | Path, config_name: str | None, metadata: dict[str, Any] | None = None) -> str:
    """The model's name in the API when ``--name`` is not given: ``name`` in the folder's
    ``metadata.json`` when a run recorded one; else the folder's name, unless it is a generic one
    (``final``, ``checkpoint-500``, ...): then the config's name (``ModelConfig.name``: the preset or
    the imported model) when it is not the default ``custom``, else the run folder above it."""
    recorded = (metadata or {}).get("name")
    if isinstance(recorded, str) and recorded.strip():
        return recorded.strip()
    # abspath, not resolve(): a link's own name is the name the user chose (the demo's
    # models/ratplus-D16-W0-P0 points at a hashed run folder whose name says nothing)
    path = Path(os.path.abspath(folder))
    if not _GENERIC_FOLDERS.fullmatch(path.name):
        return path.name
    if config_name and config_name != "custom":
        return config_name
    return path.parent.name or path.name


__all__ = ["Engine", "QueueFull", "Request", "RowPool", "ShuttingDown", "served_name"]
