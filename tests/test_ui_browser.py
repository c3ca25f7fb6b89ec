"""`customdiff ui` in a real browser: Playwright drives Debian's Chromium against a real server on the toy base.

Screenshots of each step go to $CUSTOMDIFF_UI_SCREENSHOTS, or to the test's tmp_path/screenshots.
Without Chromium (or Playwright) the tests skip, except under CI=true, where they fail: CI must run them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from ui_server import UIServer, toy_concept

CHROMIUM = os.environ.get("CUSTOMDIFF_CHROMIUM", "/usr/bin/chromium")
# the machine has no network: without these, Chromium spends its time on updates, sync and GPU probing
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install 'customdiff[ui,dev]')"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set CUSTOMDIFF_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing_browser()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser tests must run in CI: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("CUSTOMDIFF_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def server(tmp_path):
    s = UIServer(tmp_path / "work", tmp_path / "server.log").start()
    yield s
    assert s.stop() == 0, (tmp_path / "server.log").read_text()


def _page(browser, url: str, downloads: bool = False):
    # bypass_csp: wait_for_function evaluates its expression, which the page's CSP (no eval) would refuse
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=downloads, bypass_csp=True)
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page


def test_teach_watch_sample_download(browser, server, shots, tmp_path):
    """Upload a toy concept's photos, train 30 steps, watch it reach 100%, sample, download and load the delta."""
    from customdiff.delta import load_delta

    photos, cls = toy_concept()
    page = _page(browser, server.url, downloads=True)
    page.screenshot(path=shots / "01-open.png", full_page=True)

    page.set_input_files("#photos", sorted(str(p) for p in photos.glob("*.png")))
    assert page.locator("#thumbs img").count() == len(list(photos.glob("*.png")))
    page.fill("#class-word", cls)
    page.click("#advanced summary")
    page.fill("#steps", "30")
    page.fill("#preview-every", "10")
    page.fill("#preview-steps", "8")
    page.fill("#checkpoint-every", "10")
    page.screenshot(path=shots / "02-photos.png", full_page=True)
    page.click("#teach-button")

    # live progress: the bar moves while the job runs (or it is already past the checks)
    page.wait_for_function("document.querySelector('#job')?.dataset.state === 'running' && "
                           "Number(document.querySelector('#job-step').textContent) > 0", timeout=120_000)
    job_id = page.get_attribute("#job", "data-id")
    # the "queued" notice went with the queue
    page.wait_for_function("document.querySelector('#message').hidden", timeout=10_000)
    page.screenshot(path=shots / "03-training.png", full_page=True)

    # a second tab and a reload show the same job
    other = page.context.new_page()
    other.goto(server.url)
    other.wait_for_selector("body[data-ready='1']")
    other.wait_for_function("document.querySelector('#job')?.dataset.id !== undefined")
    assert other.get_attribute("#job", "data-id") == job_id
    other.screenshot(path=shots / "04-second-tab.png", full_page=True)
    other.close()
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.get_attribute("#job", "data-id") == job_id

    page.wait_for_function("document.querySelector('#job').dataset.state === 'done'", timeout=300_000)
    assert page.inner_text("#job-percent") == "100%"
    assert page.inner_text("#job-step") == "30"
    assert re.match(r"\d+\.\d{4}$", page.inner_text("#job-loss"))
    page.wait_for_function("[...document.querySelectorAll('#previews img')].length > 0 && "
                           "[...document.querySelectorAll('#previews img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#previews figcaption").first.inner_text().endswith("at step 30")
    page.screenshot(path=shots / "05-done.png", full_page=True)

    # sample with the new delta
    page.click("#job-sample")
    page.wait_for_selector("#sample:not([hidden])")
    page.wait_for_function("document.querySelectorAll('#sample-deltas input:checked').length === 1")
    assert "<new1>" in page.input_value("#prompts")
    page.fill("#prompts", f"photo of a <new1> {cls}\nphoto of a <new1> {cls} at night")
    page.fill("#sample-n", "2")
    page.fill("#sample-steps", "8")
    page.click("#sample-button")
    page.wait_for_function("document.querySelectorAll('#sample-images img').length === 4 && "
                           "[...document.querySelectorAll('#sample-images img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=120_000)
    assert "seed 0, 8 steps" in page.inner_text("#sample-info")
    page.wait_for_function("document.querySelector('#sample-grid').naturalWidth > 0")
    with page.expect_download() as dl:
        page.locator("#sample-images a").first.click()
    assert dl.value.suggested_filename.endswith("0000.png")
    page.screenshot(path=shots / "06-sample.png", full_page=True)

    # the library lists it; its Download button gives a delta that loads
    page.click("#tab-library")
    row = page.locator("#deltas tbody tr").first
    row.wait_for()
    assert "<new1>" in row.inner_text() and cls in row.inner_text()
    page.screenshot(path=shots / "07-library.png", full_page=True)
    with page.expect_download() as dl:
        row.get_by_text("Download").click()
    saved = tmp_path / dl.value.suggested_filename
    dl.value.save_as(saved)
    delta = load_delta(saved)
    assert list(delta.tokens) == ["<new1>"]
    assert delta.token_info[0]["class"] == cls
    assert delta.config["steps"] == 30 and delta.param_names()
    page.context.close()


def test_bad_input_is_a_message_in_the_page(browser, server, shots, tmp_path):
    """Too few photos, an unreadable image, a token already in the vocabulary, a delta for another base."""
    import torch

    from customdiff.delta import Delta, save_delta

    photos, cls = toy_concept()
    good = sorted(str(p) for p in photos.glob("*.png"))
    page = _page(browser, server.url)

    def teach_and_read(shot: str) -> str:
        page.click("#teach-button")
        page.wait_for_selector("#message:not([hidden])")
        page.wait_for_function("document.querySelector('#message-text').textContent.length > 0")
        text = page.inner_text("#message-text")
        page.screenshot(path=shots / shot)
        page.click("#message-close")
        return text

    page.fill("#class-word", cls)
    page.set_input_files("#photos", good[:2])
    assert "2 photo(s): give 3 to 20 photos" in teach_and_read("bad-01-too-few-photos.png")

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    page.set_input_files("#photos", [*good[:3], str(broken)])
    msg = teach_and_read("bad-02-unreadable-image.png")
    assert msg.startswith("broken.png: not a readable image"), msg
    assert str(tmp_path) not in msg and str(server.workdir) not in msg  # no server path in the page

    page.set_input_files("#photos", good[:3])
    page.fill("#token", cls)
    assert "already in the vocabulary" in teach_and_read("bad-03-token-in-vocabulary.png")
    page.fill("#token", "<new1>")
    page.fill("#class-word", "two words")
    assert "give one word" in teach_and_read("bad-04-class-word.png")
    page.fill("#class-word", cls)
    # a value the browser refuses inside the folded Advanced section: Teach did nothing at all, with no message
    page.evaluate("document.querySelector('#advanced').open = false; document.querySelector('#steps').value = '0'")
    page.click("#teach-button")
    page.wait_for_function("document.querySelector('#advanced').open")
    assert page.evaluate("document.querySelector('#steps').matches(':invalid')")
    page.screenshot(path=shots / "bad-05-steps-in-folded-section.png")
    page.fill("#steps", "30")
    assert page.locator("#job-list li").count() == 0  # nothing was queued
    assert not any((server.workdir / "jobs").iterdir())  # and nothing was left behind

    other = Delta(weights={"down_blocks.7.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 4)},
                  tokens={"<new1>": torch.zeros(4)}, trained="crossattn_kv", base={"name": "another-model"},
                  token_info=[{"token": "<new1>", "initializer": "ktn", "class": "cat"}])
    path = tmp_path / "other base.safetensors"
    save_delta(other, path)
    page.click("#tab-library")
    page.set_input_files("#delta-upload", str(path))
    page.wait_for_selector("#message:not([hidden])")
    msg = page.inner_text("#message-text")
    assert msg.startswith("other base.safetensors: made for another base"), msg
    assert page.locator("#deltas tbody tr").count() == 0
    page.screenshot(path=shots / "bad-06-delta-for-another-base.png")
    page.context.close()
