"""The web page in a real browser: `ditkit serve` on a freshly trained tiny checkpoint, headless
Chromium (Debian's system package, driven by Playwright; nothing is downloaded) loads the page,
clicks Generate and sees the images rendered.

Without Playwright or /usr/bin/chromium the test is skipped, unless DITKIT_REQUIRE_BROWSER=1 (set
by .ci/run), where it fails instead: CI must not pass without having run it.
Set DITKIT_UPDATE_SCREENSHOT=1 to also refresh docs/serve_screenshot.png.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the browser: .ci/run runs it as its second step

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DITKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def browser():
    """The sync Playwright API, checked with the system Chromium and the serve extra before any
    work; a skip when missing (a failure when DITKIT_REQUIRE_BROWSER=1)."""
    problems = []
    for module in ("fastapi", "uvicorn", "httpx"):
        try:
            __import__(module)
        except ImportError:
            problems.append(f"{module} is not installed: pip install -e '.[dev]'")
    sync_playwright = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        problems.append(f"playwright is not installed ({err}): pip install playwright")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set DITKIT_CHROMIUM)")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("DITKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test is required here (DITKIT_REQUIRE_BROWSER=1) but cannot run: {message}")
        pytest.skip(message)
    return sync_playwright


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url, proc, timeout=60):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ditkit serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"ditkit serve did not answer {url}/health within {timeout} s")


@pytest.fixture
def server(tmp_path, browser):
    """``ditkit serve`` (a subprocess, as a user runs it) on a shapes_tiny checkpoint; yields the URL."""
    from ditkit.recipes import get_recipe
    from ditkit.train.loop import train

    cfg = get_recipe("shapes_tiny")  # trained here, in-process: a second interpreter costs seconds
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path / "runs"), "shapes-demo"
    cfg.train.max_steps = cfg.train.ckpt_every = 6
    run_dir = train(cfg, log=lambda line: None).run_dir
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditkit", "serve", "--ckpt", str(run_dir),
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_page_generates_and_shows_images_in_headless_chromium(browser, server, tmp_path):
    sync_playwright = browser
    profile = tmp_path / "chromium-profile"  # a fresh --user-data-dir
    shot = tmp_path / "serve_screenshot.png"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 760},
        )
        try:
            page = context.new_page()
            console_errors = []
            page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
            page.goto(server + "/", wait_until="domcontentloaded")
            # (waits use selectors: the page's CSP forbids the eval that wait_for_function polls with)
            page.locator("#class option").nth(4).wait_for(state="attached", timeout=15000)
            assert page.input_value("#model") == "shapes-demo"
            assert page.locator("#class option").count() == 5  # "each class in turn" + 4 shapes
            page.fill("#num-images", "8")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_selector("#gallery img.sample", timeout=30000)
            # every image decoded to real pixels: 16x16 PNGs from the server, shown at 128 px
            sizes = page.eval_on_selector_all(
                "#gallery img.sample", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.width])"
            )
            assert sizes == [[True, 16, 16, 128]] * 8
            settings = page.inner_text("#gallery .card .settings")
            assert "shapes-demo" in settings and "dpm++" in settings and "cfg" in settings
            assert page.inner_text("#gallery figcaption") == "circle · seed 7"
            assert page.is_hidden("#error") and page.is_enabled("#generate")  # finished, no error shown
            assert not console_errors, console_errors
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert shot.stat().st_size > 10_000  # a real picture, not an empty page
    if os.environ.get("DITKIT_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "serve_screenshot.png")
