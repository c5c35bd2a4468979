"""Mutation tests for tinyllama.ppo and the GPU/Mac paths: each classic PPO bug of
tests/_mutants.py, and each fix of issue 14 undone, is put into a copy of the package, and
the tests named for it must then fail. A harmless change must leave its tests passing.

Each run checks that it imported the copy, not the working tree."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _mutants import DEVICE_MUTANTS, MUTANTS, SANITY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
WHICH = '''import tinyllama, os
def test_the_copy_is_imported():
    assert tinyllama.__file__.startswith(os.environ["TINYLLAMA_MUTANT_ROOT"]), tinyllama.__file__
'''


def run_mutant(tmp_path, module, old, new, node_ids):
    "Copy the package and its tests, put the bug in, run the node ids there: (exit code, output)."
    for name in ("tinyllama", "tests", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    path = tmp_path / module if "/" in module else tmp_path / "tinyllama" / module
    src = path.read_text()
    assert src.count(old) == 1, f"{old!r} occurs {src.count(old)} times in {module}: update tests/_mutants.py"
    path.write_text(src.replace(old, new))
    (tmp_path / "tests" / "test_aa_which_copy.py").write_text(WHICH)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TINYLLAMA_MUTANT_ROOT": str(tmp_path),
           "TINYLLAMA_PROFILE": "ci", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # no nbval, no coverage: seconds saved per run
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_aa_which_copy.py", "-x", *node_ids]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


ALL = MUTANTS + DEVICE_MUTANTS


@pytest.mark.parametrize("name, module, old, new, node_ids", ALL, ids=[m[0] for m in ALL])
def test_the_tests_catch_the_bug(tmp_path, name, module, old, new, node_ids):
    code, out = run_mutant(tmp_path, module, old, new, node_ids)
    assert "test_aa_which_copy.py" not in out, out[-3000:]  # the copy, not the working tree, was tested
    assert code == 1, f"{name}: the tests did not fail (exit code {code}):\n{out[-3000:]}"


def test_the_tests_pass_a_harmless_change(tmp_path):
    name, module, old, new, node_ids = SANITY
    code, out = run_mutant(tmp_path, module, old, new, node_ids)
    assert code == 0, out[-3000:]  # and so the copy was imported (test_aa_which_copy passed)
