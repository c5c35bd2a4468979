"""The student edition (`make student`): solutions removed, self-checks intact.

A self-check that passes with no answer is a defect: the stripped notebooks are executed
and every cell that held a solution must fail there (nbval runs the full notebooks, where
the same cells pass).
"""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("make_student", ROOT / "scripts/make_student.py")
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)


def nb_of(*cells):
    def cell(kind, src):
        c = {"cell_type": kind, "metadata": {}, "source": src.splitlines(keepends=True)}
        if kind == "code":
            c["outputs"], c["execution_count"] = [{"output_type": "stream", "text": "x"}], 3
        return c

    return {"cells": [cell(k, s) for k, s in cells], "metadata": {}, "nbformat": 4}


def test_a_solution_inside_a_function_leaves_a_stub_with_its_indentation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\ncheck(f)\n"
    out = ms.strip_code(src)
    assert out == f"def f(x):\n    {ms.STUB}\n\ncheck(f)\n"
    compile(out, "stub", "exec")  # still valid Python


def test_a_solution_cell_keeps_its_check_and_an_empty_cell_gets_a_stub():
    src = "### BEGIN SOLUTION\ndef f(x):\n    return x\n### END SOLUTION\nassert check(f)\n"
    assert ms.strip_code(src) == "assert check(f)\n"
    assert ms.strip_code("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n") == ms.STUB + "\n"


@pytest.mark.parametrize(
    "src, word",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside"),
    ],
)
def test_unbalanced_markers_are_a_clear_error(src, word):
    with pytest.raises(ValueError, match=word):
        ms.strip_code(src, "demo cell 4")


def test_solution_directives_and_outputs_are_dropped():
    nb = nb_of(
        ("markdown", "```{exercise} Add\n:label: ex-add\nWrite add.\n```"),
        ("code", "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION\n"),
        ("markdown", "```{solution} ex-add\n:class: dropdown\nUse `+`.\n```"),
        ("markdown", "```{solution-start} ex-add\n```"),
        ("code", "### BEGIN SOLUTION\nsecret = 42\n### END SOLUTION\nassert add(1, 2) == 3"),
        ("markdown", "```{solution-end}\n```"),
    )
    out = ms.student_notebook(nb)
    text = json.dumps(out)
    assert [c["cell_type"] for c in out["cells"]] == ["markdown", "code", "code"]
    assert "a + b" not in text and "secret" not in text and "Use `+`" not in text
    assert all(c["outputs"] == [] and c["execution_count"] is None
               for c in out["cells"] if c["cell_type"] == "code")
    assert ms.has_solutions(nb) and not ms.has_solutions(out)


def _solution_regions(nb) -> list[str]:
    regions = []
    for c in nb["cells"]:
        src = "".join(c["source"])
        while c["cell_type"] == "code" and ms.BEGIN in src:
            body = src.split(ms.BEGIN, 1)[1].split(ms.END, 1)
            regions.append(body[0])
            src = body[1]
    return regions


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.name)
def test_no_solution_survives_in_the_student_notebooks(path):
    nb = json.loads(path.read_text())
    student = ms.student_notebook(nb, path.name)
    out = json.dumps(student)
    for c in student["cells"]:
        if c["cell_type"] == "code":
            marks = {ln.strip() for ln in c["source"]} & {ms.BEGIN, ms.END}
            assert not marks, (path.name, marks)
    assert not ms.has_solutions(ms.student_notebook(nb))
    for region in _solution_regions(nb):
        lines = [ln.strip() for ln in region.splitlines() if len(ln.strip()) > 12]
        assert not lines or json.dumps("\n".join(lines))[1:-1] not in out


def test_make_student_writes_every_notebook(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/make_student.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, check=True)
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in NBS]
    assert "student notebooks" in r.stdout


WITH_SOLUTIONS = [p for p in NBS if ms.has_solutions(json.loads(p.read_text()))]


def test_some_chapter_has_a_solution_to_strip():
    assert WITH_SOLUTIONS  # the test below must have something to run


@pytest.mark.slow
@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=lambda p: p.name)
def test_each_self_check_fails_on_the_student_notebook(path, monkeypatch):
    import nbclient
    import nbformat

    full = json.loads(path.read_text())
    student = ms.student_notebook(full, path.name)
    kept = [c for c in full["cells"] if not (c["cell_type"] == "markdown"
                                             and ms.is_solution_markdown("".join(c["source"])))]
    solved = [i for i, c in enumerate(kept) if c["cell_type"] == "code" and ms.BEGIN in "".join(c["source"])]
    assert solved, "every notebook with solutions has a code cell to check"
    nb = nbformat.reads(json.dumps(student), as_version=4)
    monkeypatch.setenv("TINYLLAMA_PROFILE", "ci")  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, allow_errors=True,
                                     resources={"metadata": {"path": str(ROOT / "nbs")}})
    client.execute()
    failed = {i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))}
    passed_without_answer = [i for i in solved if i not in failed]
    assert not passed_without_answer, (
        f"{path.name}: the self-check in cell(s) {passed_without_answer} passes with the "
        "solution removed; it cannot tell a student's answer from none."
    )


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.name)
def test_solved_exercises_have_titles_sphinx_exercise_can_reference(path):
    # A solution's title repeats its exercise's title; inline code there leaves the label
    # undefined and the book build (-W) fails.
    import re

    for c in json.loads(path.read_text())["cells"]:
        src = "".join(c["source"])
        m = re.match(r"```\{exercise\}([^\n]*)\n:label: (\S+)", src)
        if m and any(f"{{solution-start}} {m.group(2)}" in "".join(d["source"])
                     for d in json.loads(path.read_text())["cells"]):
            assert "`" not in m.group(1), f"{path.name}: exercise {m.group(2)} has code in its title"
