"""The rendered book: its configuration, the nbdev cell filter, and every page in a real browser.

Unit tests (fast, no build): `scripts/make_book_config.py` and `book/_ext/nbdev_cells.py`.

Browser tests (marked `book`): build the book when `book/_build/html` is missing or older
than its sources, serve it on 127.0.0.1, open every chapter page in Debian's chromium through
Playwright and check that the math is rendered by MathJax, every image loads, the Colab link
points at that chapter's notebook (derived from pyproject), nbdev directives do not show, saved
widgets render, and no request leaves loopback. A screenshot of one chapter is saved to
test-artifacts/. Skipped only when chromium (or Playwright) is absent.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
HTML = BOOK / "_build" / "html"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("TINYLLAMA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
]
LOOPBACK = {"127.0.0.1", "localhost"}

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(BOOK / "_ext"))
import make_book_config as mbc  # noqa: E402
import nbdev_cells  # noqa: E402

NOTEBOOKS = mbc.chapter_notebooks()


# --------------------------------------------------------------------------- unit tests


def code(source, tags=None, outputs=None):
    cell = {"cell_type": "code", "metadata": {}, "source": source, "outputs": outputs or [], "execution_count": None}
    if tags:
        cell["metadata"]["tags"] = tags
    return cell


def markdown(source):
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def notebook(*cells, metadata=None):
    return {"cells": list(cells), "metadata": metadata or {}, "nbformat": 4, "nbformat_minor": 5}


def test_split_directives_reads_only_the_leading_directive_lines():
    assert nbdev_cells.split_directives("#| export\nx = 1\n") == ([("export", "")], "x = 1\n")
    assert nbdev_cells.split_directives("#|hide\n# | echo: false\n\ny = 2\n#| export\n") == (
        [("hide", ""), ("echo", "false")], "y = 2\n#| export\n")
    assert nbdev_cells.split_directives(["#| default_exp rope"]) == ([("default_exp", "rope")], "")
    assert nbdev_cells.split_directives("# a comment\n#| export\n") == ([], "# a comment\n#| export\n")


def test_transform_removes_hidden_cells_and_strips_directives():
    setup = "#| hide\n# Installs the package\ntry:\n    import tinyllama\nexcept ImportError:\n    pass\n"
    nb = notebook(
        markdown("# 02 · RoPE\nSome $x^2$ math."),
        code(setup),
        code("#| default_exp rope"),
        code("#| export\ndef f(x):\n    return x\n"),
        code("#| exporti\ndef _g(x):\n    return x\n"),
        code("#| export other\ndef h(x):\n    return x\n"),
        code("#| echo: false\nprint('out')\n", outputs=[{"output_type": "stream", "name": "stdout", "text": "out\n"}]),
        code("#| hide_output\nprint('quiet')\n"),
        code("#| include: false\nsecret = 1\n"),
        code("plain = 1\n", tags=["hide-input"]),
    )
    out, problems = nbdev_cells.transform_notebook(copy.deepcopy(nb), "tinyllama")
    assert problems == []
    sources = ["".join(c["source"]) for c in out["cells"]]
    assert not any("#|" in s for s in sources), sources
    assert not any("Installs the package" in s for s in sources)  # the #| hide cell is gone
    assert not any("secret" in s for s in sources)  # include: false
    assert len(out["cells"]) == len(nb["cells"]) - 3  # hide, default_exp (now empty), include: false
    by_src = {"".join(c["source"]).split("\n")[0]: c for c in out["cells"]}
    exported = by_src["def f(x):"]["metadata"]
    assert exported["nbdev_cells"] == {"exported_to": "tinyllama.rope"} and "nbdev-export" in exported["tags"]
    assert by_src["def _g(x):"]["metadata"]["nbdev_cells"] == {"exported_to": "tinyllama.rope"}
    assert by_src["def h(x):"]["metadata"]["nbdev_cells"] == {"exported_to": "tinyllama.other"}
    assert "remove-input" in by_src["print('out')"]["metadata"]["tags"]
    assert "remove-output" in by_src["print('quiet')"]["metadata"]["tags"]
    assert by_src["plain = 1"]["metadata"]["tags"] == ["hide-input"]
    assert out["metadata"]["language_info"]["name"] == "python"  # set when nbdev-clean stripped it


def test_transform_reads_nbdev3_metadata_directives_and_keeps_magics():
    hidden = code("import os\n")
    hidden["metadata"]["nbdev"] = {"hide": "true"}
    exported = code("def f(x):\n    return x\n")
    exported["metadata"]["nbdev"] = {"export": "true"}
    nb = notebook(hidden, exported, code("%%time\n#| export\ng = 1\n"), code("#| hide: false\nshown = 1\n"),
                  metadata={"nbdev": {"default_exp": "rope"}})
    out, _ = nbdev_cells.transform_notebook(nb)
    sources = ["".join(c["source"]) for c in out["cells"]]
    assert sources == ["def f(x):\n    return x\n", "%%time\ng = 1\n", "shown = 1\n"]
    assert out["cells"][0]["metadata"]["nbdev_cells"] == {"exported_to": "tinyllama.rope"}
    assert out["cells"][1]["metadata"]["nbdev_cells"] == {"exported_to": "tinyllama.rope"}
    assert "nbdev_cells" not in out["cells"][2]["metadata"]


def test_transform_reports_error_outputs_unless_tagged_raises_exception():
    err = {"output_type": "error", "ename": "ValueError", "evalue": "bad dim", "traceback": []}
    _, problems = nbdev_cells.transform_notebook(notebook(code("f(-1)", outputs=[err])))
    assert len(problems) == 1 and "ValueError: bad dim" in problems[0] and "cell 1" in problems[0]
    _, problems = nbdev_cells.transform_notebook(notebook(code("f(-1)", tags=["raises-exception"], outputs=[err])))
    assert problems == []


def test_repository_url_must_be_a_github_repository():
    good = {"urls": {"Repository": "https://github.com/owner/repo.git"}}
    assert mbc.repository_url(good) == "https://github.com/owner/repo"
    for bad in ({}, {"urls": {"Repository": "https://gitlab.com/owner/repo"}},
                {"urls": {"Repository": "https://github.com/owner"}}):
        with pytest.raises(ValueError, match="Repository"):
            mbc.repository_url(bad)
    assert (mbc.colab_url("https://github.com/owner/repo", "nbs/02_rope.ipynb")
            == "https://colab.research.google.com/github/owner/repo/blob/main/nbs/02_rope.ipynb")


def test_toc_lists_numbered_notebooks_in_order_with_an_appendix(tmp_path):
    for name in ["10_ppo.ipynb", "00_index.ipynb", "02_rope.ipynb", "91_exercises.ipynb", "01b_tokenizer.ipynb",
                 "90_device_profiles.ipynb", "scratch.ipynb", "2_bad.ipynb", "01_data.ipynb"]:
        (tmp_path / name).write_text("{}")
    toc = mbc.render_toc(mbc.chapter_notebooks(tmp_path))
    lines = [line.strip() for line in toc.splitlines() if line.strip() and not line.startswith("#")]
    assert lines == [
        "format: jb-book", "root: nbs/00_index", "parts:",
        "- caption: Chapters", "chapters:", "- file: nbs/01_data", "- file: nbs/01b_tokenizer",
        "- file: nbs/02_rope", "- file: nbs/10_ppo",
        "- caption: Appendix", "chapters:", "- file: nbs/90_device_profiles", "- file: nbs/91_exercises",
    ]
    assert [p.name for p in mbc.unlisted_notebooks(tmp_path)] == ["2_bad.ipynb", "scratch.ipynb"]
    (tmp_path / "00_index.ipynb").unlink()
    with pytest.raises(ValueError, match="00_"):
        mbc.render_toc(mbc.chapter_notebooks(tmp_path))


def test_book_config_derives_links_from_pyproject():
    pyproject = mbc.read_pyproject()
    repo = pyproject["project"]["urls"]["Repository"].rstrip("/")
    config = mbc.render_config(pyproject)
    assert f"url: {repo}\n" in config and "colab_url: https://colab.research.google.com" in config
    assert re.findall(r"https?://github\.com/[^\s\"']*", config) == [repo]  # the one URL, once


# --------------------------------------------------------------------------- build + browser


def _sources_mtime() -> float:
    paths = [*NOTEBOOKS, ROOT / "pyproject.toml", *(BOOK / "_ext").glob("*.py"), *(BOOK / "static").glob("*.css"),
             *(BOOK / "static").glob("*.js"), BOOK / "_config.yml", BOOK / "_toc.yml",
             ROOT / "scripts" / "make_book_config.py", ROOT / "scripts" / "vendor_book_assets.sh"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def _build_is_current() -> bool:
    stamp = HTML / ".buildinfo"
    if not stamp.exists() or not (BOOK / "static" / "vendor" / "VERSIONS").exists():
        return False
    pages = {p.stem for p in (HTML / "nbs").glob("*.html")}
    return pages >= {nb.stem for nb in NOTEBOOKS} and stamp.stat().st_mtime >= _sources_mtime()


@pytest.fixture(scope="session")
def built_book() -> Path:
    """The built HTML book; built here (like `make book`) when missing or stale.

    TINYLLAMA_BOOK_HTML=<dir> tests an already built book in <dir> as it is (no build).
    """
    if os.environ.get("TINYLLAMA_BOOK_HTML"):
        return Path(os.environ["TINYLLAMA_BOOK_HTML"])
    if not _build_is_current():
        bindir = Path(sys.executable).parent
        steps = [
            ["bash", str(ROOT / "scripts" / "vendor_book_assets.sh")],
            [sys.executable, str(ROOT / "scripts" / "make_book_config.py")],
            [str(bindir / "jupyter-book"), "build", str(BOOK), "-W", "--keep-going", "--all"],
        ]
        for cmd in steps:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return HTML


@contextlib.contextmanager
def serve(directory: Path):
    """Base URL of `python -m http.server` serving `directory` on 127.0.0.1 (a free port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("http.server exited at start")
                time.sleep(0.1)
        else:
            raise RuntimeError("http.server did not answer within 20 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(built_book):
    with serve(built_book) as base:
        yield base


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium, or `make browser`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class PageRecord:
    """A page opened in a fresh context, with every request, failed response and JS error recorded."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.bad_responses: list[str] = []
        self.failed: list[str] = []
        self.js_errors: list[str] = []
        self.in_flight: set = set()
        self.last_activity = time.monotonic()
        self.page.on("request", self._started)
        self.page.on("requestfinished", self._ended)
        self.page.on("requestfailed", self._ended)
        self.page.on("response", lambda r: r.status >= 400 and self.bad_responses.append(f"{r.status} {r.url}"))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("pageerror", lambda e: self.js_errors.append(str(e)))

    def _started(self, request):
        self.requests.append(request.url)
        self.in_flight.add(request)
        self.last_activity = time.monotonic()

    def _ended(self, request):
        self.in_flight.discard(request)
        self.last_activity = time.monotonic()

    def wait_until_quiet(self, quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
        """Wait until no request is in flight and none started for `quiet_s` (late fonts, widgets).

        (Playwright's "networkidle" sometimes never fires here although nothing is pending.)
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.in_flight and time.monotonic() - self.last_activity >= quiet_s:
                return
            self.page.wait_for_timeout(100)
        raise TimeoutError(f"requests still in flight after {timeout_s} s: {[r.url for r in self.in_flight]}")

    def off_loopback(self) -> list[str]:
        out = []
        for url in self.requests:
            u = urlparse(url)
            if u.scheme in ("data", "blob", "about"):
                continue
            if u.hostname not in LOOPBACK:
                out.append(url)
        return out

    def close(self):
        self.context.close()


# Everything checked on one page, computed in the page itself.
PAGE_FACTS_JS = r"""
async () => {
  // Math: wait for MathJax's first typeset (the script is loaded with `defer`).
  // Sphinx loads MathJax only on pages that hold math.
  const mathjaxScript = !!document.querySelector('script[src*="mathjax"]');
  const t0 = Date.now();
  while (mathjaxScript && !(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
    if (Date.now() - t0 > 20000) break;
    await new Promise(r => setTimeout(r, 50));
  }
  let mathjax = false;
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise; mathjax = true;
  }
  const article = document.querySelector("article") || document.body;
  const mathEls = [...article.querySelectorAll(".math")];
  const unrendered = mathEls.filter(el => !el.querySelector("mjx-container"))
                            .map(el => el.textContent.slice(0, 80));
  const mathErrors = [...article.querySelectorAll("mjx-merror")].map(el => el.textContent.slice(0, 80));
  // Images: load lazy ones too, then wait for all.
  const imgs = [...document.images];
  imgs.forEach(img => { img.loading = "eager"; });
  await Promise.all(imgs.map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); setTimeout(r, 10000); })));
  const images = imgs.map(img => ({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0,
                                   inArticle: article.contains(img)}));
  // Widgets saved in the notebook and the views the widget manager rendered.
  const widgetViews = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  let renderedWidgets = 0;
  if (widgetViews) {
    const t1 = Date.now();
    while (Date.now() - t1 < 20000) {
      renderedWidgets = document.querySelectorAll(".jupyter-widgets.widget-view, .jupyter-widgets .widget-inline-hbox, .jupyter-widgets.widget-box, .jupyter-widgets.widget-inline-hbox, .jupyter-widgets.widget-output").length;
      if (renderedWidgets >= 1) break;
      await new Promise(r => setTimeout(r, 100));
    }
  }
  // Raw TeX left in the prose (code and rendered math removed). Widget labels are typeset
  // after the widgets render, so allow a few seconds for the text to settle.
  const findRawTex = () => {
    const clone = article.cloneNode(true);
    clone.querySelectorAll("pre, code, script, style, mjx-container, .highlight, textarea").forEach(el => el.remove());
    const text = clone.textContent;
    const found = [];
    for (const pat of [/\$\$/, /\\\(/, /\\\)/, /\\\[/, /\\\]/, /\\begin\{/, /\$\\[a-zA-Z]/, /\\frac\{/]) {
      const m = text.match(pat);
      if (m) found.push(text.slice(Math.max(0, m.index - 40), m.index + 40));
    }
    return found;
  };
  let rawTex = findRawTex();
  for (const t2 = Date.now(); rawTex.length && Date.now() - t2 < 10000; rawTex = findRawTex()) {
    await new Promise(r => setTimeout(r, 200));
  }
  const widgetErrors = [...document.querySelectorAll(".jupyter-widgets")].filter(el => /Error displaying widget/.test(el.textContent)).length;
  return {
    mathjax, mathjaxScript, nMath: mathEls.length, nRendered: document.querySelectorAll("mjx-container").length,
    unrendered, mathErrors, rawTex, images, widgetViews, renderedWidgets, widgetErrors,
    colab: [...document.querySelectorAll('a[href*="colab.research.google.com"]')].map(a => a.href),
    colabLine: [...document.querySelectorAll("p.colab-launch a")].map(a => a.href),
    directives: (article.innerText.match(/^\s*#\s?\|.*$/m) || [null])[0],
    title: document.title,
  };
}
"""


def inspect_page(browser, url: str, expected_colab: str, screenshot: Path | None = None) -> tuple[dict, list[str]]:
    """Open `url`; return the page facts and the list of everything wrong with it (empty when fine)."""
    rec = PageRecord(browser)
    try:
        resp = rec.page.goto(url, wait_until="load", timeout=120_000)
        if resp is None or not resp.ok:
            return {}, [f"HTTP {resp and resp.status}"]
        facts = rec.page.evaluate(PAGE_FACTS_JS)
        rec.wait_until_quiet()
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            rec.page.screenshot(path=str(screenshot), full_page=True)
    finally:
        rec.close()

    problems = []

    def expect(ok, message):
        if not ok:
            problems.append(message)

    # Nothing leaves the machine; nothing local is missing; no script fails.
    expect(rec.requests, "no requests recorded")
    expect(not rec.off_loopback(), f"requests left loopback: {rec.off_loopback()}")
    expect(not rec.bad_responses, f"failed responses: {rec.bad_responses}")
    expect(not rec.failed, f"failed requests: {rec.failed}")
    expect(not rec.js_errors, f"JavaScript errors: {rec.js_errors}")
    # Math: MathJax ran, every math element holds its rendering, no TeX errors or raw TeX.
    if facts["nMath"] or facts["mathjaxScript"]:
        expect(facts["mathjax"], "MathJax did not start (is book/static/vendor/mathjax there?)")
    expect(not facts["unrendered"], f"math not rendered by MathJax: {facts['unrendered'][:5]}")
    expect(facts["nRendered"] >= facts["nMath"], f"{facts['nMath']} math elements, {facts['nRendered']} rendered")
    expect(not facts["mathErrors"], f"MathJax TeX errors: {facts['mathErrors'][:5]}")
    expect(not facts["rawTex"], f"raw TeX left in the text: {facts['rawTex'][:5]}")
    # Images.
    broken = [i["src"] for i in facts["images"] if not i["ok"]]
    expect(not broken, f"images that did not load: {broken}")
    # Colab: the launch button and the line under the title both open this notebook.
    expect(facts["colabLine"] == [expected_colab], f"Colab line {facts['colabLine']} != [{expected_colab}]")
    expect(len(facts["colab"]) >= 2 and set(facts["colab"]) == {expected_colab},
           f"Colab links {facts['colab']} should all be {expected_colab} (launch button + line)")
    # nbdev noise.
    expect(facts["directives"] is None, f"an nbdev directive shows: {facts['directives']!r}")
    # Widgets saved with the notebook render with the vendored manager.
    if facts["widgetViews"]:
        expect(facts["renderedWidgets"] >= 1 and not facts["widgetErrors"],
               f"{facts['widgetViews']} saved widgets, {facts['renderedWidgets']} rendered, "
               f"{facts['widgetErrors']} errors")
    return facts, problems


def _chapter_for_screenshot():
    chapters = [nb for nb in NOTEBOOKS if 1 <= int(nb.name[:2]) <= 89]
    return (chapters or NOTEBOOKS or [None])[0]


def _expected_colab(nb_name: str) -> str:
    return mbc.colab_url(mbc.repository_url(mbc.read_pyproject()["project"]), f"nbs/{nb_name}")


@pytest.mark.slow
@pytest.mark.book
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_chapter_page_renders_offline(nb, browser, server):
    shot = ARTIFACTS / f"book-{nb.stem}.png" if nb == _chapter_for_screenshot() else None
    _, problems = inspect_page(browser, f"{server}/nbs/{nb.stem}.html", _expected_colab(nb.name), shot)
    assert not problems, f"{nb.stem}.html:\n  " + "\n  ".join(problems)


@pytest.mark.slow
@pytest.mark.book
def test_book_root_redirects_to_the_index_page(browser, server):
    rec = PageRecord(browser)
    try:
        rec.page.goto(f"{server}/index.html", wait_until="load", timeout=120_000)
        rec.page.wait_for_url(f"{server}/nbs/00_*.html", timeout=10_000)
        nav = rec.page.eval_on_selector_all("nav.bd-docs-nav a.reference.internal", "els => els.map(a => a.href)")
    finally:
        rec.close()
    assert not rec.off_loopback(), rec.off_loopback()
    # The sidebar lists every chapter notebook except the root page itself.
    linked = {urlparse(u).path.rsplit("/", 1)[-1].removesuffix(".html") for u in nav}
    assert {nb.stem for nb in NOTEBOOKS if not nb.name.startswith("00_")} <= linked, linked


@pytest.mark.slow
@pytest.mark.book
def test_book_has_math_and_figures_to_check(built_book):
    """Guard against vacuous browser checks: the chapters render math and plots at all."""
    pages = [(built_book / "nbs" / f"{nb.stem}.html").read_text() for nb in NOTEBOOKS]
    assert sum(p.count('class="math notranslate') for p in pages) > 0
    assert sum(p.count('src="../_images/') for p in pages) > 0
    assert (built_book / "_static" / "vendor" / "mathjax" / "tex-chtml.js").stat().st_size > 0


SYNTHETIC_CELLS = [
    ("markdown", "# 00 · A synthetic chapter\n\nInline $a^2 + b^2 = c^2$ and display math\n\n"
                 "$$\\mathrm{RMS}(x) = \\sqrt{\\tfrac{1}{d}\\sum_i x_i^2}$$\n\n"
                 "\\begin{align}\ny &= W x \\\\\nz &= \\sigma(y)\n\\end{align}"),
    ("code", "#| hide\nHIDDEN_SETUP_MARKER = 1"),
    ("code", "#| default_exp toy"),
    ("code", "#| export\ndef toy(x):\n    \"Return `x`.\"\n    return x"),
    ("code", "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
             "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [0, 1, 4])\nplt.show()"),
    ("code", "import ipywidgets as w\n"
             "w.VBox([w.FloatSlider(value=0.5, description=r'$\\alpha$'), w.Button(description='Go', icon='check'),\n"
             "        w.Dropdown(options=['a', 'b']), w.IntProgress(value=3, max=10), w.Output()])"),
]


@pytest.fixture(scope="session")
def synthetic_book(tmp_path_factory, built_book) -> Path:
    """A one-page book built with the real config, extension and vendored assets, from a notebook
    executed here so that it holds saved widget state, a plot, math, and nbdev directives."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    src = tmp_path_factory.mktemp("synthetic_book")
    (src / "nbs").mkdir()
    (src / "_ext").symlink_to(BOOK / "_ext", target_is_directory=True)
    (src / "static").symlink_to(BOOK / "static", target_is_directory=True)
    (src / "_config.yml").write_text(mbc.render_config(mbc.read_pyproject()))
    (src / "_toc.yml").write_text("format: jb-book\nroot: nbs/00_synthetic\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
                for kind, text in SYNTHETIC_CELLS]
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(src)}}).execute()
    assert nb.metadata.get("widgets"), "nbclient saved no widget state"
    nbformat.write(nb, src / "nbs" / "00_synthetic.ipynb")
    jb = Path(sys.executable).parent / "jupyter-book"
    r = subprocess.run([str(jb), "build", str(src), "-W", "--keep-going", "--all"], capture_output=True, text=True)
    assert r.returncode == 0, f"synthetic book build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return src / "_build" / "html"


@pytest.mark.slow
@pytest.mark.book
def test_synthetic_page_with_widgets_plot_math_and_directives(browser, synthetic_book):
    """Covers what chapters may not have yet: saved widgets (with a LaTeX label), amsmath, and nbdev cells."""
    html = (synthetic_book / "nbs" / "00_synthetic.html").read_text()
    assert "HIDDEN_SETUP_MARKER" not in html, "the #| hide cell shows"
    assert "exported to" in html and "tinyllama.toy" in html, "no export note"
    assert "application/vnd.jupyter.widget-state+json" in html
    with serve(synthetic_book) as base:
        facts, problems = inspect_page(browser, f"{base}/nbs/00_synthetic.html", _expected_colab("00_synthetic.ipynb"))
        rec = PageRecord(browser)
        try:
            rec.page.goto(f"{base}/nbs/00_synthetic.html", wait_until="load", timeout=120_000)
            rec.page.wait_for_selector(".jupyter-widgets mjx-container", timeout=60_000)  # the $\alpha$ label
            label_typeset = True
        except Exception as e:  # noqa: BLE001 - reported below
            label_typeset = repr(e)
        finally:
            rec.close()
    assert not problems, "00_synthetic.html:\n  " + "\n  ".join(problems)
    assert facts["widgetViews"] >= 1 and facts["renderedWidgets"] >= 1
    assert facts["nMath"] >= 3 and facts["nRendered"] >= facts["nMath"]
    assert sum(i["inArticle"] and i["ok"] for i in facts["images"]) >= 1, "the plot did not load"
    assert label_typeset is True, f"widget label $\\alpha$ was not typeset by MathJax: {label_typeset}"


# The post-training panels of chapter 07c: each saved form renders with its own fields.
PANELS_PAGE = "07c_training_panel"
PANELS_JS = r"""
async () => {
  const root = document.querySelector("article") || document.body;
  const read = () => {
    const inWidgets = sel => [...root.querySelectorAll(`.jupyter-widgets ${sel}`)];
    return {
      starts: inWidgets("button").filter(b => b.textContent.trim() === "Start").length,
      titles: inWidgets("b").map(b => b.textContent.trim()),
      labels: inWidgets("label, .widget-label").map(l => l.textContent.trim()),
      errors: [...root.querySelectorAll(".jupyter-widgets")]
        .filter(el => /Error displaying widget/.test(el.textContent)).length,
    };
  };
  let got = read();
  for (const t0 = Date.now(); got.starts < 4 && Date.now() - t0 < 30000; got = read()) {
    await new Promise(r => setTimeout(r, 200));
  }
  return got;
}
"""


@pytest.mark.slow
@pytest.mark.book
def test_post_training_panels_render_in_the_book(browser, server):
    """Chapter 07c's saved PPO, DPO and GRPO panels render as forms: a Start button each, their
    titles, and the fields that set them apart (GRPO's group size G)."""
    rec = PageRecord(browser)
    try:
        rec.page.goto(f"{server}/nbs/{PANELS_PAGE}.html", wait_until="load", timeout=120_000)
        got = rec.page.evaluate(PANELS_JS)
    finally:
        rec.close()
    assert not got["errors"], got
    assert got["starts"] >= 4, got  # the pretraining panel and the three post-training panels
    assert {"PPO", "DPO", "GRPO"} <= set(got["titles"]), got["titles"]
    wanted = {"β (KL weight)", "group size G", "temperature", "learning rate", "batch size"}
    assert wanted <= set(got["labels"]), got["labels"]
