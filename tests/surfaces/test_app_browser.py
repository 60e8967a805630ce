"""The web app end to end: `conceptattention app` on a free loopback port, driven in headless Chromium.

Uses Debian's chromium (``/usr/bin/chromium``, installed by ``.ci/run``) through Playwright; a
missing browser fails these tests rather than skipping them. Set ``CONCEPTATTENTION_APP_SCREENSHOTS``
to a folder (``docs/app``) to save a screenshot of each tab after its run.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

import conceptattention as ca
from conceptattention.app import logic

CHROMIUM = os.environ.get("CONCEPTATTENTION_CHROMIUM", "/usr/bin/chromium")
# As root in a closed network: no sandbox, and nothing that phones home (or waits for it).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 180
RUN_TIMEOUT_MS = 120_000
TIMINGS: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("conceptattention")  # the installed `conceptattention` command
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "conceptattention.cli"]
    return [*base, "app", "--port", str(port)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`conceptattention app` with the bundled model; yields (url, launch time, log path)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(_command(port), stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"`conceptattention app` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - started > START_TIMEOUT_S:
                pytest.fail(f"`conceptattention app` did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        TIMINGS["server_up_s"] = time.perf_counter() - started
        yield url, started, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's browser (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(RUN_TIMEOUT_MS)
    page.goto(server[0])
    yield page
    context.close()


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("CONCEPTATTENTION_APP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def _set_number(page, selector: str, value: str) -> None:
    """Type into a Gradio number field (a slider's box too) and commit it."""
    box = page.locator(f"{selector} input[type=number]")
    box.fill(value)
    box.press("Enter")
    box.blur()


def _overlay_captions(page, prefix: str, count: int) -> list[str]:
    items = page.locator(f"#{prefix}-overlays .thumbnail-item")
    page.wait_for_function(
        f"() => document.querySelectorAll('#{prefix}-overlays .thumbnail-item img').length === {count} && "
        f"[...document.querySelectorAll('#{prefix}-overlays .thumbnail-item img')].every(i => i.naturalWidth > 0)"
    )
    return [items.nth(i).locator(".caption-label").inner_text().strip() for i in range(count)]


def _download(page, prefix: str) -> zipfile.ZipFile:
    with page.expect_download() as info:
        page.locator(f"#{prefix}-download a[download]").click()
    return zipfile.ZipFile(io.BytesIO(Path(info.value.path()).read_bytes()))


def test_explain_an_uploaded_scene_then_bad_input(page, server, tmp_path):
    scene = logic.scene_examples(tmp_path, indices=(11,))[0]  # not one of the page's own examples
    concepts = [c.strip() for c in scene.concepts.split(",")]
    page.get_by_role("tab", name="Explain an image").click()
    page.locator("#exp-image button[aria-label='Remove Image']").click()  # the preloaded example
    page.locator("#exp-image input[type=file]").set_input_files(str(scene.path))
    page.wait_for_selector("#exp-image img[src*='gradio_api/file=']")
    page.locator("#exp-caption textarea").fill(scene.caption)
    page.locator("#exp-concepts textarea").fill("\n".join(concepts))  # one per line
    _set_number(page, "#exp-samples", "2")
    _set_number(page, "#exp-seed", "3")
    page.locator("#exp-run").click()

    assert _overlay_captions(page, "exp", len(concepts)) == concepts  # one overlay per concept
    TIMINGS["first_result_s"] = time.perf_counter() - server[1]
    assert page.locator("#exp-status").inner_text().startswith("Done in ")
    assert page.locator("#exp-segmentation img").count() == 1 and page.locator("#exp-strip img").count() == 1
    _screenshot(page, "explain.png")

    with _download(page, "exp") as bundle:
        names = set(bundle.namelist())
        with bundle.open("maps.npz") as handle, np.load(handle) as arrays:
            maps, saved_concepts = arrays["maps"], [str(c) for c in arrays["concepts"]]
        record = json.loads(bundle.read("metadata.json"))
    assert {"maps.npz", "metadata.json", "segmentation.png", "image.png", "overlay_grid.png"} <= names
    assert {f"heatmap_{i:02d}_{c}.png" for i, c in enumerate(concepts)} <= names
    assert saved_concepts == concepts
    assert (record["caption"], record["t"], record["num_samples"], record["seed"]) == (scene.caption, 0.5, 2, 3)
    pipe = ca.load_pipeline()
    expected = ca.encode_image(pipe, str(scene.path), concepts, caption=scene.caption, t=0.5, num_samples=2, seed=3)
    np.testing.assert_allclose(maps, expected.maps.numpy(), rtol=1e-5, atol=1e-6)

    # bad input: a readable line in the page, no traceback; then the app still works
    page.locator("#exp-concepts textarea").fill(" , \n")
    page.locator("#exp-run").click()
    error = page.locator("#exp-status .ca-status-error")
    error.wait_for()
    assert error.inner_text().startswith("Error: No concepts: type at least one word")
    assert page.locator("#exp-overlays .thumbnail-item").count() == 0
    assert "Traceback" not in page.locator("body").inner_text()
    page.locator("#exp-concepts textarea").fill(f"{concepts[0]}, {concepts[0]}")
    page.locator("#exp-run").click()
    page.wait_for_function("() => document.querySelector('#exp-status').innerText.includes('twice')")
    page.locator("#exp-concepts textarea").fill(concepts[0])
    page.locator("#exp-run").click()
    assert _overlay_captions(page, "exp", 1) == concepts[:1]
    print(f"\ntime from `conceptattention app` to the first result: {TIMINGS['first_result_s']:.1f} s "
          f"(server answering after {TIMINGS['server_up_s']:.1f} s)")  # fmt: skip


def _status_error(page, prefix: str) -> str:
    error = page.locator(f"#{prefix}-status .ca-status-error")
    error.wait_for()
    return error.inner_text()


def test_generate_tab_shows_one_overlay_per_concept(page):
    page.get_by_role("tab", name="Generate").click()
    # invalid choices first: a size the model cannot take, then no layer selected; both leave the app usable
    _set_number(page, "#gen-height", "33")
    page.locator("#gen-run").click()
    assert "height=33 cannot be taken by FluxPipeline" in _status_error(page, "gen")
    assert "must be a positive multiple of 2" in page.locator("#gen-status").inner_text()
    _set_number(page, "#gen-height", "32")
    page.locator("#layers .remove-all").click()
    page.locator("#gen-run").click()
    page.wait_for_function("() => document.querySelector('#gen-status').innerText.includes('No layers selected')")
    assert page.locator("#gen-status").inner_text() == (
        "Error: No layers selected: choose at least one block (double 0-3 or single 0 for this model)"
    )
    page.reload()  # back to the default layers
    page.locator("#gen-run").wait_for()
    page.locator("#gen-prompt textarea").fill("a photo of apple and plum on sand")
    page.locator("#gen-concepts textarea").fill("apple, plum, sand")
    _set_number(page, "#gen-steps", "4")
    page.locator("#gen-run").click()
    assert _overlay_captions(page, "gen", 3) == ["apple", "plum", "sand"]
    status = page.locator("#gen-status").inner_text()
    assert re.match(r"Done in [\d.]+ s: 3 concept\(s\), 4 denoising steps, layers \[0, 1, 2, 3\]", status), status
    with _download(page, "gen") as bundle:
        record = json.loads(bundle.read("metadata.json"))
    assert record["mode"] == "generate" and record["num_steps_run"] == 4 and record["prompt"].endswith("on sand")
    _screenshot(page, "generate.png")


def test_second_visitor_waits_in_the_queue_with_its_place_shown(browser, server):
    """Two visitors: the second one's run waits for the first (one job on the model) and shows its place."""
    pages = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(RUN_TIMEOUT_MS)
        page.goto(server[0])
        pages.append(page)
    first, second = pages
    _set_number(first, "#gen-steps", "100")  # a few seconds of denoising: the second visitor arrives meanwhile
    _set_number(first, "#gen-height", "48")
    second.get_by_role("tab", name="Explain an image").click()
    first.locator("#gen-run").click()
    first.wait_for_function("() => document.querySelector('#gen-overlays [data-testid=status-tracker]')"
                            ".innerText.includes('/100')")  # fmt: skip  # the first job is denoising
    second.locator("#exp-run").click()
    second.wait_for_function(
        "() => /queue: 1\\/1/.test(document.querySelector('#exp-overlays [data-testid=status-tracker]').innerText)"
    )
    assert _overlay_captions(first, "gen", 3) and first.locator("#gen-status").inner_text().startswith("Done")
    assert _overlay_captions(second, "exp", 3) and second.locator("#exp-status").inner_text().startswith("Done")
    for page in pages:
        page.context.close()
