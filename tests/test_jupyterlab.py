"""End to end in JupyterLab, as a newcomer works: headless Chromium opens ``00_explore``, runs every cell, watches the
live view redraw while a run trains, then clicks through the explorer. Screenshots go to ``build/screenshots/``.

The browser is the system's Chromium (Debian's ``chromium`` package; ``make test`` installs it where it can),
driven by Playwright, which downloads nothing. Without one the test is skipped, saying why, only on a machine
that has no way to install it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "screenshots"
MINUTE = 60_000  # ms


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("Chromium is missing, though this machine can install it: run `make browser` (`make test` does).")
    pytest.skip("no Chromium here, and no way to install it (Debian's chromium package needs root and apt-get)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on the loopback address, with a token, over a copy of notebooks/ and results/."""
    pytest.importorskip("playwright")
    chromium = _chromium()
    root = tmp_path_factory.mktemp("lab")
    for folder in ("notebooks", "results"):
        shutil.copytree(ROOT / folder, root / folder)
    token, port = secrets.token_hex(16), _free_port()
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news toast
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(root / ".config"),
        "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
    }
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--allow-root",
    ]
    log = (root / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (root / "lab.log").read_text()
                time.sleep(0.25)
        else:
            pytest.fail(f"JupyterLab did not start within a minute:\n{(root / 'lab.log').read_text()}")
        yield chromium, base, token
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _kernel_ready(base: str, token: str, path: str) -> None:
    """Wait until the server runs an idle kernel for the notebook at ``path`` (JupyterLab started it by itself)."""
    import json

    for _ in range(480):
        sessions = json.load(urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5))
        if any(s["path"] == path and s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        time.sleep(0.25)
    pytest.fail(f"JupyterLab started no kernel for {path} within 2 minutes")


def _image(page, selector: str) -> str | None:
    """Return a digest of the image ``selector`` shows now (None if there is none)."""
    src = page.evaluate(f"() => {{ const i = document.querySelector({selector!r}); return i ? i.src : null; }}")
    return hashlib.sha1(src.encode()).hexdigest() if src else None


def _redrawn(page, selector: str, before: str | None) -> str:
    """Wait until the image ``selector`` shows something other than ``before``; return its digest."""
    for _ in range(200):
        now = _image(page, selector)
        if now is not None and now != before:
            return now
        page.wait_for_timeout(50)
    pytest.fail(f"{selector} was not redrawn within 10 s")


def test_explore_and_watch_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    chromium, base, token = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/notebooks/00_explore.ipynb?token={token}")
            status = page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator")
            _kernel_ready(base, token, "notebooks/00_explore.ipynb")  # started from the notebook's own kernelspec
            expect(status).to_have_attribute("data-status", "idle", timeout=MINUTE)
            expect(page.locator(".jp-NotebookPanel-toolbar .jp-KernelName")).to_contain_text("Python 3")
            assert page.locator(".jp-Dialog").count() == 0, "a dialog (Select Kernel?) met the user on first open"

            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            # the live view: the last cell's figure redraws while the run trains
            live = ".jp-NotebookPanel .jp-CodeCell:nth-last-of-type(2) .jp-OutputArea-output img"  # before the summary
            seen, deadline = [], time.monotonic() + 5 * 60
            expect(status).to_have_attribute("data-status", "busy", timeout=MINUTE)
            while time.monotonic() < deadline:
                shown = _image(page, live)
                if shown and shown not in seen:
                    seen.append(shown)
                if status.get_attribute("data-status") == "idle":
                    break
                page.wait_for_timeout(50)
            else:
                pytest.fail("the notebook did not finish within 5 minutes")
            assert (
                page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
                or "Error" not in page.locator(".jp-OutputArea-output").all_inner_texts()
            )
            assert len(seen) >= 2, f"the live figure was drawn {len(seen)} time(s) while the run trained"
            last = page.locator(".jp-NotebookPanel .jp-CodeCell").nth(-2)
            last.scroll_into_view_if_needed()
            last.screenshot(path=SHOTS / "live_view.png")

            # the explorer: choose other results and an optimizer; the figure and the caption follow
            panel = page.locator(".widget-vbox").first
            panel.scroll_into_view_if_needed()
            caption = panel.locator(".widget-html").first
            image = "img.widget-image"
            first = "results 03_lr_sweep, problem digits MLP, optimizer Adam, lr 0.001"  # the notebook's start_*
            expect(caption).to_contain_text(first, timeout=MINUTE)
            before = _image(page, image)
            panel.screenshot(path=SHOTS / "explorer_start.png")
            panel.get_by_label("results", exact=True).select_option("02_optimizers")
            expect(caption).to_contain_text("results 02_optimizers, problem digits MLP, optimizer Adam")
            after_results = _redrawn(page, image, before)
            panel.get_by_label("optimizer", exact=True).select_option("SGD")
            expect(caption).to_contain_text("optimizer SGD, lr 0.05")
            _redrawn(page, image, after_results)
            expect(panel.locator("table.alphalib-epochs")).to_contain_text("median α*/lr")
            panel.screenshot(path=SHOTS / "explorer_changed.png")

            # the table scrolls in its own box, in the notebook's text size; its last epoch can be brought into view
            box = panel.locator(".alphalib-scroll")
            row = panel.locator("table.alphalib-epochs tbody tr").last
            expect(row).to_contain_text("20")  # 02_optimizers trained 20 epochs
            assert row.evaluate("r => getComputedStyle(r.cells[0]).fontSize") == "14px"

            def bottom(locator) -> float:
                area = locator.bounding_box()
                return area["y"] + area["height"]

            assert bottom(row) > bottom(box) + 1, "the last row shows without scrolling: nothing to test"
            row.scroll_into_view_if_needed()
            assert box.evaluate("b => b.scrollTop") > 0 and bottom(row) <= bottom(box) + 1
            box.screenshot(path=SHOTS / "explorer_table_scrolled.png")
            page.screenshot(path=SHOTS / "lab.png")
        finally:
            page.screenshot(path=SHOTS / "last_state.png")
            browser.close()
