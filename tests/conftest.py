"""Fixtures and helpers shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models gain nothing from a second thread, and on a busy machine idle threads spin: use one."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
