"""Shared by the test files: single-threaded torch, the needs_gpt2 marker, and small helpers
(`from conftest import ...`)."""
import os
import signal
import sys
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules (model, sample, export, ...)


def rel(a, b):
    """Relative error of a against b, in the Frobenius norm."""
    return ((a - b).norm() / b.norm()).item()


def tokens(args, B=2, T=24, seed=1):
    """Random token ids (B, T) below args.vocab_size, the same for the same seed."""
    return torch.randint(0, args.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def save_ckpt(model, path):
    """Writes model as train.py writes a checkpoint (less the optimizer) at path; returns path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": asdict(model.args), "iter_num": 7,
                "best_val_loss": 2.5, "config": {}}, path)
    return path


def fake_device(monkeypatch, cc=None, mps=False):
    """This process sees one CUDA GPU of compute capability cc (None: none), or Apple's MPS."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cc is not None))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU{cc[0]}{cc[1]}")
    # as torch's: True through emulation on any CUDA GPU, natively from compute capability 8.0
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        cc is not None and (including_emulation or cc >= (8, 0)))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


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


@pytest.fixture(autouse=True)
def python_sigpipe():
    """A script run in-process restores SIGPIPE's default action (configurator.configure); pytest itself
    keeps Python's, so that a write to a closed pipe raises instead of killing the test run."""
    yield
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
