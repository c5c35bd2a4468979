"""Sphinx extension: render nbdev notebooks without nbdev's `#|` noise.

Jupyter Book ignores nbdev directives, so without this a hidden setup cell and every
`#| export` line would show in the book. Before MyST-NB parses a notebook this extension

- drops cells with `#| hide` (or Quarto's `#| include: false`),
- turns `#| hide_input` / `#| echo: false` into the `remove-input` tag and
  `#| hide_output` / `#| output: false` into `remove-output`,
- strips the leading `#|` directive lines from every other code cell, and drops a cell
  that becomes empty (such as the `#| default_exp` cell),
- marks `#| export` cells, which then carry a small "exported to `tinyllama.x`" note,
- sets Python as the notebook language when nbdev-clean stripped the kernel metadata,
- warns (an error under `-W`) when a committed notebook holds an error output in a cell
  not tagged `raises-exception`: such a chapter is broken and must not be published.

It also keeps sphinx-thebe from adding its (broken, unused) scripts when thebe is off, and
puts an "Open in Colab" link under each notebook page's title; the URL is built
from the same theme options as the Colab launch button (so from pyproject's
`[project.urls] Repository`, see scripts/make_book_config.py).
"""
from __future__ import annotations

import json
import re
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

DIRECTIVE = re.compile(r"^\s*#\s*\|(.*)$")
DIRECTIVE_BODY = re.compile(r"([^\s:]+)\s*:?\s?(.*?)\s*$", re.S)  # as fastcore.nbio._directive
CELL_MAGIC = re.compile(r"^\s*%%\w+")
META_KEY = "nbdev_cells"


def _lines(source: str | list[str]) -> list[str]:
    text = "".join(source) if isinstance(source, list) else source
    return text.splitlines(keepends=True)


def split_directives(source: str | list[str]) -> tuple[list[tuple[str, str]], str]:
    """Leading nbdev/Quarto directives of a code cell as (name, value) pairs, and the source without them.

    Like nbdev, the directive region is the run of leading lines that are directives, cell
    magics or blank; directive lines are removed from it (magics stay). `#| export`,
    `#|export`, `# | export` give ("export", ""); `#| echo: false` gives ("echo", "false");
    `#| default_exp rope` gives ("default_exp", "rope"); a value `true` reads as "".
    """
    lines = _lines(source)
    directives: list[tuple[str, str]] = []
    kept: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = DIRECTIVE.match(line)
        if m:
            body = DIRECTIVE_BODY.match(m.group(1).strip())
            if body:
                name, value = body.groups()
                directives.append((name.lower(), "" if value == "true" else value))
        elif CELL_MAGIC.match(line):
            kept.append(line)
        elif line.strip():
            break
        i += 1
    if not directives:
        return [], "".join(lines)
    return directives, "".join(kept + lines[i:])


def _meta_directives(meta: dict[str, Any] | None) -> dict[str, str]:
    """nbdev 3 directives kept in a cell's or notebook's `nbdev` metadata (`nbdev-clean --to_meta`)."""
    d = (meta or {}).get("nbdev") or {}
    return {str(k).lower(): ("" if v in ("true", True) else str(v)) for k, v in d.items()} if isinstance(d, dict) else {}


def _is_false(arg: str) -> bool:
    return arg.strip().lower() in {"false", "no", "0"}


def transform_notebook(nb: dict[str, Any], lib_name: str = "tinyllama") -> tuple[dict[str, Any], list[str]]:
    """Apply the nbdev rules (see the module docstring) to a notebook dict.

    Returns the new notebook and a list of problems (error outputs left in the notebook).
    """
    nb_meta = nb.setdefault("metadata", {})
    if "language_info" not in nb_meta and not nb_meta.get("kernelspec", {}).get("language"):
        # nbdev-clean/jupytext may strip the kernel metadata; every notebook here is Python,
        # and MyST-NB needs a lexer to highlight the code.
        nb_meta["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    default_exp: str | None = _meta_directives(nb_meta).get("default_exp") or None
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            found = dict(split_directives(cell.get("source", ""))[0])
            found = {**_meta_directives(cell.get("metadata")), **found}
            if found.get("default_exp"):
                default_exp = found["default_exp"].split()[0]

    problems: list[str] = []
    cells = []
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            cells.append(cell)
            continue
        meta = cell.setdefault("metadata", {})
        tags = list(meta.get("tags", []))
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and "raises-exception" not in tags:
                problems.append(
                    f"cell {index + 1} has an error output ({out.get('ename', 'error')}: "
                    f"{out.get('evalue', '')!s:.120}); re-run the notebook or tag the cell raises-exception"
                )
        directives, rest = split_directives(cell.get("source", ""))
        names = {**_meta_directives(meta), **dict(directives)}  # comments win, as in nbdev
        if not names:
            cells.append(cell)
            continue

        def on(name: str) -> bool:
            return name in names and not _is_false(names[name])

        if on("hide") or _is_false(names.get("include", "true")):
            continue
        if on("hide_input") or _is_false(names.get("echo", "true")):
            tags.append("remove-input")
        if on("hide_output") or _is_false(names.get("output", "true")):
            tags.append("remove-output")
        for name in ("export", "exports", "exporti"):
            if on(name):
                module = names[name].split()[0] if names[name] else default_exp
                if module:
                    meta[META_KEY] = {"exported_to": f"{lib_name}.{module}"}
                    tags.append("nbdev-export")
                break
        if not rest.strip() and not cell.get("outputs"):
            continue
        cell["source"] = rest
        if tags:
            meta["tags"] = list(dict.fromkeys(tags))
        cells.append(cell)
    nb["cells"] = cells
    return nb, problems


def _on_source_read(app: Sphinx, docname: str, source: list[str]) -> None:
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    try:
        nb = json.loads(source[0])
    except json.JSONDecodeError:
        return  # MyST-NB reports unreadable notebooks itself
    nb, problems = transform_notebook(nb, app.config.nbdev_lib_name)
    for problem in problems:
        logger.warning(problem, location=docname, type="nbdev_cells", subtype="error_output")
    source[0] = json.dumps(nb)


def colab_url(app: Sphinx, docname: str) -> str | None:
    """Colab URL of a notebook page, from the theme's repository and launch-button options."""
    opts = app.config.html_theme_options or {}
    colab = (opts.get("launch_buttons") or {}).get("colab_url", "").rstrip("/")
    repo = opts.get("repository_url", "").rstrip("/")
    if not colab or not repo.startswith("https://github.com/"):
        return None
    owner_repo = repo.removeprefix("https://github.com/")
    branch = opts.get("repository_branch", "main")
    book_rel = opts.get("path_to_docs", "").strip("/")
    path = f"{book_rel}/{docname}.ipynb" if book_rel else f"{docname}.ipynb"
    return f"{colab}/github/{owner_repo}/blob/{branch}/{path}"


def _on_doctree_read(app: Sphinx, doctree: nodes.document) -> None:
    docname = app.env.docname
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    for cell in list(doctree.findall(nodes.container)):
        if cell.get("nb_element") != "cell_code":
            continue
        target = (cell.get("cell_metadata") or {}).get(META_KEY, {}).get("exported_to")
        if target and cell.parent is not None:
            note = nodes.paragraph(
                "", "", nodes.Text("exported to "), nodes.literal(target, target), classes=["nbdev-export-note"]
            )
            cell.parent.insert(cell.parent.index(cell), note)
    url = colab_url(app, docname)
    if url:
        link = nodes.paragraph(
            "",
            "",
            nodes.reference("", "Open this notebook in Colab", refuri=url, classes=["colab-link"]),
            classes=["colab-launch"],
        )
        section = next(iter(doctree.findall(nodes.section)), None)
        if section is not None and section.children and isinstance(section[0], nodes.title):
            section.insert(1, link)
        else:
            doctree.insert(0, link)


def _drop_unused_thebe(app: Sphinx, config) -> None:
    """Keep sphinx-thebe (always loaded by Jupyter Book) from adding its scripts when thebe is off.

    sphinx-thebe 0.3.1 adds its inline `const THEBE_JS_URL = ...` script twice under Sphinx 7,
    which throws "Identifier 'THEBE_JS_URL' has already been declared" on every page.
    """
    launch = (config.html_theme_options or {}).get("launch_buttons") or {}
    thebe_config = getattr(config, "thebe_config", None) or {}
    if launch.get("thebe") or (isinstance(thebe_config, dict) and thebe_config.get("always_load")):
        return
    for listener in list(app.events.listeners.get("env-before-read-docs", [])):
        handler = listener.handler
        if getattr(handler, "__module__", "") == "sphinx_thebe" and handler.__name__ == "init_thebe_core":
            app.disconnect(listener.id)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("nbdev_lib_name", "tinyllama", "env")
    app.connect("config-inited", _drop_unused_thebe)
    app.connect("source-read", _on_source_read)
    app.connect("doctree-read", _on_doctree_read)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
