"""``ratplus`` command line. Thin: parse arguments, call library functions, print.

Every argparse of the project lives in this package, one module per command family; each exposes
``add_parser(subparsers)``, which registers its arguments and sets ``func(args) -> int``. Library
modules carry no argparse. The list below is the whole table.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ratplus.cli.common import Parser

# The subcommand modules, in the order `ratplus --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "ratplus.cli.demo",
    "ratplus.cli.train",
    "ratplus.cli.generate",
    "ratplus.cli.eval",
    "ratplus.cli.tune",
    "ratplus.cli.convert",
    "ratplus.cli.bench",
    "ratplus.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ratplus", description="RAT+: train dense, infer sparse (recurrence-augmented attention).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """``eval ppl``, ``data prepare``, ``train``: the command as typed, for error lines."""
    sub = next((getattr(args, k) for k in ("what", "data_command") if isinstance(getattr(args, k, None), str)), None)
    return f"{args.command} {sub}" if sub else args.command


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, FloatingPointError) as e:
        # Bad input (a value, a file, a folder, a full disk, a learning rate that made the loss
        # diverge): one line naming it. Anything else is a bug and keeps its traceback. With
        # --verbose the traceback of a bad input is logged too.
        logging.getLogger("ratplus").debug("ratplus: traceback of the error below", exc_info=True)
        print(f"ratplus {command_name(args)}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ratplus {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
