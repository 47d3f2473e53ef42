import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test models are tiny: one thread is as fast, and immune to OpenMP threads spinning
    against each other (and everything else) on a busy 2-core CI machine. Subprocesses (train.py
    under test) are not affected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
