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


def _start_kernel_with_retries(start, attempts: int = 3):
    "nbval's kernel start, tried again when a kernel dies on the way up."
    def start_new_kernel(*args, **kwargs):
        for attempt in range(1, attempts + 1):
            try:
                return start(*args, **kwargs)
            except RuntimeError:  # "Kernel died before replying to kernel_info"
                if attempt == attempts: raise
    return start_new_kernel


# Two xdist workers that start kernels at the same moment can race for the same free port; the
# loser dies before it answers (nbval sends kernel stderr to /dev/null, so nothing says why), and
# every cell of that notebook then errors. That is the machine, not the notebook: start it again.
try:
    import nbval.kernel as _nbval_kernel
except ImportError:  # nbval is a dev dependency; plain `pytest tests/` works without it
    pass
else:
    _nbval_kernel.start_new_kernel = _start_kernel_with_retries(_nbval_kernel.start_new_kernel)
