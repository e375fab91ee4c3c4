"""Imports point one way: config -> ops -> model -> io/generation -> train/hf -> eval -> bench/demo/serve
-> cli (eval above train: the recall probe trains small models), with runtime (device, dtype,
tables, JSON) a leaf that any layer may use. Every ``ratplus`` import in the package (function-level
ones included) is read with ``ast``; a module may import its own package, lower layers, and nothing
beside or above it."""

import ast
from pathlib import Path

import pytest

import ratplus

PACKAGE = Path(ratplus.__file__).parent

#: Top-level unit (subpackage or module) -> layer; units on one layer do not import each other.
LAYERS = {
    "config": 0,
    "runtime": 0,  # a leaf: imports nothing of ratplus
    "ops": 1,
    "model": 2,
    "io": 3,
    "generation": 3,
    "train": 4,
    "hf": 4,
    "eval": 5,  # the recall probe trains its models with ratplus.train.step
    "bench": 6,
    "demo": 6,
    "serve": 6,  # the HTTP server: beside bench and demo, above generation and eval
    "cli": 7,
}
ENTRY_POINTS = {"__init__", "__main__"}  # the public API re-exports and `python -m ratplus`


def unit_of(module: str) -> str:
    """``ratplus.eval.ppl`` -> ``eval``."""
    return module.split(".")[1]


def ratplus_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ratplus.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("ratplus."):
                found.append((node.lineno, node.module))
            elif node.module == "ratplus":  # `from ratplus import lm_eval`: each name may be a module
                found += [(node.lineno, f"ratplus.{a.name}") for a in node.names if a.name in LAYERS]
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if len(rel.parts) == 1 and rel.stem in ENTRY_POINTS:
            continue
        unit = rel.parts[0].removesuffix(".py")
        assert unit in LAYERS, f"{rel}: a new top-level unit needs its layer in LAYERS"
        for line, target in ratplus_imports(path):
            other = unit_of(target)
            if other == unit:
                continue
            if LAYERS[other] >= LAYERS[unit]:
                bad.append(f"{rel}:{line} ({unit}, layer {LAYERS[unit]}) imports {target} (layer {LAYERS[other]})")
    return bad


def test_imports_point_one_way():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The scan itself: an ops module importing the model (inside a function) is reported."""
    fake = tmp_path / "ratplus"
    (fake / "ops").mkdir(parents=True)
    (fake / "model").mkdir()
    (fake / "ops" / "bad.py").write_text("def f():\n    from ratplus.model.rat import RATPlusLM\n")
    (fake / "model" / "ok.py").write_text("import ratplus.ops.bad\n")
    assert violations(fake) == ["ops/bad.py:2 (ops, layer 1) imports ratplus.model.rat (layer 2)"]


@pytest.mark.parametrize("unit", sorted(LAYERS))
def test_every_layer_exists(unit):
    assert (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file()
