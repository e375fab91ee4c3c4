"""``python -m ratplus.cli.lm_eval``: lm-evaluation-harness's own command line with the ``ratplus`` model
registered.

    python -m ratplus.cli.lm_eval --model ratplus --model_args ckpt=PATH,pattern=D16-W256-P4 \
        --tasks arc_easy,piqa [--include_path DIR | --tasks path/to/task.yaml] [--limit N]

Every lm-eval option works as in ``lm-eval run``; ``--model ratplus`` is added when no model is
named. A task YAML or include path that does not exist, or an unknown task name, stops with a
one-line error naming it (exit status 2). This module is ``ratplus.cli.lm_eval``; the harness itself
is the top-level ``lm_eval`` package, which it imports absolutely.
"""

from __future__ import annotations

import logging
import sys

_LM_EVAL_COMMANDS = ("run", "ls", "validate")


def _option_values(argv: list[str], name: str) -> list[str]:
    """Values of ``--name v1 v2`` / ``--name=v1,v2`` in an argv list, split on commas."""
    values: list[str] = []
    for i, arg in enumerate(argv):
        if arg == name:
            for v in argv[i + 1 :]:
                if v.startswith("--"):
                    break
                values.extend(v.split(","))
        elif arg.startswith(name + "="):
            values.extend(arg.split("=", 1)[1].split(","))
    return [v for v in values if v]


def main(argv: list[str] | None = None, prog: str = "ratplus.cli.lm_eval") -> int:
    """Run lm-eval's CLI on ``argv`` (default: sys.argv[1:]) with the ratplus model registered;
    errors are one line ``<prog>: error: ...`` with exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate

        import ratplus.eval.harness as harness  # registers "ratplus" with lm-eval
    except ImportError as e:
        print(
            f"{prog}: error: lm-evaluation-harness is not installed ({e}); pip install lm-eval",
            file=sys.stderr,
        )
        return 2
    if args and args[0] not in _LM_EVAL_COMMANDS and not args[0].startswith("-"):
        print(f"{prog}: error: unknown command {args[0]!r}", file=sys.stderr)
        return 2
    if not args or args[0] not in (*_LM_EVAL_COMMANDS, "-h", "--help"):
        args.insert(0, "run")  # lm-eval's legacy form: options without a command mean "run"
    if args[0] == "run" and "--model" not in args and not any(a.startswith("--model=") for a in args):
        args[1:1] = ["--model", "ratplus"]
    saved = sys.argv
    try:
        includes = _option_values(args, "--include_path")
        harness.check_task_specs(_option_values(args, "--tasks"), includes)
        sys.argv = ["lm-eval", *args]  # lm-eval's CLI parses sys.argv itself
        cli_evaluate()
    except (ValueError, OSError) as e:  # bad input, as in ratplus.cli.main
        hint = " (a local task needs its YAML path or --include_path DIR)" if "Tasks not found" in str(e) else ""
        print(f"{prog}: error: {e}{hint}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
