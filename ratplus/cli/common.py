"""What the command modules share: the parser and its help format, the number, size and list flag
types, the machine flags (--device, --dtype, --threads, --json) and the step from parsed flags to
library keyword arguments.

Every number flag of every command is parsed by ``number`` (through one of the names below it), so
nan, inf, a value beyond what the code can hold and one out of range stop at the command line as
argparse's one line naming the flag (``ratplus serve: error: argument --kv-memory: ...``), before
anything is loaded. Finer limits that depend on other values (a model's context, lr >= min_lr) stay
with the library, which checks them for every caller.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

#: The largest whole number a flag takes: an int64, what torch and numpy index and count with.
INT_MAX = 2**63 - 1
#: The longest wait a seconds flag takes (115 days). threading refuses timeouts above
#: threading.TIMEOUT_MAX (292 years on 64-bit Linux) and inf; anything near either is a slip.
MAX_SECONDS = 10**7


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default as ``(default: X)`` at the end of its help, written as it is typed
    (``1024,2048`` for a list), or the text ``lazy_default`` gave it. A help text that already says
    ``(default...`` (what a default of None, an empty list or a library default means) is left as
    written; switches show none. tests/cli/test_help.py holds every flag of every command to this."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        later = getattr(action, "shown_default", None)
        if later is not None:  # lazy_default
            return f"{text} {later().replace('%', '%%')}"
        if (
            "(default" in text
            or action.nargs == 0
            or action.required
            or not action.option_strings
            or default is None
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} {shown_default(default).replace('%', '%%')}"  # argparse then expands %-formats


def as_typed(value: Any) -> str:
    """A default as one would type it on the command line: ``1024,2048`` for a list, ``0.001`` or
    ``1e-08`` for a float (``%g``), ``''`` for an empty text, the text of anything else."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(as_typed, value))
    return f"{value:g}" if isinstance(value, float) else str(value) or repr(value)


def shown_default(full: Any, quick: Any = None) -> str:
    """``(default: X)``, or ``(default: X; --quick: Y)`` for a command whose ``--quick`` smoke budget
    sets the flag otherwise."""
    if quick is None or quick == full:
        return f"(default: {as_typed(full)})"
    return f"(default: {as_typed(full)}; --quick: {as_typed(quick)})"


def lazy_default(action: argparse.Action, shown: Callable[[], str]) -> argparse.Action:
    """Gives ``action`` the ``(default: ...)`` text ``shown()``, called only when --help is printed: for
    a default that lives in a library module slow to import (the trainer's pull in torch.distributed),
    which every command line would otherwise pay for while its parser is built."""
    action.shown_default = shown  # type: ignore[attr-defined]
    return action


class Parser(argparse.ArgumentParser):
    """The ``ratplus`` parser: its subcommands (``add_subparsers`` builds them with this class) all
    show defaults the same way (``HelpFormatter``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _bounds(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``"a whole number >= 1"``, ``"a finite number in (0, 1]"``: what ``number`` takes, in words."""
    noun = "a whole number" if kind is int else "a finite number"

    def shown(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if low is not None and high is not None:
        return f"{noun} in {'(' if low_open else '['}{shown(low)}, {shown(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {shown(low)}"
    if high is not None:
        return f"{noun} {'<' if high_open else '<='} {shown(high)}"
    return noun


def number(
    kind: type[int] | type[float],
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type`` for a number flag: ``kind(text)`` in ``[low, high]`` (an open end with
    ``low_open`` / ``high_open``). Refuses nan, inf, a float that overflows (``1e999``), a whole
    number beyond ``INT_MAX`` and anything out of range with ``argparse.ArgumentTypeError``, which
    argparse prints as one line naming the flag."""
    wanted = _bounds(kind, low, high, low_open, high_open)

    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            spelled = text.strip().lower().lstrip("+-")
            why = "" if spelled.startswith(("inf", "nan")) else " (beyond the float range)"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}{why}")
        if isinstance(value, int) and abs(value) > INT_MAX:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r} (beyond an int64: at most 2**63 - 1)")
        if (
            (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))
        ):  # fmt: skip
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = number(int, 1)
nonneg_int = number(int, 0)
positive_float = number(float, 0, low_open=True)
nonneg_float = number(float, 0)
finite_float = number(float)
fraction = number(float, 0, 1)
seconds = number(float, 0, MAX_SECONDS)
port = number(int, 0, 65535)


def byte_size(text: str) -> int:
    """An argparse ``type`` for a memory size (``4GiB``, ``512MB``, ``1e9`` bytes), read by
    ``ratplus.serve.admission.parse_bytes``: a whole number of bytes in [1, 2**63)."""
    from ratplus.serve.admission import parse_bytes

    try:
        return parse_bytes(text, "size")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive size below 8 EiB such as 4GiB, 512MiB or 1000000 (bytes), got {text!r}"
        ) from None


def comma_list(item: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse ``type``: ``"1, 2,3"`` -> ``[item("1"), ...]``. Refuses an empty list and an empty
    entry (``"D4,,D8"``: a slip, not a request for the defaults); a bad entry is named."""

    def parse(text: str) -> list[Any]:
        parts = [x.strip() for x in text.split(",")]
        if not any(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got an empty list {text!r}")
        if "" in parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got an empty entry in {text!r}")
        try:
            return [item(x) for x in parts]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, in {text!r}: {e}") from None

    return parse


ints = comma_list(positive_int, "whole numbers >= 1")
percents = comma_list(number(float, 0, 100), "percentages in [0, 100]")
names = comma_list(str, "names")

DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "float32, bfloat16 or float16; auto: float32 on CPU, bfloat16 on CUDA"
THREADS_HELP = (
    "torch threads, 0 = torch's choice; one by default: single-token work is memory-bound, and on a shared "
    "CPU several threads on small kernels mostly measure scheduler stalls"
)


def add_device(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: Any = "auto") -> None:
    """--device, as every command that runs a model takes it."""
    p.add_argument("--device", default=default, help=DEVICE_HELP)


def add_machine_flags(
    p: argparse.ArgumentParser,
    dtype_help: str = DTYPE_HELP,
    threads: bool = False,
    json: bool = True,
) -> None:
    """--device, --dtype, and (when asked) --threads and --json, as every benchmark takes them."""
    add_device(p)
    p.add_argument("--dtype", default="auto", help=dtype_help)
    if threads:
        p.add_argument("--threads", type=nonneg_int, default=1, help=THREADS_HELP)
    if json:
        p.add_argument("--json", default=None, help="also write the JSON record to this file (default: not written)")


def apply_threads(threads: int) -> None:
    """--threads: 0 keeps torch's default, n > 0 pins torch to n threads (``nonneg_int`` parsed it)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def picked(args: argparse.Namespace, *fields: str) -> dict[str, Any]:
    """``{field: args.field}`` for the named flags: the keyword arguments a library call takes as is."""
    return {f: getattr(args, f) for f in fields}
