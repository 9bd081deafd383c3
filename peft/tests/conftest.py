"""Shared fixtures for the fork's tests."""
import pytest
import torch

from tiny_llama import make_tiny_llama


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 96, (2, 9), generator=g)
