import pytest
import torch


@pytest.fixture
def rng():
    """Fresh random inputs on every run: the seed is printed when a test fails."""
    seed = torch.seed()
    gen = torch.Generator().manual_seed(seed)
    yield gen
    print(f"seed {seed}")
