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

# The subcommand modules, in the order `ratplus --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "ratplus.cli.demo",
    "ratplus.cli.train",
    "ratplus.cli.generate",
    "ratplus.cli.eval",
    "ratplus.cli.tune",
    "ratplus.cli.convert",
    "ratplus.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratplus", description="RAT+: train dense, infer sparse (recurrence-augmented attention)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"ratplus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ratplus {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
