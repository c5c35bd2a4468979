"""Root pytest configuration.

nbdev-clean nulls every execution count, and nbval then refuses cells that carry
outputs ("Unrun reference cell has outputs") even under --nbval-lax. We give each
collected notebook cell with outputs a count so nbval re-runs it and ignores the
committed outputs (lax mode compares only cells marked NBVAL_CHECK_OUTPUT).
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None and cell.get("cell_type") == "code" and cell.get("execution_count") is None:
            cell["execution_count"] = 1
