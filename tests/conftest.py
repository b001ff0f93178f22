"""Fixtures shared by the test files; helpers for child processes are in child_processes.py."""
import pytest
import torch

from child_processes import TORCHRUN_VARIABLES


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: the kernels split work by thread, which moves results in the
    last bits, and other work shares this machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_torchrun_env(monkeypatch):
    """A test process launched under torchrun must not make the stages it calls think they are rank k of W."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
