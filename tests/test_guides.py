"""The README and docs/guides run as written.

Every ``bash`` block is either small (run here, in order, in one temporary folder: the train guide
makes the folders the others start from) or marked full-size by the line before it,
``<!-- full-size: exercised by tests/... -->``, naming the tests that exercise those commands. Every
``ratplus`` command line of every block parses with the CLI's own parser (a renamed or mistyped
flag fails here, full-size or not). ``python`` blocks run too."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ratplus.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# in the order they are run: each later guide starts from the folders of docs/guides/train.md
RUN_ORDER = ("train", "generate", "evaluate", "huggingface")
GUIDES = (*RUN_ORDER, "recall", "demo", "bring-your-own-model")
BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```(bash|python)\n(.*?)^```", re.M | re.S)
FULL_SIZE = re.compile(r"<!-- full-size: exercised by (.+?) -->")


def blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, the full-size note or None) of every bash / python block of a Markdown file."""
    out = []
    for m in BLOCK.finditer(path.read_text()):
        note = FULL_SIZE.match(m.group(1) or "")
        out.append((m.group(2), m.group(3), note.group(1) if note else None))
    return out


def command_lines(code: str) -> list[list[str]]:
    """The argv (after ``ratplus``) of every ratplus command in a bash block: continuation lines joined,
    comments dropped, ``a && b`` split, ``torchrun ... -m ratplus`` included."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] == "ratplus":
                out.append(words[1:])
            elif "-m" in words and words[words.index("-m") + 1 :][:1] == ["ratplus"]:
                out.append(words[words.index("-m") + 2 :])
    return out


DOCS = [ROOT / "README.md"] + [ROOT / "docs" / "guides" / f"{g}.md" for g in GUIDES]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_parses_and_full_size_blocks_name_their_tests(doc):
    found = blocks(doc)
    assert found, f"{doc} has no code block"
    parser = build_parser()
    for lang, code, note in found:
        if note is not None:
            tests = re.findall(r"tests/[\w/]+\.py", note)
            assert tests, f"{doc.name}: a full-size note names no test file: {note}"
            for t in tests:
                assert (ROOT / t).is_file(), f"{doc.name}: the full-size note names {t}, which does not exist"
        if lang != "bash":
            continue
        for argv in command_lines(code):
            try:
                parser.parse_args(argv)
            except SystemExit as e:  # argparse's exit on a bad command line
                pytest.fail(f"{doc.name}: `ratplus {shlex.join(argv)}` does not parse (exit {e.code})")


def _shim(folder: Path) -> dict[str, str]:
    """PATH with ``ratplus`` and ``python`` running this interpreter on this checkout."""
    folder.mkdir()
    for name, args in (("ratplus", "-m ratplus "), ("python", "")):
        (folder / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {args}"$@"\n')
        (folder / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
def test_small_blocks_run_as_written(tmp_path):
    """The small blocks of the guides, in order, then the README's Python: each must exit 0 (about a
    minute on a shared 2-core CPU: a tokenizer, a tiny model trained and adapted, evaluated, converted)."""
    env = _shim(tmp_path / "bin")
    work = tmp_path / "work"
    work.mkdir()
    ran = 0
    for doc in [ROOT / "docs" / "guides" / f"{g}.md" for g in RUN_ORDER] + [ROOT / "README.md"]:
        for i, (lang, code, note) in enumerate(blocks(doc)):
            if note is not None or (doc.name == "README.md" and lang == "bash"):
                continue  # the README's bash blocks are the install and the test run themselves
            if lang == "bash":
                cmd = ["bash", "-e", "-c", code]
            else:
                script = work / f"{doc.stem}_{i}.py"
                script.write_text(code)
                cmd = [sys.executable, str(script)]
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{doc.name} block {i} failed:\n{code}\n{proc.stderr[-3000:]}"
            ran += 1
    assert ran >= 7
    assert (work / "runs" / "tiny-hf" / "config.json").is_file()
    assert (work / "runs" / "eval" / "budget" / "budget.png").is_file()


def test_guides_name_only_models_the_demo_leaves():
    """The guides' full-size commands start from ``ratplus demo``'s output: every ``demo_out/models/<name>``
    they use is one the demo links, its held-out file is the one the demo writes, and demo.md shows the
    very commands the demo prints at the end (the quick demo test runs those)."""
    import dataclasses

    from ratplus.demo import ADAPT_PATTERNS, HELDOUT_FILE, MODELS, model_name
    from ratplus.demo.pipeline import DemoConfig
    from ratplus.demo.report import try_commands

    made = {model_name(m, p) for m in MODELS for p in ("dense", *ADAPT_PATTERNS)}
    seen = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]:
        text = doc.read_text()
        for name in re.findall(r"demo_out/models/([\w.-]+)", text):
            assert name in made, f"{doc.name}: demo_out/models/{name} is not a model the demo names ({sorted(made)})"
            seen.add(name)
        for path in re.findall(r"demo_out/data/([\w.-]+)", text):
            assert path == HELDOUT_FILE, f"{doc.name}: demo_out/data/{path} is not written by the demo"
        assert "runs/demo/final" not in text or doc.name == "train.md", f"{doc.name}: runs/demo/final is train.md's run"
    assert {"ratplus", "baseline", "ratplus-D16-W0-P0"} <= seen
    demo_md = (ROOT / "docs" / "guides" / "demo.md").read_text()
    for _, cmd in try_commands({"config": dataclasses.asdict(DemoConfig())}):
        assert cmd in demo_md, f"demo.md does not show the command the demo prints: {cmd}"
