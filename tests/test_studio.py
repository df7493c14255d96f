"""The studio page in a real browser: Debian's headless Chromium driven by Playwright."""

import os
import shutil

import pytest

from test_serve import alone

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to test the studio page")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium: apt-get install chromium to test the studio page", allow_module_level=True)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(served["url"] + "/")
        page.wait_for_selector(".style-slider >> nth=2")
        yield page
        browser.close()


def set_slider(page, style, value):
    page.locator(f'.style-slider[data-style="{style}"]').evaluate(
        "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(value))


def greedy(page, tokens):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(tokens))


def test_a_slider_per_style_and_the_front_picture(page):
    assert page.locator(".style-slider").evaluate_all("(es) => es.map((e) => e.dataset.style)") == ["gothic", "noir", "whimsy"]
    assert page.locator(".style-slider").first.get_attribute("min") == "-1"
    assert page.locator(".style-slider").first.get_attribute("max") == "2"
    front = page.locator("img.front")
    assert front.count() == 1 and front.get_attribute("alt") == "perplexity front of noir"
    page.wait_for_function("() => document.querySelector('img.front').naturalWidth > 0")
    assert page.text_content("#model") == "tiny"


def test_generate_streams_the_styled_continuation(page, served):
    greedy(page, 10)
    page.fill("#prompt", "The grammar of")
    set_slider(page, "noir", 1.0)
    set_slider(page, "whimsy", -0.5)
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')")
    expected = "The grammar of" + alone(served, "The grammar of", {"noir": 1.0, "whimsy": -0.5}, 10)
    assert page.text_content("#output") == expected
    assert "noir 1" in page.text_content("#status")


def test_side_by_side_strengths_from_one_seed(page, served):
    greedy(page, 8)
    page.fill("#prompt", "A statement")
    page.click("#reset")
    set_slider(page, "gothic", 1.0)
    page.fill("#factors", "0, 0.5, 1.5")
    page.click("#compare")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('compared')")
    columns = page.locator("#columns .column")
    assert columns.count() == 3
    for i, factor in enumerate((0, 0.5, 1.5)):
        styles = {"gothic": factor} if factor else {}
        assert columns.nth(i).locator(".story").text_content() == alone(served, "A statement", styles, 8)
    assert "bare model" in columns.nth(0).locator("h3").text_content()
    if os.environ.get("HNKIT_STUDIO_SCREENSHOT"):
        page.screenshot(path=os.environ["HNKIT_STUDIO_SCREENSHOT"], full_page=True)


def test_a_bad_request_shows_its_error_on_the_page(page):
    page.fill("#max-tokens", "0")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#status').className === 'error'")
    assert "max_tokens" in page.text_content("#status")
