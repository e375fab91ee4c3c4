"""What the command modules share: list-valued flag types, the machine flags (--device, --dtype,
--threads, --json) and the step from parsed flags to library keyword arguments."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def comma_list(convert: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse ``type``: ``"1, 2,3"`` -> ``[convert("1"), ...]``; a bad item names ``what``."""

    def parse(text: str) -> list[Any]:
        try:
            return [convert(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from e

    return parse


ints = comma_list(int, "integers")
floats = comma_list(float, "numbers")
names = comma_list(str, "names")

THREADS_HELP = (
    "torch threads (0 = torch default). 1 by default: single-token work is memory-bound, and on a shared "
    "CPU multi-threaded small kernels mostly measure scheduler stalls"
)


def add_machine_flags(
    p: argparse.ArgumentParser,
    dtype_help: str = "float32 on CPU by default, bfloat16 on CUDA",
    threads: bool = False,
    json: bool = True,
) -> None:
    """--device, --dtype, and (when asked) --threads and --json, as every benchmark takes them."""
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help=dtype_help)
    if threads:
        p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    if json:
        p.add_argument("--json", default=None, help="also write the JSON record to this file")


def apply_threads(threads: int) -> None:
    """--threads: 0 keeps torch's default, n > 0 pins torch to n threads."""
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def picked(args: argparse.Namespace, *fields: str) -> dict[str, Any]:
    """``{field: args.field}`` for the named flags: the keyword arguments a library call takes as is."""
    return {f: getattr(args, f) for f in fields}
