"""Test session setup.

* Without a GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET=1 must
  be set before triton is first imported, so it is set here, at collection time.
* ``poison_empty`` (autouse): torch.empty / empty_like / new_empty return NaN-filled floating
  tensors, so any output element a kernel forgets to write shows up as NaN.
* ``@pytest.mark.gpu`` tests are skipped without CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedrnn  # noqa: E402  (after TRITON_INTERPRET)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "no_poison: do not NaN-poison torch.empty* in this test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    return wrapper


@pytest.fixture(autouse=True)
def poison_empty(request, monkeypatch):
    if "no_poison" in request.keywords:
        yield
        return
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture
def no_tf32():
    """fp32 recurrences in IEEE fp32 inside the test (the rnn TF32 flag off), restored after."""
    with fusedrnn.backends.rnn_tf32(False):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
