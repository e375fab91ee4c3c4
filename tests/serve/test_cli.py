"""``ratplus serve`` as a process: flags, errors, the port it prints, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")

from ratplus.cli import main  # noqa: E402
from tests.serve.conftest import D16, NAME, httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--kv-memory", "lots"], "argument --kv-memory: expected a positive size"),
        (["--patterns", "dense,banana"], "--patterns"),
        (["--patterns", "topk-B4-K1-W2-P1"], "fixed-shape decode step"),
        (["--max-batch", "0"], "argument --max-batch: expected a whole number >= 1"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_flags_exit_2_with_one_line(ckpt, capsys, extra, needle):
    try:
        code = main(["serve", "--ckpt", str(ckpt), "--device", "cpu", *extra])
    except SystemExit as e:  # a number flag's value, refused by argparse itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ratplus serve: error:") and needle in last and "Traceback" not in err


def test_missing_folder(tmp_path, capsys):
    assert main(["serve", "--ckpt", str(tmp_path / "nope")]) == 2
    assert "ratplus serve: error:" in capsys.readouterr().err


def test_sigterm_ends_in_flight_requests_with_an_error_event_and_exits(ckpt):
    """A streaming request is running when SIGTERM comes (grace 0): its stream ends with an error
    event (no hang), new connections are refused, and the process exits after a clean shutdown (by
    the signal again: uvicorn re-raises it once shut down, so a supervisor sees how it ended)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    boot = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from ratplus.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", boot, "serve", "--ckpt", str(ckpt), "--port", "0", "--patterns", D16]
    proc = subprocess.Popen(
        [*cmd, "--shutdown-grace", "0", "--log-level", "info"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            m = re.search(r"listening on (http://\S+)", proc.stderr.readline())
            url = m.group(1) if m else None
        body = {"model": f"{NAME}:{D16}", "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
        events = []
        with httpx.Client(timeout=30) as h, h.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line)
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            events += list(lines)
        last = json.loads(events[-1].removeprefix("data: "))
        assert "shutting down" in last["error"]["message"]
        assert proc.wait(30) in (0, -signal.SIGTERM)
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "Finished server process" in rest
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
