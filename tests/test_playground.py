"""The playground: charrnn-serve's page at / in a real headless browser (Debian's chromium driven
by Playwright), the POST /v1/states endpoint behind its Neurons view, and Model.trace under it.

The browser tests run a real `charrnn-serve` on loopback with the shipped model (slow enough per
character that Stop lands mid-generation) and check what a user sees against the API's own
answers; every page must make no request off the server and raise no JavaScript error.
"""

import contextlib
import math
import re
import shutil
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")

import httpx  # noqa: E402
from conftest import CORPUS, SHIPPED, charrnn_serve  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_serve import model  # noqa: E402, F401 - the fixture: the tiny GRU, else the shipped model

import charrnn_runtime  # noqa: E402
from charrnn_runtime.engine import Engine  # noqa: E402
from charrnn_serve.app import create_app  # noqa: E402
from charrnn_serve.playground import MAX_STATES_CHARS, PAGES, STATIC  # noqa: E402
from charrnn_serve.security import SecurityOptions  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY = "sk-playground-test"
TEXT = "ROMEO:\nWhat says my love? O, speak again!\n\nJULIET:\nAy, my lord.\n"


# -- the runtime and the endpoint ------------------------------------------------------------

def test_trace_is_the_state_after_each_prefix(model_path):
    model = charrnn_runtime.load(model_path, "cpu")
    text = CORPUS.read_text(encoding="utf-8")[:12]
    traced = model.trace(text)
    for i in range(len(text)):
        state = model.feed(model.initial_state(), text[:i + 1])
        for t in model.state_spec:
            np.testing.assert_allclose(traced[t.input][0, i], state.arrays[t.input][0], atol=1e-5)
    two = model.trace(text[:3], model.feed(model.initial_state(), text).fork(2))
    assert all(two[t.input].shape == (2, 3, t.size) for t in model.state_spec)
    assert all(model.trace("")[t.input].shape == (1, 0, t.size) for t in model.state_spec)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(Engine(model)), base_url="http://127.0.0.1") as client:
        yield client


def test_states_are_each_characters_state_of_the_chosen_layer(client, model):
    text = CORPUS.read_text(encoding="utf-8")[:40]
    answer = client.post("/v1/states", json={"text": text}).json()
    spec = model.state_spec
    assert answer["layers"] == [{"layer": t.layer, "role": t.role, "size": t.size} for t in spec]
    assert (answer["layer"], answer["role"], answer["size"]) == (0, spec[0].role, spec[0].size)
    assert answer["tokens"] == list(text)
    np.testing.assert_allclose(answer["states"], model.trace(text)[spec[0].input][0], atol=5e-4)


@pytest.mark.parametrize("body, param", [
    ({"text": "a" * (MAX_STATES_CHARS + 1)}, "text"), ({"text": ""}, "text"), ({"text": "ROMEO€"}, "text"),
    ({"text": "a", "layer": 9}, "layer"), ({"text": "a", "role": "cell", "layer": 99}, "layer"),
    ({"text": "a", "model": "another"}, "model")])
def test_states_refuses_what_it_cannot_answer_naming_the_field(client, body, param):
    response = client.post("/v1/states", json=body)
    assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


def test_the_page_is_public_and_held_to_this_server_the_states_are_not(model):
    app = create_app(Engine(model), security=SecurityOptions(api_keys=(KEY,)))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for path, (name, media_type) in PAGES.items():
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
            assert "default-src 'none'" in response.headers["content-security-policy"]
            assert not re.search(r"https?://", (STATIC / name).read_text(encoding="utf-8"))  # no other origin named
        assert client.post("/v1/states", json={"text": "a"}).status_code == 401
        keyed = client.post("/v1/states", json={"text": "a"}, headers={"authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200


# -- the page in a browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs Playwright: pip install playwright (the [test] extra; .ci/run installs it)")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with charrnn_serve("--model", str(SHIPPED)) as (_, url):
        yield url


@contextlib.contextmanager
def playground(browser, url, expected_errors=None):
    """The page at `url` in a fresh browser context. At the end: every request it made went to
    `url`'s server, and no JavaScript error happened (console errors matching `expected_errors` aside)."""
    context = browser.new_context()
    page = context.new_page()
    requests, errors = [], []
    context.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(url)
    yield page
    context.close()
    assert requests and all(urlsplit(r).netloc == urlsplit(url).netloc for r in requests), requests
    assert [e for e in errors if not (expected_errors and re.search(expected_errors, e))] == []


def api(url, path, **body):
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    response.raise_for_status()
    return response.json()


def finished(page):
    """Wait until the page's generation has ended by itself."""
    status = page.get_by_test_id("generate-status")
    status.filter(has_text=re.compile("finish reason: (length|stop)")).wait_for(timeout=30000)


def test_text_streams_into_the_page_as_the_api_generates_it(browser, server):
    settings = {"Length": "600", "Temperature": "0.9", "Top-k": "40", "Top-p": "0.95", "Seed": "7", "Stop": r"\n\n\n"}
    with playground(browser, server) as page:
        page.get_by_test_id("prompt").fill("ROMEO:\n")
        for label, value in settings.items():
            page.get_by_label(label, exact=True).fill(value)
        page.evaluate("""() => { window.lengths = [];  // the generated text's length at each change
            const output = document.querySelector('[data-testid=output]');
            new MutationObserver(() => window.lengths.push(output.querySelector('.generated').textContent.length))
                .observe(output, {childList: true, subtree: true, characterData: true}); }""")
        page.get_by_test_id("generate").click()
        finished(page)
        shown = page.locator("[data-testid=output] .generated").text_content()
        lengths, status = page.evaluate("window.lengths"), page.get_by_test_id("generate-status").text_content()
    expected = api(server, "/v1/completions", prompt="ROMEO:\n", max_tokens=600, temperature=0.9, top_k=40,
                   top_p=0.95, seed=7, stop="\n\n\n")["choices"][0]
    assert shown == expected["text"]
    assert "seed 7" in status and f"finish reason: {expected['finish_reason']}" in status and "chars/s" in status
    assert len({n for n in lengths if 0 < n < len(shown)}) >= 2, lengths  # it came in pieces


def test_continue_goes_on_from_the_continuation_token_as_one_longer_generation(browser, server):
    with playground(browser, server) as page:
        page.get_by_test_id("prompt").fill("ROMEO:\n")
        page.get_by_label("Length", exact=True).fill("150")
        page.get_by_label("Seed", exact=True).fill("5")
        page.get_by_test_id("generate").click()
        finished(page)
        page.get_by_test_id("continue").click()
        page.wait_for_function("() => document.querySelector('[data-testid=output] .generated').textContent.length"
                               " >= 300")
        shown = page.locator("[data-testid=output] .generated").text_content()
    assert shown == api(server, "/v1/completions", prompt="ROMEO:\n", max_tokens=300, temperature=0.8,
                        seed=5)["choices"][0]["text"]


def rows_and_cancelled(url):
    """charrnn_active_rows and the requests finished as cancelled, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    cancelled = re.search(r'^charrnn_requests_total\{finish_reason="cancelled"\} (\S+)$', text, re.M)
    rows = re.search(r"^charrnn_active_rows (\S+)$", text, re.M)
    return float(rows.group(1)), float(cancelled.group(1) if cancelled else 0)


def test_stop_cancels_the_generation_and_frees_its_row(browser, server):
    _, cancelled = rows_and_cancelled(server)
    with playground(browser, server) as page:
        page.get_by_label("Length", exact=True).fill("4096")
        page.evaluate("""() => {  // Stop as the first text comes in: before any machine could finish 4,096 characters
            const stop = document.querySelector('[data-testid=stop]');
            new MutationObserver((changes, observer) => { observer.disconnect(); stop.click(); })
                .observe(document.querySelector('[data-testid=output] .generated'), {childList: true}); }""")
        page.get_by_test_id("generate").click()
        page.wait_for_function("() => !document.querySelector('[data-testid=generate]').disabled")
        assert "stopped" in page.get_by_test_id("generate-status").text_content()
        assert 0 < len(page.locator("[data-testid=output] .generated").text_content()) < 4096
    for _ in range(100):  # the server sees the connection close, and frees the row at its next step
        if rows_and_cancelled(server) == (0, cancelled + 1):
            break
        time.sleep(0.1)
    assert rows_and_cancelled(server) == (0, cancelled + 1)


def shown_text(page, tab, button, container):
    """TEXT typed into the prompt box and `button` pressed in `tab`: the spans of its characters in
    `container`, once all are there."""
    page.get_by_test_id("prompt").fill(TEXT)
    page.get_by_role("tab", name=tab).click()
    page.get_by_test_id(button).click()
    spans = page.get_by_test_id(container).locator("span")
    spans.nth(len(TEXT) - 1).wait_for()
    return spans


def test_scoring_shades_every_character_with_the_apis_logprobs(browser, server):
    answer = api(server, "/v1/completions", prompt=TEXT, max_tokens=0, echo=True, logprobs=5)
    logprobs = answer["choices"][0]["logprobs"]
    bits = [None if lp is None else -lp / math.log(2) for lp in logprobs["token_logprobs"]]
    with playground(browser, server) as page:
        spans = shown_text(page, "Score", "score", "scored")
        shown = spans.evaluate_all("spans => spans.map(s => [s.dataset.logprob, getComputedStyle(s).backgroundColor])")
        status = page.get_by_test_id("score-status").text_content()
        surprise = max(range(1, len(TEXT)), key=lambda i: bits[i])
        spans.nth(surprise).hover()
        top = page.get_by_test_id("expected").locator("li").all_text_contents()
        spans.nth(0).focus()
        page.keyboard.press("ArrowRight")
        focused = page.evaluate("document.activeElement.dataset.index")
    assert len(shown) == len(TEXT)
    assert [None if value == "" else float(value) for value, _ in shown] == logprobs["token_logprobs"]
    assert shown[0][1] == "rgba(0, 0, 0, 0)"  # the first character has no context, and no shade
    darkness = [765 - sum(map(int, re.findall(r"\d+", color))) for _, color in shown]
    by_surprisal = [darkness[i] for i in sorted(range(1, len(TEXT)), key=lambda i: bits[i])]
    assert by_surprisal == sorted(by_surprisal) and darkness[surprise] > min(darkness[1:])  # more surprising, darker
    scored = [b for b in bits if b is not None]
    assert f"{sum(scored) / len(scored):.3f} bits per character" in status
    best = sorted(logprobs["top_logprobs"][surprise].items(), key=lambda item: -item[1])[:5]
    assert [t.split()[-1] for t in top] == [f"{100 * math.exp(lp):.1f}%" for _, lp in best]
    assert focused == "1"


def test_neurons_view_shades_one_unit_and_ranks_units_by_a_pattern(browser, server):
    answer = api(server, "/v1/states", text=TEXT)
    states, column = np.array(answer["states"]), np.array(column_positions(TEXT), float)
    r = [np.corrcoef(states[:, u], column)[0, 1] if states[:, u].std() else 0 for u in range(states.shape[1])]
    best = int(np.argmax(np.abs(r)))
    with playground(browser, server) as page:
        spans = shown_text(page, "Neurons", "trace", "neurons")
        page.get_by_label("Pattern", exact=True).select_option("column")
        first = page.get_by_role("list", name="Units that follow the pattern best").get_by_role("button").first
        assert first.text_content().startswith(f"unit {best}:")
        first.click()
        values = spans.evaluate_all("spans => spans.map(s => Number(s.dataset.value))")
        unit = page.get_by_label("Unit", exact=True).input_value()
        layers = page.get_by_label("Layer", exact=True).locator("option").all_text_contents()
    assert unit == str(best) and values == states[:, best].tolist()
    assert layers == [f"{t['layer']} {t['role']} · {t['size']} units" for t in answer["layers"]]


def column_positions(text):
    """Each character's position in its line (the page's "position in the line" pattern)."""
    positions, column = [], 0
    for char in text:
        positions.append(column)
        column = 0 if char == "\n" else column + 1
    return positions


def test_at_phone_width_nothing_overflows_and_the_views_change_by_keyboard(browser, server):
    with playground(browser, server) as page:
        page.set_viewport_size({"width": 360, "height": 740})
        page.get_by_role("tab", name="Generate").focus()
        for view in ("generate", "score", "neurons"):
            assert page.locator(f"#view-{view}").is_visible()
            assert page.evaluate("document.documentElement.scrollWidth") <= 360
            page.keyboard.press("ArrowRight")
        assert page.locator("#view-generate").is_visible()  # round again


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_in_memory(browser):
    with charrnn_serve("--model", str(SHIPPED), "--api-key", KEY) as (_, url):
        with playground(browser, url, expected_errors=r"status of 401") as page:
            key = page.get_by_label("API key")
            key.fill("a-wrong-key")
            key.press("Enter")
            page.get_by_text("That key was refused").wait_for()
            key.fill(KEY)
            key.press("Enter")
            page.get_by_test_id("model").filter(has_text="shakespeare").wait_for()
            page.get_by_label("Length", exact=True).fill("20")
            page.get_by_test_id("generate").click()
            finished(page)
            assert len(page.locator("[data-testid=output] .generated").text_content()) == 20
            assert page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
