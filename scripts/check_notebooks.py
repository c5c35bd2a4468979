"""Checks the form of the notebooks: exported cells of at most 60 lines, code lines of at
most 88 columns (the width the book shows). Exits 1 and lists what is wrong.

    python scripts/check_notebooks.py            # every notebook in nbs/
    python scripts/check_notebooks.py nbs/05_attention.ipynb
"""

import json
import sys
from pathlib import Path

MAX_CELL_LINES = 60  # an exported cell a reader can follow
MAX_COLUMNS = 88  # what the rendered book shows without cutting the line off


def _exported(lines: list[str]) -> bool:
    "Whether the directives at the top of a cell (`#| ...` lines) include an export."
    for line in lines:
        directive = line.replace(" ", "")
        if not directive.startswith("#|"):
            return False
        if directive.startswith("#|export"):  # export, exporti, exports
            return True
    return False


def problems(path: Path) -> list[str]:
    "What is wrong with the notebook at `path`, one line each."
    found = []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        where = f"{path.name} cell {i} ({cell.get('id')})"
        exported = _exported(lines)
        if exported and len(lines) > MAX_CELL_LINES:
            found.append(f"{where}: exported cell of {len(lines)} lines (> 60)")
        for n, line in enumerate(lines, 1):
            if len(line) > MAX_COLUMNS:
                found.append(f"{where} line {n}: {len(line)} columns: {line[:60]}...")
    return found


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(Path("nbs").glob("*.ipynb"))
    found = [p for path in paths for p in problems(path)]
    print(*found, sep="\n")
    print(f"{len(found)} problem(s) in {len(paths)} notebook(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
