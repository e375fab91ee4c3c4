"""Benchmark timing: median wall time after warm-up, and round-robin rounds for ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_rounds(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall time of every function in each of ``repeats`` round-robin rounds (A, B, A, B, ...,
    after ``warmup`` rounds), kept per round: a change in machine load during the measurement hits
    every contender alike, and a ratio taken within one round is steadier still."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Median of ``time_rounds`` per function: use it for ratios."""
    return {name: statistics.median(ts) for name, ts in time_rounds(fns, device, repeats, warmup).items()}
