"""The README's screenshots of the playground: docs/playground-{generate,score,neurons}.png.

    .venv/bin/python docs/playground_screenshots.py

Starts charrnn-serve on the shipped model and drives the page in Debian's chromium as
tests/test_playground.py does (the same launch, the same helpers), one view per screenshot.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests"))

from conftest import SHIPPED, charrnn_serve  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from test_playground import CHROMIUM, CHROMIUM_ARGS, finished  # noqa: E402


def main():
    with charrnn_serve("--model", str(SHIPPED)) as (_, url), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url)
        page.get_by_test_id("prompt").fill("ROMEO:\n")
        page.get_by_label("Length", exact=True).fill("360")
        page.get_by_label("Seed", exact=True).fill("11")
        page.get_by_test_id("generate").click()
        finished(page)
        shoot(page, "generate")

        page.get_by_role("tab", name="Score").click()
        page.get_by_role("button", name="Score the last generation").click()
        spans = page.locator("[data-testid=scored] span")
        spans.nth(120).wait_for()
        spans.nth(120).hover()
        shoot(page, "score")

        page.get_by_role("tab", name="Neurons").click()
        page.get_by_role("button", name="Trace the last generation").click()
        page.locator("[data-testid=neurons] span").first.wait_for()
        page.get_by_label("Pattern", exact=True).select_option("column")
        page.get_by_role("list", name="Units that follow the pattern best").get_by_role("button").first.click()
        shoot(page, "neurons")
        browser.close()


def shoot(page, view):
    path = DOCS / f"playground-{view}.png"
    page.screenshot(path=path, full_page=True)
    print(path)


if __name__ == "__main__":
    main()
