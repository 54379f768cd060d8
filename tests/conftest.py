"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation (up to 10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
