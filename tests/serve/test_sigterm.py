"""SIGTERM drains as the serving guide says: a real ``ratplus serve`` process gets the signal while a
long stream runs; the stream finishes whole, a new request gets 503 with an OpenAI-style body, a
kept-alive connection's ``/health`` gets 503 (an answer, not a closed connection), and once the
engine is idle the process exits by the signal."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")

from tests.serve.conftest import DENSE, NAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BOOT = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from ratplus.cli import main; sys.exit(main())"


def _start(ckpt: Path, log) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-c", BOOT, "serve", "--ckpt", str(ckpt), "--port", "0", "--patterns", DENSE]
    cmd += ["--threads", "1", "--shutdown-grace", "30", "--log-level", "warning", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=log, text=True)
    deadline = time.monotonic() + 120
    while True:
        m = re.search(r"listening on http://([\d.]+):(\d+)", Path(log.name).read_text())
        if m:
            return proc, m.group(1), int(m.group(2))
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("ratplus serve did not start:\n" + Path(log.name).read_text())
        time.sleep(0.1)


def _post(conn: http.client.HTTPConnection, body: dict) -> http.client.HTTPResponse:
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def test_sigterm_drains_running_requests_and_answers_503(ckpt):
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc, host, port = _start(ckpt, log)
        try:
            keep = http.client.HTTPConnection(host, port, timeout=60)  # one kept-alive connection
            keep.request("GET", "/health")
            r = keep.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"

            # long streams (EOS ignored: every one runs its max_tokens)
            body = {"model": f"{NAME}:{DENSE}", "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0}
            body |= {"stream": True, "ignore_eos": True}
            results, started = [], threading.Barrier(4)

            def stream() -> None:
                conn = http.client.HTTPConnection(host, port, timeout=120)
                resp = _post(conn, body)
                assert resp.status == 200
                first = resp.readline()
                started.wait()
                rest = resp.read().decode()
                results.append(first.decode() + rest)

            threads = [threading.Thread(target=stream) for _ in range(3)]
            for t in threads:
                t.start()
            started.wait(60)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # the signal is handled by the server's loop

            fresh = http.client.HTTPConnection(host, port, timeout=30)
            r = _post(fresh, {"model": f"{NAME}:{DENSE}", "prompt": "hi", "max_tokens": 4})
            err = json.loads(r.read())
            assert r.status == 503
            assert err["error"]["type"] == "server_error" and "shutting down" in err["error"]["message"]

            keep.request("GET", "/health")
            r = keep.getresponse()
            assert r.status == 503 and json.loads(r.read())["status"] in ("draining", "stopped")
            assert proc.poll() is None, "the server exited while streams were running"

            for t in threads:
                t.join(120)
            assert len(results) == 3
            for text in results:
                chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
                assert text.rstrip().endswith("data: [DONE]")
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert proc.wait(60) == -signal.SIGTERM  # exits by the signal, after the streams ended
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_second_sigterm_ends_running_requests_at_once(ckpt):
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc, host, port = _start(ckpt, log)
        try:
            conn = http.client.HTTPConnection(host, port, timeout=60)
            body = {"model": f"{NAME}:{DENSE}", "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0}
            resp = _post(conn, body | {"stream": True, "ignore_eos": True})
            assert resp.status == 200 and resp.readline().startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)  # drains: the stream may run for the 30 s grace
            time.sleep(0.3)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # stops: the stream ends with an error event
            rest = resp.read().decode()
            errors = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith('data: {"error"')]
            assert errors and "shutting down" in errors[0]["error"]["message"]
            proc.wait(20)
            assert time.monotonic() - t0 < 15, "the second signal did not stop the server at once"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
