"""The studio page in a real browser: Debian's headless Chromium driven by Playwright."""

import os
import shutil

import httpx
import pytest

from test_serve import alone

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to test the studio page")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium: apt-get install chromium to test the studio page", allow_module_level=True)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, served):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(served["url"] + "/")
    page.wait_for_selector(".style-slider >> nth=2")
    yield page
    page.close()


@pytest.fixture(scope="module")
def keyed(served, tmp_path_factory):
    """A second server that asks for the key "s3cret", on a copy of the styles where noir has both
    pictures eval-text draws: noir.png (the sweep, 320 px wide) and noir-front.png (640 px)."""
    from hnkit.plot import line_plot
    from hnkit.testing import ServerThread

    styles = tmp_path_factory.mktemp("keyed") / "styles"
    shutil.copytree(served["styles"], styles)
    line_plot({"noir": [(0, 0), (2, 10)]}, styles / "noir-front.png", title="Pareto front", size=(640, 400))
    server = ServerThread(served["model"], styles, api_key="s3cret", max_batch=2)
    yield server
    server.close()


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
    assert page.text_content("#status").startswith("tokens: max_tokens")
    assert page.locator(".invalid").evaluate_all("(es) => es.map((e) => e.id)") == ["max-tokens"]
    page.fill("#max-tokens", "8")


def wait_done(page):
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')")


def test_the_front_fills_its_panel_and_enlarges_on_a_click(page):
    front = page.locator("img.front")
    panel = front.evaluate("(e) => e.parentElement.clientWidth")
    assert panel >= 250 and abs(front.bounding_box()["width"] - panel) <= 2
    assert not page.locator("#zoom").evaluate("(e) => e.open")
    front.click()
    assert page.locator("#zoom").evaluate("(e) => e.open")
    assert page.locator("#zoom img").evaluate("(e) => e.src") == front.evaluate("(e) => e.src")
    assert page.locator("#zoom img").bounding_box()["width"] >= 2 * panel  # 92% of the 1200 px window
    page.keyboard.press("Escape")
    assert not page.locator("#zoom").evaluate("(e) => e.open")


def test_serve_shows_the_pareto_front_before_the_sweep(tmp_path):
    from hnkit.commands.serve import front_pictures

    for name in ("noir.png", "noir-front.png", "whimsy.png", "gothic-front.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    fronts = front_pictures(tmp_path, ["noir", "whimsy", "gothic", "gothic-front", "pastel"])
    # gothic-front.png is the picture of the style gothic-front (its sweep), not gothic's front
    assert fronts == {"noir": tmp_path / "noir-front.png", "whimsy": tmp_path / "whimsy.png",
                      "gothic-front": tmp_path / "gothic-front.png"}


def test_keep_appends_the_continuation_and_undo_restores_the_story(page, served):
    greedy(page, 5)
    page.click("#reset")
    set_slider(page, "noir", 1.0)
    page.fill("#prompt", "Once upon")
    assert page.locator("#keep").is_disabled() and page.locator("#undo").is_disabled()
    page.click("#generate")
    wait_done(page)
    first = alone(served, "Once upon", {"noir": 1.0}, 5)
    page.click("#keep")
    assert page.input_value("#prompt") == "Once upon" + first
    assert page.locator("#keep").is_disabled()  # kept once
    page.click("#generate")  # the next continuation goes on from the story as kept
    wait_done(page)
    second = alone(served, "Once upon" + first, {"noir": 1.0}, 5)
    page.click("#keep")
    assert page.input_value("#prompt") == "Once upon" + first + second
    history = page.locator("#history li .story")
    assert history.nth(0).text_content() == second and history.nth(1).text_content() == first
    page.click("#undo")
    assert page.input_value("#prompt") == "Once upon" + first
    page.locator("#history li").nth(0).locator("button").click()  # any continuation in the history
    assert page.input_value("#prompt") == "Once upon" + first + second
    page.click("#undo")
    page.click("#undo")
    assert page.input_value("#prompt") == "Once upon" and page.locator("#undo").is_disabled()


def test_a_column_of_the_comparison_can_be_kept(page, served):
    greedy(page, 4)
    page.fill("#prompt", "The rain")
    page.fill("#factors", "0, 1")
    page.click("#compare")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('compared')")
    page.locator("#columns .column").nth(1).locator("button.keep").click()
    assert page.input_value("#prompt") == "The rain" + alone(served, "The rain", {"noir": 1.0}, 4)
    page.click("#undo")
    assert page.input_value("#prompt") == "The rain"


def test_a_bad_strength_names_the_field_it_came_from(served):
    def param(**body):
        answer = httpx.post(served["url"] + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **body})
        assert answer.status_code == 400
        return answer.json()["error"]["param"]

    assert param(model="tiny+noir:9") == "model"
    assert param(model="tiny+noir:inf") == "model"
    assert param(model="tiny+pastel") == "model"
    assert param(model="tiny", hypernetworks={"noir": 9}) == "hypernetworks"
    assert param(model="tiny", hypernetworks={"noir": "x"}) == "hypernetworks"
    assert param(model="tiny", hypernetworks={"pastel": 1}) == "hypernetworks"
    assert param(model="tiny+noir:9", hypernetworks={"noir": 1, "gothic": 9}) == "hypernetworks"


def test_a_bad_strength_marks_the_control_that_set_it(page):
    greedy(page, 4)
    page.click("#reset")
    set_slider(page, "gothic", 1.0)
    page.fill("#factors", "1, 9")  # gothic at 9: past the largest strength
    page.click("#compare")
    page.wait_for_function("() => document.querySelector('#status').className === 'error'")
    assert page.text_content("#status").startswith("factors: style 'gothic': strength 9 is outside")
    assert page.locator(".invalid").evaluate_all("(es) => es.map((e) => e.id)") == ["factors"]
    page.fill("#factors", "1")
    page.click("#compare")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('compared')")
    assert page.locator(".invalid").count() == 0


def test_the_page_says_whether_the_server_stacked_its_styles(page, served):
    info = httpx.get(served["url"] + "/hnkit/styles").json()
    assert info["stacked"] is True and served["server"].engine.stack is not None
    assert page.text_content("#stacked").startswith("stacked: ")


def test_no_sideways_scrolling_on_a_narrow_screen(page):
    page.fill("#prompt", "A" * 60 + " the night was long")  # a word too long for the line
    page.click("#generate")
    wait_done(page)
    try:
        for width in (420, 360):
            page.set_viewport_size({"width": width, "height": 900})
            assert page.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            sidebar, story = page.locator("aside").bounding_box(), page.locator("#prompt").bounding_box()
            assert story["y"] > sidebar["y"] + sidebar["height"]  # one column: the styles above the story
        if os.environ.get("HNKIT_STUDIO_SCREENSHOT"):
            page.set_viewport_size({"width": 420, "height": 900})
            page.screenshot(path=os.environ["HNKIT_STUDIO_SCREENSHOT"].replace(".png", "-420.png"), full_page=True)
    finally:
        page.set_viewport_size({"width": 1200, "height": 900})


def test_an_error_goes_once_the_key_is_right(browser, keyed):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(keyed.url + "/")
        page.wait_for_function("() => document.querySelector('#status').className === 'error'")
        assert "401" in page.text_content("#status")
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector(".style-slider >> nth=2")
        assert page.text_content("#status") == "" and page.get_attribute("#status", "class") == ""
        # the picture served is the Pareto front (640 px), not the sweep (320 px)
        page.wait_for_function("() => document.querySelector('img.front').naturalWidth > 0")
        assert page.locator("img.front").evaluate("(e) => e.naturalWidth") == 640
        page.fill("#api-key", "wrong")
        greedy(page, 3)
        page.click("#generate")
        page.wait_for_function("() => document.querySelector('#status').className === 'error'")
        assert page.text_content("#status") == "invalid API key"
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("() => document.querySelector('#status').className !== 'error'")
        page.click("#generate")
        wait_done(page)
    finally:
        page.close()


def test_the_sliders_follow_the_styles_folder(browser, served, tmp_path):
    import time

    from transformers import AutoModelForCausalLM

    import hnkit
    from hnkit.testing import ServerThread

    styles = tmp_path / "styles"
    shutil.copytree(served["styles"], styles)
    server = ServerThread(served["model"], styles)  # lists its folder every 2 s (hnkit serve's default)
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_selector(".style-slider >> nth=2")
        set_slider(page, "noir", 0.5)
        model = AutoModelForCausalLM.from_pretrained(served["model"])
        config = hnkit.HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu")
        hnkit.save(hnkit.Hypernetwork.for_model(model, config, description="soft colours"), styles / "pastel.safetensors")
        os.remove(styles / "gothic.safetensors")
        deadline = time.time() + 15
        while "pastel" not in server.engine.names or "gothic" in server.engine.names:
            assert time.time() < deadline, server.lines
            time.sleep(0.1)
        page.evaluate("window.dispatchEvent(new Event('focus'))")  # coming back to the page lists them again
        page.wait_for_selector('.style-slider[data-style="pastel"]', timeout=10_000)
        assert page.locator('.style-slider[data-style="gothic"]').count() == 0
        pastel = page.locator(".style", has=page.locator('[data-style="pastel"]'))
        assert "soft colours" in pastel.inner_text() and f"trained on {model.config._name_or_path}" in pastel.inner_text()
        assert page.locator('.style-slider[data-style="noir"]').input_value() == "0.5"  # kept its strength
    finally:
        page.close()
        server.close()


def test_a_pasted_paragraph_becomes_a_slider_that_generate_uses(browser, served, tmp_path):
    from test_serve_generated import EXAMPLES, alone as alone_made, name_of

    from hnkit.testing import ServerThread, build_tiny_generator

    tiny = {"model": served["model"], "styles": served["styles"],
            "generator": build_tiny_generator(served["model"], tmp_path / "gen.safetensors")}
    server = ServerThread(served["model"], served["styles"], generator=tiny["generator"])
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(server.url + "/")
        page.wait_for_selector(".style-slider >> nth=2")
        page.fill("#example", "too short")
        page.click("#make-style")
        page.wait_for_function("() => document.querySelector('#status').className === 'error'")
        assert page.text_content("#status").startswith("paragraph: example: the example is too short")
        assert page.locator(".invalid").evaluate_all("(es) => es.map((e) => e.id)") == ["example"]
        page.fill("#example", EXAMPLES[4])
        page.click("#make-style")
        name = name_of(EXAMPLES[4])
        slider = page.locator(f'.style-slider[data-style="{name}"]')
        slider.wait_for()
        assert page.locator(".style-slider").evaluate_all("(es) => es.map((e) => e.dataset.style)") == [
            "gothic", "noir", "whimsy", name]  # beside the others
        assert slider.input_value() == "1" and page.text_content("#status").startswith(f"made {name} from ")
        assert page.locator(".invalid").count() == 0
        greedy(page, 8)
        page.fill("#prompt", "The grammar of")
        page.click("#generate")
        wait_done(page)
        assert f"{name} 1" in page.text_content("#status")
        assert page.text_content("#output") == "The grammar of" + alone_made(tiny, {EXAMPLES[4]: 1.0}, 8,
                                                                             prompt="The grammar of")
    finally:
        page.close()
        server.close()
