"""The playground page in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium): type a prompt, submit, and both patterns' outputs stream in, each equal to its solo
greedy continuation, with its KV bytes and tokens/s shown."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")

from ratplus.generation import generate  # noqa: E402
from tests.serve.conftest import D16, DENSE, live_server  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = os.environ.get("RATPLUS_PLAYGROUND_SCREENSHOT")  # where to keep a screenshot (docs)


def _browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install 'ratplus[browser]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="ratplus-chromium-")
    # this machine has no network beyond localhost: no background connections, no first-run pages
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options), profile


def test_playground_streams_both_patterns(model, tokenizer):
    prompt = "Once upon a time there was"
    ids = tokenizer.encode(prompt).ids
    want = {}
    for pattern in (DENSE, D16):
        out = generate(model, [ids], 24, pattern=pattern)[0, len(ids) :].tolist()
        eos = model.config.eos_token_id
        want[pattern] = tokenizer.decode(out[: out.index(eos)] if eos in out else out)

    with live_server(model, tokenizer) as live:
        columns = run_playground(live.url, prompt, 24, columns=2)
        for pattern, (shown, stats) in columns.items():
            assert shown == want[pattern]
            kv = live.engine.request_bytes(pattern, len(ids) + 24)
            assert f"KV {kv / 1024:.1f} KiB" in stats and "tokens/s" in stats


def _recording(engine) -> list:
    """Wrap ``engine.submit`` to keep every request it is given."""
    seen, submit = [], engine.submit

    def record(request):
        seen.append(request)
        return submit(request)

    engine.submit = record
    return seen


def test_a_double_click_runs_once_per_column(model, tokenizer):
    """Two clicks in a row on Generate: the button is disabled while a run is on, so each column gets
    one run (its solo greedy text once, not two runs written into it) and the server one request."""
    prompt = "To be, or not to be"
    ids = tokenizer.encode(prompt).ids
    with live_server(model, tokenizer) as live:
        seen = _recording(live.engine)
        columns = run_playground(live.url, prompt, 16, columns=2, double_click=True)
        for pattern, (shown, _) in columns.items():
            out = generate(model, [ids], 16, pattern=pattern)[0, len(ids) :].tolist()
            eos = model.config.eos_token_id
            assert shown == tokenizer.decode(out[: out.index(eos)] if eos in out else out)
        assert sorted(r.pattern for r in seen) == sorted([DENSE, D16])


def test_an_empty_max_tokens_field_sends_its_default(model, tokenizer):
    """An empty max-tokens field sends the field's default (64), shown back in the field, never null
    (which the server reads as the rest of the context)."""
    with live_server(model, tokenizer) as live:
        seen = _recording(live.engine)
        run_playground(live.url, "Once upon a time", "", columns=2, expect_max_tokens="64")
        assert [r.max_tokens for r in seen] == [64, 64]


def test_the_playground_sends_the_api_key_it_is_given(model, tokenizer):
    """A server started with --api-key: the page says it needs the key, then streams with it."""
    prompt = "Once upon a time"
    ids = tokenizer.encode(prompt).ids
    with live_server(model, tokenizer, api_key="s3cret-key") as live:
        columns = run_playground(live.url, prompt, 8, columns=2, api_key="s3cret-key")
    eos = model.config.eos_token_id
    for pattern in (DENSE, D16):
        out = generate(model, [ids], 8, pattern=pattern)[0, len(ids) :].tolist()
        text, stats = columns[pattern]
        assert text == tokenizer.decode(out[: out.index(eos)] if eos in out else out), pattern
        assert "tokens/s" in stats


def run_playground(
    url: str,
    prompt: str,
    max_tokens: int | str,
    columns: int,
    timeout: float = 60,
    double_click: bool = False,
    expect_max_tokens: str | None = None,
    api_key: str | None = None,
) -> dict[str, tuple]:
    """Open the playground at ``url`` in headless Chromium, submit ``prompt`` (``double_click``: two
    clicks in a row), wait until every one of its ``columns`` pattern columns is done; returns pattern
    -> (output text, stats line). ``expect_max_tokens``: what the max-tokens field must show after the
    click. ``api_key``: the page must first say it needs a key, then list the columns once the key
    is typed into its key field. Keeps a screenshot at $RATPLUS_PLAYGROUND_SCREENSHOT when set."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver, profile = _browser()
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, timeout)
        if api_key is not None:
            wait.until(lambda d: "API key" in d.find_element(By.ID, "notice").text)
            assert not driver.find_elements(By.CSS_SELECTOR, ".col")
            key = driver.find_element(By.ID, "api_key")
            key.send_keys(api_key)
            key.send_keys(Keys.TAB)  # the change event: the page lists the patterns with the key
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".col")) == columns)
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        tokens = driver.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys(str(max_tokens))
        button = driver.find_element(By.ID, "submit")
        if double_click:
            ActionChains(driver).double_click(button).perform()
        else:
            button.click()
        if expect_max_tokens is not None:
            assert tokens.get_attribute("value") == expect_max_tokens
        wait.until(lambda d: d.find_element(By.ID, "submit").is_enabled())
        wait.until(lambda d: all(c.get_attribute("data-done") for c in d.find_elements(By.CSS_SELECTOR, ".col")))
        found = {
            col.get_attribute("data-pattern"): (
                col.find_element(By.CSS_SELECTOR, ".out").get_attribute("textContent"),
                col.find_element(By.CSS_SELECTOR, ".stats").text,
            )
            for col in driver.find_elements(By.CSS_SELECTOR, ".col")
        }
        if SCREENSHOT:
            Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(SCREENSHOT)
        return found
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
