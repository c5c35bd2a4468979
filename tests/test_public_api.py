"""The surface people reach for with `import tinyllama`: the names, their docstrings, a
light import."""
import importlib, inspect, pkgutil, subprocess, sys

import pytest

import tinyllama

MODULES = [
    importlib.import_module(f"tinyllama.{m.name}")
    for m in pkgutil.iter_modules(tinyllama.__path__)
    if not m.name.startswith("_")
]


def _undocumented(obj) -> bool:
    doc = (obj.__doc__ or "").strip()
    # a dataclass or NamedTuple without a docstring gets its signature as __doc__
    return not doc or doc.startswith(f"{getattr(obj, '__name__', '')}(")


def test_the_top_level_names_are_the_modules_objects():
    for name in tinyllama.__all__:
        obj = getattr(tinyllama, name)
        home = importlib.import_module(obj.__module__)
        assert getattr(home, name) is obj, name
        assert name in home.__all__, f"{name} is not public in {home.__name__}"
    for name in ("LLM", "LLMConfig", "generate", "train", "TrainingConfig", "Tokenizer"):
        assert name in tinyllama.__all__, name
    for name in ("save_hf", "load_hf", "PPOTrainer", "GoldenRewardModel", "RewardModel"):
        assert name in tinyllama.__all__, name


def test_train_and_generate_are_the_functions_and_their_modules_stay_importable():
    assert callable(tinyllama.train) and callable(tinyllama.generate)
    assert inspect.isfunction(tinyllama.train) and inspect.isfunction(tinyllama.generate)
    from tinyllama.train import TrainingConfig, lr_at  # noqa: F401 (from-imports see the module)

    assert importlib.import_module("tinyllama.train").train is tinyllama.train


def test_modules_declare_what_is_public():
    for mod in MODULES:
        assert hasattr(mod, "__all__"), f"{mod.__name__} has no __all__"
        private = [n for n in mod.__all__ if n.startswith("_")]
        assert not private, f"{mod.__name__}.__all__ lists private names {private}"
        missing = [n for n in mod.__all__ if not hasattr(mod, n)]
        assert not missing, f"{mod.__name__}.__all__ lists names it lacks: {missing}"


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for mod in MODULES:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # constants are documented by the comment beside them
            if obj.__module__ != mod.__name__:
                continue  # re-exported: checked where it is defined
            if _undocumented(obj):
                missing.append(f"{mod.__name__}.{name}")
            for attr, member in vars(obj).items() if inspect.isclass(obj) else ():
                prop = isinstance(member, property)
                if attr.startswith("_") or not (prop or inspect.isfunction(member)):
                    continue
                if not (member.__doc__ or "").strip():  # a property's is its own or fget's
                    missing.append(f"{mod.__name__}.{name}.{attr}")
    assert not missing, "no docstring: " + ", ".join(missing)


def test_the_docstring_check_notices_a_missing_docstring():
    from dataclasses import dataclass

    @dataclass
    class Bare:
        x: int

    def bare():
        pass

    assert _undocumented(Bare) and _undocumented(bare)
    assert not _undocumented(tinyllama.LLM)


@pytest.mark.slow
def test_importing_the_package_does_not_import_the_notebook_and_plot_libraries():
    code = (
        "import sys, tinyllama; "
        "print([m for m in ('ipywidgets', 'matplotlib', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
