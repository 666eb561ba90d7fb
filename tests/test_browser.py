"""The PromptConsole in a real browser: Voila serves a notebook, headless Chromium types a prompt and clicks Submit.

Skips only when no Chromium binary is installed (Debian's `chromium`); playwright and voila are dev dependencies.
The screenshot is written to bench-results/screenshots/prompt_console.png.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "bench-results" / "screenshots" / "prompt_console.png"
CHROMIUM_FLAGS = [  # --headless is added by playwright itself (headless=True)
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
CONSOLE_NOTEBOOK = [
    "from toolkit import Settings, TokenGeneratorPipeline, start_model_worker\n"
    "from toolkit.notebook import PromptConsole\n"
    "worker = start_model_worker(Settings(model='smollm2-135m-instruct', device='cpu', num_threads=1))\n"
    "console = PromptConsole(TokenGeneratorPipeline(worker), max_new_tokens=40)",
    "console",
]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float) -> None:
    """The server listens (GET / itself would already run the notebook)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server (it shuts its kernels down, which stop their workers), then kill what is left of it."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def voila_url(tmp_path: Path) -> Iterator[str]:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CONSOLE_NOTEBOOK])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "console.ipynb")
    port = free_port()
    log = (tmp_path / "voila.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", "console.ipynb", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
         "--VoilaExecutor.timeout=180", "--show_tracebacks=True"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    try:
        wait_for_port(port, timeout_s=60)
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_tree(proc)
        log.close()
        print((tmp_path / "voila.log").read_text(errors="replace")[-3000:])


def test_prompt_console_streams_an_answer_in_a_real_browser(voila_url: str) -> None:
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("no Chromium binary (Debian: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(voila_url, timeout=180_000)
            prompt = page.locator(".tk-prompt textarea")
            prompt.wait_for(timeout=180_000)
            prompt.fill("What is the capital of France? Tell me about it.")
            page.locator("button.tk-submit").click()

            pane, timing = page.locator(".tk-pane-text").first, page.locator(".tk-pane-timing").first
            seen: list[str] = []
            deadline = time.monotonic() + 120
            while not timing.inner_text().startswith("TTFT"):
                assert time.monotonic() < deadline, f"no answer in the pane; saw {seen}"
                text = pane.inner_text()
                if text.strip() and (not seen or seen[-1] != text):
                    seen.append(text)
                time.sleep(0.05)
            answer, timing_line = pane.inner_text(), timing.inner_text()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()

    assert "Paris" in answer
    assert len(seen) >= 3 and all(answer.startswith(s.strip()[:5]) for s in seen), "the text grew in place"
    assert len(answer) > len(seen[0]), "the pane showed part of the answer before all of it"
    assert "tokens/s" in timing_line and timing_line.endswith(("stop", "length"))
    assert SCREENSHOT.stat().st_size > 10_000
