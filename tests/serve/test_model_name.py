"""The served model name comes from the model, not from a run's ``final`` folder (issue 32)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from ratplus.io.folder import save_pretrained
from ratplus.serve.engine import served_name


@pytest.mark.parametrize(
    "folder, config_name, metadata, want",
    [
        ("runs/demo/final", "demo", {}, "demo"),  # the config's name (the preset)
        ("runs/my-run/final", "custom", {}, "my-run"),  # no config name: the run's folder
        ("runs/my-run/checkpoint-500", "custom", None, "my-run"),
        ("runs/my-run/step_1200", "tiny", {}, "tiny"),
        ("models/smollm2", "SmolLM2-135M-Instruct.Q4_1", {}, "smollm2"),  # a named folder keeps its name
        ("runs/x/final", "demo", {"name": "story-bot"}, "story-bot"),  # a recorded name wins
        ("runs/x/final", "demo", {"name": "  "}, "demo"),
    ],
)
def test_served_name(tmp_path, folder, config_name, metadata, want):
    assert served_name(tmp_path / folder, config_name, metadata) == want


def test_served_name_keeps_a_links_own_name(tmp_path):
    """The demo's ``models/ratplus-D16-W0-P0`` links to a hashed run folder: the link's name is served."""
    target = tmp_path / "adapt_ratplus_D16-W0-P0_215a7c17" / "final"
    target.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "ratplus-D16-W0-P0"
    link.symlink_to(target)
    assert served_name(link, "demo", {}) == "ratplus-D16-W0-P0"


def test_serve_lists_a_final_folder_under_the_models_name(tmp_path, model, tokenizer):
    """``ratplus serve --ckpt runs/<run>/final``: /v1/models says ``tiny:dense`` (the config's name)."""
    pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'ratplus[serve]'")
    import urllib.request

    from tests.serve.test_sigterm import BOOT

    folder = tmp_path / "run" / "final"
    save_pretrained(model, folder, tokenizer=tokenizer)
    cmd = [sys.executable, "-c", BOOT, "serve", "--ckpt", str(folder), "--port", "0", "--patterns", "dense"]
    proc = subprocess.Popen([*cmd, "--device", "cpu", "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "ratplus serve did not start"
            assert time.monotonic() < deadline
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            ids = [m["id"] for m in json.loads(r.read())["data"]]
        assert ids == [f"{model.config.name}:dense"]
    finally:
        proc.terminate()
        proc.wait(60)
