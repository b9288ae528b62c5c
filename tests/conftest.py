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
