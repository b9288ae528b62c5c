import pytest
import torch

import fedkit as fk


@pytest.fixture(scope="session")
def digits():
    return fk.data.load("digits")


@pytest.fixture
def tiny_model():
    """A one-weight model whose value is easy to follow by hand."""
    def make():
        m = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            m.weight.fill_(1.0)
        return m
    return make


@pytest.fixture(scope="module")
def one_thread():
    """The models in a module that uses this are tiny: one torch thread is faster, and far faster on a busy
    shared machine. Results do not depend on it (every random number is seeded); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
