"""``--api-key`` / ``RATPLUS_API_KEY``: the /v1 routes need ``Authorization: Bearer <key>`` (401 with
an OpenAI-style body otherwise, before the body is read); /, /health and /metrics stay open; the
key never appears in an answer or the log; a non-loopback --host without a key prints a warning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")

from ratplus.cli.serve import _is_loopback  # noqa: E402
from tests.serve.conftest import D16, NAME, httpx, live_server  # noqa: E402

KEY = "sk-test-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keyed(model, tokenizer):
    with live_server(model, tokenizer, api_key=KEY) as server:
        yield server


def _client(live, key: str):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_openai_client_with_the_key_works(keyed):
    c = _client(keyed, KEY)
    assert next(m.id for m in c.models.list().data).startswith(NAME)
    r = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    chunks = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True))  # fmt: skip
    assert chunks[-1].choices[0].finish_reason is not None


def test_a_wrong_key_is_refused_by_the_client(keyed):
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, KEY + "x").completions.create(model=NAME, prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, "unused").models.list()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Bearer {KEY}0"},
        {"Authorization": KEY},  # no scheme
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   x"},
        {"Authorization": f"Bearer {KEY} extra"},
        {"Authorization": f"bearer{KEY}"},
    ],
)
def test_no_key_wrong_key_or_malformed_header_get_401(keyed, headers):
    for method, path, body in (("POST", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2}),
                               ("POST", "/v1/chat/completions", "not even json"),
                               ("GET", "/v1/models", None), ("GET", "/v1/patterns", None),
                               ("GET", "/v1/no-such-route", None)):  # fmt: skip
        kw = {"json": body} if isinstance(body, dict) else {"content": body} if body else {}
        r = httpx.request(method, f"{keyed.url}{path}", headers=headers, **kw)
        assert r.status_code == 401, (path, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
        assert KEY not in r.text and r.headers["www-authenticate"] == "Bearer"


def test_two_authorization_headers_are_refused(keyed):
    r = httpx.get(f"{keyed.url}/v1/models", headers=[("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer x")])
    assert r.status_code == 401


def test_health_metrics_and_the_page_stay_open(keyed):
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 200, path
    assert KEY not in httpx.get(f"{keyed.url}/metrics").text


def test_loopback_hosts():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert _is_loopback("127.0.0.2") and _is_loopback("[::1]")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.4") and not _is_loopback("example.org")


def _start(ckpt, host: str, env: dict) -> tuple[subprocess.Popen, str, list[str]]:
    boot = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from ratplus.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", boot, "serve", "--ckpt", str(ckpt), "--port", "0", "--patterns", D16,
           "--host", host, "--log-level", "debug"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, "the server did not start:\n" + "".join(lines)
        line = proc.stderr.readline()
        lines.append(line)
        if "ratplus serve: listening on http" in line:
            port = line.rsplit(":", 1)[1].strip()
            return proc, f"http://127.0.0.1:{port}", lines


def test_cli_key_from_the_environment_and_the_open_host_warning(ckpt):
    """0.0.0.0 without a key: a warning; with RATPLUS_API_KEY: no warning, 401 without the key, 200
    with it, and the key is in no log line (debug logs every request)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RATPLUS_API_KEY", None)
    proc, url, lines = _start(ckpt, "0.0.0.0", env)
    try:
        assert "there is no API key" in "".join(lines)
        assert httpx.get(f"{url}/v1/models").status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    proc, url, lines = _start(ckpt, "0.0.0.0", {**env, "RATPLUS_API_KEY": KEY})
    try:
        assert "there is no API key" not in "".join(lines)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=30)
    assert KEY not in "".join(lines) + rest
