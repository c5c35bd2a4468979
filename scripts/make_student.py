#!/usr/bin/env python
"""Write the student edition of the course: every notebook with its solutions removed.

`make student` runs it; the notebooks land in `dist/student/`, ready to hand out. The
convention (appendix C, `nbs/92_exercises.ipynb`, shows it in full):

- In a code cell, the lines from `### BEGIN SOLUTION` to `### END SOLUTION` (nbgrader's
  markers) are the solution, and the student edition drops them. Where a block would be
  left without a body (`def f():` followed by the solution), or the cell would be empty,
  `raise NotImplementedError  # your code here` takes their place. The check that
  follows the markers stays, so it fails until the student writes an answer.
- A markdown cell that is a `{solution}`, `{solution-start}` or `{solution-end}` directive
  (sphinx-exercise, which hides solutions in the book until clicked) is dropped.
- Outputs and execution counts are cleared: a solution must not survive in an output.

Usage: `python scripts/make_student.py [--out dist/student] [NOTEBOOK ...]`
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = "raise NotImplementedError  # your code here"
_SOLUTION_MD = re.compile(r"^\s*(`{3,}|:{3,})\{solution(-start|-end)?\}")


def strip_code(src: str, where: str = "cell") -> str:
    "The code without its solution regions; a ValueError for unbalanced markers."
    out, inside, indent = [], False, ""
    for n, line in enumerate(src.splitlines(keepends=True), 1):
        text = line.strip()
        if text == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {n}: {BEGIN} inside a solution.")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            start = len(out)
        elif text == END:
            if not inside:
                raise ValueError(f"{where}, line {n}: {END} without {BEGIN}.")
            inside = False
            if _block_needs_body(out[:start]):  # `def f():` needs a body
                out.append(f"{indent}{STUB}\n")
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} is never closed by {END}.")
    if not any(ln.strip() for ln in out):  # the whole cell was the solution
        out = [f"{STUB}\n"]
    return "".join(out)


def _block_needs_body(before: list[str]) -> bool:
    "True when the last non-blank line before a removed region opens a block (`:`)."
    lines = [ln for ln in before if ln.strip() and not ln.strip().startswith("#")]
    return bool(lines) and lines[-1].rstrip().endswith(":")


def is_solution_markdown(src: str) -> bool:
    "True for a markdown cell that is a sphinx-exercise solution directive."
    return bool(_SOLUTION_MD.match(src))


def has_solutions(nb: dict) -> bool:
    "True when a notebook holds a solution in either form."
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "code" and BEGIN in src:
            return True
        if c["cell_type"] == "markdown" and is_solution_markdown(src):
            return True
    return False


def student_notebook(nb: dict, name: str = "notebook") -> dict:
    "A copy of the notebook `nb` (parsed JSON) without solutions or outputs."
    nb = copy.deepcopy(nb)
    cells = []
    for i, c in enumerate(nb["cells"]):
        src = "".join(c["source"])
        if c["cell_type"] == "markdown" and is_solution_markdown(src):
            continue
        if c["cell_type"] == "code":
            if BEGIN in src or END in src:
                src = strip_code(src, f"{name} cell {i}")
                c["source"] = src.splitlines(keepends=True)
                c.get("metadata", {}).pop("tags", None)  # the stub is the student's
            c["outputs"], c["execution_count"] = [], None
        cells.append(c)
    nb["cells"] = cells
    nb.get("metadata", {}).pop("widgets", None)  # saved widget state holds outputs
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "dist" / "student")
    args = p.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "nbs").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    n_solutions = 0
    for path in paths:
        nb = json.loads(path.read_text())
        n_solutions += has_solutions(nb)
        out = student_notebook(nb, path.name)
        with open(args.out / path.name, "w") as f:
            json.dump(out, f, indent=1, ensure_ascii=False)
            f.write("\n")
    print(
        f"wrote {len(paths)} student notebooks to {args.out} "
        f"({n_solutions} held solutions, now removed)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
