"""The book's website (`python -m minisd.course site OUT/`), built and read in a real browser.

The site is built once into pytest's temporary folder and opened from disk (file://, as from a
classroom's file share, no server) in Debian's Chromium driven by Selenium. On every page: no
console errors, every image has loaded (naturalWidth > 0), MathJax typeset every formula (its
output nodes are there, its error nodes are not, and no `$$` or `\\(` delimiter is left in the
prose), and the chapter list links to every chapter. Screenshots of two pages are saved as
artefacts (their paths are printed).

Needs chromium + chromium-driver (apt; `.ci/run` installs them) and selenium, nbconvert,
django-static-mathjax (tests/requirements-test.txt); skipped, saying which, where one is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MATHJAX_WAIT_S = 60  # typesetting a long chapter on a busy 2-core machine takes a few seconds

pytest.importorskip(
    "nbconvert", reason="the site is built with nbconvert (tests/requirements-test.txt)"
)
pytest.importorskip("mathjax", reason="the site bundles MathJax 3 from django-static-mathjax")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser is driven with selenium")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install "
    "chromium chromium-driver; .ci/run does it)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "minisd.course", "site", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    print(f"\nsite built in {time.perf_counter() - start:.1f} s: {run.stdout.strip()}")
    return out


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--allow-file-access-from-files",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def open_page(driver, path: Path):
    """Load a page and wait until MathJax has typeset it (MathJax 3: `startup.promise` settles)."""
    driver.get(path.as_uri())
    deadline = time.time() + MATHJAX_WAIT_S
    while not driver.execute_script(
        "return !!(window.MathJax && MathJax.startup && MathJax.startup.promise)"
    ):
        if time.time() > deadline:
            raise AssertionError(f"{path.name}: MathJax did not start within {MATHJAX_WAIT_S} s")
        time.sleep(0.1)
    driver.set_script_timeout(MATHJAX_WAIT_S)
    outcome = driver.execute_async_script(
        "var done = arguments[0];"
        "MathJax.startup.promise.then(() => done('ok'), e => done(String(e)));"
    )
    assert outcome == "ok", f"{path.name}: MathJax failed: {outcome}"


PAGE_FACTS = """
var images = Array.from(document.images);
var main = document.querySelector('main').cloneNode(true);
main.querySelectorAll('.jp-OutputArea, .jp-CodeMirrorEditor, pre, code').forEach(e => e.remove());
var text = main.innerText;   // the prose (code and printed output may hold dollar signs)
return JSON.stringify({
  images: images.length,
  broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80)),
  math: document.querySelectorAll('mjx-container svg').length,
  math_errors: Array.from(document.querySelectorAll('mjx-merror, [data-mjx-error]'))
                    .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 80)),
  raw_display: (text.match(/\\$\\$/g) || []).length,
  raw_inline: (text.match(/\\\\\\(|\\\\\\[/g) || []).length,
  links: Array.from(document.querySelectorAll('nav.book-nav a')).map(a => a.getAttribute('href')),
  title: document.title,
});
"""


def page_facts(driver) -> dict:
    return json.loads(driver.execute_script(PAGE_FACTS))


def test_every_page_loads_with_its_figures_and_math(site, browser):
    pages = ["index.html"] + [f"{name}.html" for name in CHAPTERS]
    assert sorted(p.name for p in site.glob("*.html")) == sorted(pages)
    problems = []
    for name in pages:
        browser.get_log("browser")  # drop what an earlier page left
        open_page(browser, site / name)
        facts = page_facts(browser)
        errors = [e["message"][:200] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        if errors:
            problems.append(f"{name}: console errors {errors}")
        if facts["broken"]:
            problems.append(f"{name}: images that did not load {facts['broken']}")
        if facts["math_errors"]:
            problems.append(f"{name}: MathJax errors {facts['math_errors']}")
        if facts["raw_display"] or facts["raw_inline"]:
            problems.append(
                f"{name}: untypeset delimiters ({facts['raw_display']} $$, "
                f"{facts['raw_inline']} \\( or \\[)"
            )
        if name != "index.html":
            if facts["images"] == 0:
                problems.append(f"{name}: no figure at all")
            if facts["math"] == 0:
                problems.append(f"{name}: no typeset formula")
    assert not problems, "\n".join(problems)


def test_navigation_reaches_every_chapter(site, browser):
    """From the home page, following the chapter list's links, every chapter page is reached."""
    open_page(browser, site / "index.html")
    links = page_facts(browser)["links"]
    assert [link for link in links if link != "index.html"] == [f"{name}.html" for name in CHAPTERS]
    for name in CHAPTERS:
        browser.find_element("css selector", f'nav.book-nav a[href="{name}.html"]').click()
        assert browser.current_url.endswith(f"/{name}.html")
        heading = browser.find_element("css selector", "main h1").text
        assert heading.startswith("Chapter"), f"{name}: first heading {heading!r}"
    # the footer's "next" link walks the same order
    browser.get((site / "index.html").as_uri())
    seen = []
    for _ in CHAPTERS:
        browser.find_element("css selector", "a.book-next").click()
        seen.append(browser.current_url.rsplit("/", 1)[-1])
    assert seen == [f"{name}.html" for name in CHAPTERS]


def test_screenshots_of_two_pages(site, browser, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    for name in ("index.html", "07_ddpm.html"):
        open_page(browser, site / name)
        path = shots / name.replace(".html", ".png")
        assert browser.save_screenshot(str(path))
        assert path.stat().st_size > 10_000
        print(f"screenshot: {path}")


def test_site_refuses_a_missing_notebooks_folder(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "minisd.course",
            "site",
            str(tmp_path / "out"),
            "--notebooks",
            str(tmp_path / "nowhere"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        run.returncode == 2
        and "no notebooks folder" in run.stderr
        and "Traceback" not in run.stderr
    )
