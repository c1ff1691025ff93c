"""Every page of the built book, opened in headless Chromium from disk with the network unplugged.

Run after the book is built (`make test` does): `python -m pytest -q tests_browser`. Each HTML page under
_build/html is its own test, opened over file:// as a reader who downloaded the book would open it, with every
request that is not a local file aborted. A page fails on:

- a request that tried to reach the network (a CDN script, font or image) or a local file that is missing;
- a JavaScript error (an uncaught exception or a console.error message);
- a broken internal link: a local href whose file does not exist, or whose #fragment is no id on that page;
- an image that did not load (naturalWidth 0);
- a widget that did not render: every application/vnd.jupyter.widget-view+json output must be accompanied by a
  rendered .jupyter-widgets element of nonzero size, and no widget error is shown;
- an equation MathJax did not typeset (every .math element holds an mjx-container, no TeX error).

Full-page screenshots of the landing page and of each chapter's first page go to _build/screenshots/.

Knobs (environment): BOOK_HTML=dir (default _build/html); CHROMIUM=path to the browser (default: the first of
chromium, chromium-browser, google-chrome, google-chrome-stable on PATH; `playwright install` is never needed);
CI=true turns "no browser", "no playwright" and "no built book" from skips into failures.
"""
from __future__ import annotations

import os
import re
import shutil
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOK_HTML = Path(os.environ.get("BOOK_HTML") or REPO / "_build" / "html").resolve()
SCREENSHOTS = REPO / "_build" / "screenshots"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# What a page may load with no network: the book's own files and inline data.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
WIDGET_VIEW = 'script[type="application/vnd.jupyter.widget-view+json"]'
TIMEOUT_MS = 20_000


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str):
    """Skip on a contributor's machine; under CI (CI=true) a check that cannot run is a failure."""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def book_pages() -> list:
    """One parameter per built page (relative path), or a single placeholder that skips/fails when unbuilt."""
    if not (BOOK_HTML / "index.html").is_file():
        return [pytest.param(None, id="book-not-built")]
    pages = sorted(p.relative_to(BOOK_HTML).as_posix() for p in BOOK_HTML.rglob("*.html")
                   if not p.relative_to(BOOK_HTML).parts[0].startswith("_"))  # _static/, _sources/: not pages
    return [pytest.param(rel, id=rel) for rel in pages]


def screenshot_name(rel: str) -> str | None:
    """The landing page and each chapter's first page (book/0N-*/index.html) are photographed."""
    if rel == "index.html":
        return "00-landing.png"
    m = re.fullmatch(r"book/(\d\d-[^/]+)/index\.html", rel)
    return f"{m.group(1)}.png" if m else None


# ---------------------------------------------------------------------------------------------------------------
# Static facts about built files: the ids a #fragment can point at, and where a redirect page goes.


class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refresh: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            m = re.search(r"url\s*=\s*(\S+)", attrs.get("content") or "", re.I)
            self.refresh = m.group(1).strip("'\"") if m else None


@lru_cache(maxsize=None)
def parse_page(path: Path) -> _Anchors:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def broken_links(hrefs: list[str], page_ids: set[str], page_path: Path) -> list[str]:
    """Local hrefs (already resolved to absolute file:// URLs by the browser) that lead nowhere."""
    broken = []
    for href in sorted(set(hrefs)):
        parts = urlsplit(href)
        if parts.scheme != "file":
            continue  # http(s), mailto: external, not followed (and never requested while reading)
        target = Path(unquote(parts.path))
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            broken.append(f"{href} (no such file)")
            continue
        fragment = unquote(parts.fragment)
        if not fragment or target.suffix != ".html":
            continue
        ids = page_ids if target == page_path else parse_page(target).ids
        if fragment not in ids:
            broken.append(f"{href} (no element with id {fragment!r} on that page)")
    return broken


# ---------------------------------------------------------------------------------------------------------------
# The browser: one Chromium and one context for the whole run, a fresh tab per page.


class Tab:
    """A page plus what went wrong while it loaded (filled in by event handlers)."""

    def __init__(self, page):
        self.page = page
        self.blocked: list[str] = []  # requests that tried to leave the machine
        self.failed: list[str] = []  # requests that failed: a missing file (or a blocked request)
        self.js_errors: list[str] = []  # uncaught exceptions and console.error messages
        page.on("pageerror", lambda exc: self.js_errors.append(f"uncaught {exc}"))
        page.on("console", self._console)
        page.on("requestfailed", lambda req: self.failed.append(f"{req.url} ({req.failure})"))
        page.on("response", self._response)
        page.route("**/*", self._route)

    def _console(self, msg):
        if msg.type == "error":
            where = (msg.location or {}).get("url", "")
            self.js_errors.append(f"console.error: {msg.text}" + (f" [{where}]" if where else ""))

    def _response(self, response):
        if response.status >= 400:
            self.failed.append(f"{response.url} (HTTP {response.status})")

    def _route(self, route):
        url = route.request.url
        if url.startswith(LOCAL_SCHEMES):
            route.continue_()
        else:  # the network is unplugged: record what the page wanted
            self.blocked.append(url)
            route.abort("internetdisconnected")


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install -e '.[dev]')")
    executable = find_chromium()
    if executable is None:
        skip_or_fail(f"no Chromium: none of {', '.join(BROWSERS)} is on PATH "
                     "(apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    with sync_playwright() as pw:
        # The system browser; `playwright install` (a browser download) is never needed.
        browser = pw.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def tab(context):
    page = context.new_page()
    yield Tab(page)
    page.close()


# ---------------------------------------------------------------------------------------------------------------
# In-page checks (JavaScript run in the page after its load event).

WIDGETS_DONE = """() => Array.from(document.querySelectorAll('%s')).every(s => {
    const area = s.previousElementSibling;
    return area && area.classList.contains('widget-subarea') && area.querySelector('.jupyter-widgets');
})""" % WIDGET_VIEW

WIDGET_REPORT = """() => {
    const state = document.querySelector('script[type="application/vnd.jupyter.widget-state+json"]');
    const models = state ? Object.keys(JSON.parse(state.textContent).state || {}) : [];
    const problems = [];
    document.querySelectorAll('%s').forEach((s, i) => {
        const id = JSON.parse(s.textContent).model_id;
        const area = s.previousElementSibling;
        const w = area && area.classList.contains('widget-subarea') ? area.querySelector('.jupyter-widgets') : null;
        if (!w) {
            problems.push(`widget ${i} (model ${id}) did not render` +
                (state ? (models.includes(id) ? '' : ': its model is not in the saved widget state')
                       : ': the page has no widget state'));
            return;
        }
        const box = w.getBoundingClientRect();
        const hidden = s.closest('details:not([open]), .toggle-hidden, [hidden]');
        if (!hidden && (box.width === 0 || box.height === 0)) {
            problems.push(`widget ${i} (model ${id}) rendered with zero size`);
        }
    });
    document.querySelectorAll('.jupyter-widgets-error-widget').forEach(
        e => problems.push('a widget shows an error: ' + e.innerText.slice(0, 200)));
    if (document.body.innerText.includes('Error rendering Jupyter widget')) {
        problems.push('the page says "Error rendering Jupyter widget"');
    }
    return problems;
}""" % WIDGET_VIEW

MATH_REPORT = """async () => {
    const maths = Array.from(document.querySelectorAll('.math'));
    if (!maths.length) return [];
    if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) {
        return [`${maths.length} equation(s) but MathJax did not start`];
    }
    const typeset = await Promise.race([MathJax.startup.promise.then(() => true),
                                        new Promise(r => setTimeout(() => r(false), %d))]);
    const problems = typeset ? [] : ['MathJax did not finish typesetting in time'];
    const untypeset = maths.filter(m => !m.querySelector('mjx-container'));
    if (untypeset.length) {
        problems.push(`${untypeset.length} of ${maths.length} equation(s) not typeset, e.g. ` +
                      untypeset[0].textContent.trim().slice(0, 80));
    }
    document.querySelectorAll('mjx-merror').forEach(
        e => problems.push('TeX error: ' + (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120)));
    return problems;
}""" % TIMEOUT_MS

IMAGES_REPORT = """async () => {
    const imgs = Array.from(document.images);
    imgs.forEach(i => { if (i.loading === 'lazy') i.loading = 'eager'; });
    await Promise.race([
        Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
            i.addEventListener('load', r);
            i.addEventListener('error', r);
        }))),
        new Promise(r => setTimeout(r, %d)),
    ]);
    return imgs.filter(i => !i.complete || i.naturalWidth === 0)
               .map(i => (i.getAttribute('src') || '').slice(0, 120) + (i.alt ? ` (alt: ${i.alt.slice(0, 60)})` : ''));
}""" % TIMEOUT_MS


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", book_pages())
def test_page(rel, tab):
    if rel is None:
        skip_or_fail(f"the book is not built: no {BOOK_HTML}/index.html (run `make book` first)")
    path = BOOK_HTML / rel
    page = tab.page
    problems: list[str] = []
    shot = screenshot_name(rel)

    redirect = parse_page(path).refresh
    if redirect:
        # The landing page only redirects (Jupyter Book's root index.html); its target is tested on its own.
        target = (path.parent / redirect.split("#")[0]).resolve()
        assert target.is_file(), f"{rel} redirects to {redirect}, which does not exist"
        page.goto(path.as_uri(), wait_until="load")
        page.wait_for_url(target.as_uri() + "*", wait_until="load")
    else:
        page.goto(path.as_uri(), wait_until="load")

    if page.locator(WIDGET_VIEW).count():
        try:
            page.wait_for_function(WIDGETS_DONE, timeout=TIMEOUT_MS)
        except Exception:  # reported in detail below
            pass
        problems += page.evaluate(WIDGET_REPORT)
    problems += page.evaluate(MATH_REPORT)
    problems += [f"image did not load: {src}" for src in page.evaluate(IMAGES_REPORT)]
    if not redirect:
        hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
        page_ids = set(page.eval_on_selector_all("[id], a[name]", "es => es.map(e => e.id || e.name)"))
        problems += [f"broken link: {b}" for b in broken_links(hrefs, page_ids, path)]

    if shot:
        page.evaluate("document.fonts.ready.then(() => true)")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        # Finished transitions (the theme fades colours in on a first visit), so nothing is caught half-drawn.
        page.screenshot(path=str(SCREENSHOTS / shot), full_page=True, animations="disabled")

    problems += [f"network request (blocked, the page must work offline): {u}" for u in tab.blocked]
    problems += [f"failed request: {f}" for f in tab.failed if not any(f.startswith(b) for b in tab.blocked)]
    problems += [f"JavaScript error: {e}" for e in tab.js_errors]
    assert not problems, f"{rel}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
