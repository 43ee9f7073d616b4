"""``report.html`` in a real browser: headless Chromium (Debian's ``chromium`` package) driven by Playwright.

Skipped, with the reason, only where Playwright or a Chromium binary is missing; ``scripts/test.sh``
installs Chromium when it can. The screenshot of the page after clicking a front point is saved in the
test's temporary directory; its path is printed (``pytest -s``) and recorded as the ``screenshot``
property (``--junitxml``).
"""
import json
import os
import shutil

import pytest

from qsched.report import collect, render_html

MARKUP = '</script><script>window.__pwned = 1</script><b>bold</b> & "quoted" <img src=x onerror="window.__pwned=2">'


def chromium_executable() -> str | None:
    """$QSCHED_CHROMIUM, else Debian's chromium (or chromium-browser) on PATH."""
    candidates = [os.environ.get("QSCHED_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  "/usr/bin/chromium"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium browser here: apt-get install chromium (scripts/test.sh does it as root), "
                    "or point QSCHED_CHROMIUM at one")
    with sync_api.sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=executable)
        except Exception as err:  # a broken or incompatible binary: say so and skip
            pytest.skip(f"Chromium at {executable} does not start under Playwright: {str(err).splitlines()[0]}")
        yield chromium
        chromium.close()


def open_report(browser, path):
    """The page at ``path``, loaded, with every request and script error recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.requests, page.errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(path.as_uri())
    page.wait_for_selector("html[data-report-ready]", state="attached", timeout=15_000)
    return page


def detail(page) -> dict:
    return {"label": page.text_content("#detail-label"),
            "numbers": page.inner_text("#detail-numbers"),
            "images": page.eval_on_selector_all("#detail-images img", "els => els.map(e => e.getAttribute('src'))"),
            "loaded": page.eval_on_selector_all("#detail-images img", "els => els.every(e => e.complete && e.naturalWidth > 0)")}


def test_clicking_a_front_point_shows_its_images_and_numbers(browser, tiny_report_artifact, tmp_path, record_property):
    art = tiny_report_artifact.path
    data = collect(art)
    page = open_report(browser, art / "report.html")
    before = detail(page)
    chosen = next(p for p in data["points"] if p["chosen"])
    assert before["label"] == chosen["label"] + " (chosen)" and before["loaded"]
    samples = len(data["samples"]["prompts"])
    assert len(before["images"]) == 2 * samples  # FP next to the point, per prompt

    target = next(p for p in data["points"] if p["kind"] == "front" and not p["chosen"])
    page.click(f'#front-svg [data-point-id="{target["id"]}"]')
    after = detail(page)
    assert after["label"] == target["label"] and after["loaded"]
    assert after["numbers"] != before["numbers"] and f"{target['quality']:.4f}" in after["numbers"]
    assert after["images"][0::2] == before["images"][0::2] == data["samples"]["fp_images"]  # FP column stays
    assert after["images"][1::2] == target["images"] != before["images"][1::2]
    assert page.get_attribute(f'#front-svg [data-point-id="{target["id"]}"]', "class") == "pt selected"

    # the cache-schedule heat map follows the selection; the bit plan covers every layer
    shares = page.eval_on_selector_all("#schedule-svg rect.cell", "els => els.map(e => Number(e.dataset.share))")
    assert len(shares) == data["cache_layout"]["steps"] * len(data["cache_layout"]["blocks"]) and max(shares) > 0
    assert page.locator("#bitplan-svg rect.cell").count() == data["bit_plan"]["count"]
    assert page.locator("#coefficients polyline").count() == 2
    baselines = {p["id"] for p in data["points"] if p["kind"] == "baseline"}
    assert baselines <= set(page.eval_on_selector_all("#front-svg .pt", "els => els.map(e => e.dataset.pointId)"))

    page.select_option("#x-axis", "latency_s")  # another x axis: every point has a measured latency
    assert page.locator("#front-svg .pt").count() == len(data["points"])
    page.select_option("#x-axis", "size_bytes")
    assert page.locator("#front-svg .pt").count() == len(data["points"])

    shot = tmp_path / "report-front-point.png"
    page.select_option("#x-axis", "macs")
    page.screenshot(path=str(shot), full_page=True)
    print(f"report screenshot: {shot}")
    record_property("screenshot", str(shot))
    assert shot.stat().st_size > 10_000
    assert not page.errors
    assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests  # offline
    page.close()


def test_markup_in_a_prompt_renders_as_text(browser, tiny_report_artifact, tmp_path):
    data = json.loads(json.dumps(collect(tiny_report_artifact.path)))
    data["samples"]["prompts"][0] = MARKUP
    data["bit_plan"]["blocks"][0] = MARKUP
    data["title"] = MARKUP
    path = tmp_path / "report.html"
    path.write_text(render_html(data), encoding="utf-8")
    page = open_report(browser, path)
    assert page.evaluate("window.__pwned") is None
    assert page.text_content("#detail-images .prompt") == MARKUP
    assert page.locator("#detail-images b").count() == 0 and page.locator("script").count() == 2
    assert MARKUP in page.text_content("#bitplan-svg") and MARKUP in page.title()
    assert not page.errors
    page.close()
