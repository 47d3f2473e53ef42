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


def gpt2_available():
    """tiktoken's GPT-2 vocabulary is downloaded on first use; offline it needs TIKTOKEN_CACHE_DIR."""
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked needs_gpt2 skip, with the reason, where the vocabulary cannot be loaded."""
    marked = [item for item in items if "needs_gpt2" in item.keywords]
    if marked and not gpt2_available():
        skip = pytest.mark.skip(reason="tiktoken's GPT-2 vocabulary is not available offline: "
                                       "point TIKTOKEN_CACHE_DIR at a copy of its cache (README)")
        for item in marked:
            item.add_marker(skip)
