"""Every flag of every ``ratplus`` command says what it does and shows its default, and ``--help`` of
every command (nested ones too: ``data prepare``, ``eval ppl``, ``bench decode``) runs."""

from __future__ import annotations

import argparse

import pytest

from ratplus.cli import build_parser, main
from ratplus.cli.common import HelpFormatter

#: commands whose arguments go to another program's parser (lm-eval reads its own --help)
DELEGATED = {("eval", "lm-eval")}


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for the top parser and every subcommand below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias is the same parser
                    seen.add(id(sub))
                    yield from _commands(sub, (*path, name))


def _flags(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            yield action


COMMANDS = list(_commands(build_parser()))
IDS = [" ".join(path) or "ratplus" for path, _ in COMMANDS]


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The flag's help as ``--help`` prints it (before line wrapping)."""
    formatter = parser._get_formatter()
    assert isinstance(formatter, HelpFormatter), "every ratplus parser shows defaults the same way"
    return formatter._expand_help(action)


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def test_the_walk_reaches_the_nested_commands():
    for path in (("data", "prepare"), ("eval", "ppl"), ("bench", "decode"), ("serve",), ("tune-pattern",)):
        assert " ".join(path) in IDS


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=IDS)
def test_every_flag_has_help(path, parser):
    missing = [_name(a) for a in _flags(parser) if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not missing, f"ratplus {' '.join(path)}: flags without a help text: {', '.join(missing)}"


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=IDS)
def test_every_flag_that_takes_a_value_shows_its_default(path, parser):
    """A flag with a value of its own gets ``(default: X)`` from the formatter; one whose default is None
    (or left to the library) must say in words what happens when it is not given: ``(default: ...)``."""
    # one of a required either/or (generate --prompt | --prompt-ids) has no default to show
    either = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    silent = [
        _name(a)
        for a in _flags(parser)
        if a.option_strings
        and a.nargs != 0
        and not a.required
        and id(a) not in either
        and "(default: " not in _help(parser, a)
    ]
    assert not silent, f"ratplus {' '.join(path)}: flags whose help shows no '(default: ...)': {', '.join(silent)}"


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=IDS)
def test_help_runs(path, parser, capsys):
    if path in DELEGATED:
        pytest.skip("lm-eval prints its own help")
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ratplus {' '.join(path)}".rstrip()), out[:200]


def _flag_help(path: tuple[str, ...], flag: str) -> str:
    parser = dict(COMMANDS)[path]
    action = next(a for a in parser._actions if flag in a.option_strings)
    return " ".join(_help(parser, action).split())


def test_the_defaults_the_issue_named_are_shown():
    assert "(default: 1024,2048,4096,8192,16384,32768)" in _flag_help(("bench", "attention"), "--seq-lens")
    temperature = _flag_help(("generate",), "--temperature")
    assert "greedy" in temperature and "(default: 0" in temperature and "serve" in temperature, temperature


def test_a_default_with_a_percent_sign_prints():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--share", default="5%", help="a share")
    parser.add_argument("--lengths", default=[1, 2], help="lengths")
    text = parser.format_help()
    assert "(default: 5%)" in text and "(default: 1,2)" in text
