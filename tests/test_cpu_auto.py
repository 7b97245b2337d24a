"""``backend="auto"`` on CPU: the measured rule of backends._cpu_candidates (README "CPU").

cpp where the CPU suite measured it faster than torch.nn (per mode, dtype, hidden size and pass),
torch.nn elsewhere, and cpp wherever torch.nn cannot run (LSTM under CPU autocast)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fusedrnn
from fusedrnn import backends
from fusedrnn.backends import RecurrenceConfig

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def _resolve(mode, dtype, hidden, grad=True):
    cfg = RecurrenceConfig(mode, "cpu", -1, dtype, hidden)
    with torch.set_grad_enabled(grad):
        return backends.resolve("auto", cfg)


def _cpp_built():
    return backends.unavailable_reason("cpp") is None


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_rule_follows_the_measured_table(mode, dtype, grad):
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    phase = "training" if grad else "inference"
    start = backends._CPU_CPP_FROM_HIDDEN.get((mode, dtype, phase))
    for hidden in (1, 64, 511, 512, 1023, 1024, 4096):
        want = "cpp" if start is not None and hidden >= start else "torch"
        assert _resolve(mode, dtype, hidden, grad) == want, (mode, dtype, phase, hidden)


def test_table_shape():
    """Every entry names a recurrence, a dtype the cpp backend runs and a pass; cells stay on torch."""
    for (mode, dtype, phase), start in backends._CPU_CPP_FROM_HIDDEN.items():
        assert mode in ("LSTM", "GRU") and dtype in DTYPES and phase in ("inference", "training")
        assert isinstance(start, int) and start >= 1
    for mode in ("LSTMCell", "GRUCell"):
        assert _resolve(mode, torch.float32, 4096) == "torch"
    # the measured outcome the README states: every GRU runs on cpp
    for dtype in DTYPES:
        for phase in ("inference", "training"):
            assert backends._CPU_CPP_FROM_HIDDEN[("GRU", dtype, phase)] == 1


def test_lstm_under_cpu_autocast_never_goes_to_torch():
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for hidden in (1, 64, 4096):
            for grad in (True, False):
                assert _resolve("LSTM", torch.float32, hidden, grad) == "cpp"


def test_lstm_module_under_cpu_autocast_runs_on_cpp(monkeypatch):
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    calls = []
    real = backends.get

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backends, "get", spy)
    torch.manual_seed(0)
    m = fusedrnn.LSTM(8, 16)
    x = torch.randn(5, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    assert "cpp" in calls and torch.isfinite(out).all()
    explicit = fusedrnn.LSTM(8, 16, backend="cpp")
    explicit.load_state_dict(m.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = explicit(x)[0]
    assert torch.equal(out, want)


def test_gru_module_auto_runs_cpp_and_matches_torch(monkeypatch):
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    calls = []
    real = backends.get

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backends, "get", spy)
    torch.manual_seed(0)
    ref = torch.nn.GRU(8, 16)
    m = fusedrnn.GRU(8, 16)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(m(x), ref(x))
    assert "cpp" in calls


def test_auto_falls_back_to_torch_with_a_warning_when_cpp_is_missing(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: "not built (test)" if name == "cpp" else None)
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _resolve("GRU", torch.float32, 64) == "torch"
        assert _resolve("GRU", torch.float32, 64) == "torch"
    msgs = [str(w.message) for w in rec if "falls back" in str(w.message)]
    assert len(msgs) == 1 and "cpp: not built (test)" in msgs[0]


def test_explicit_backends_ignore_the_rule():
    cfg = RecurrenceConfig("GRU", "cpu", -1, torch.float32, 64)
    assert backends.resolve("torch", cfg) == "torch"
    assert backends.resolve("reference", cfg) == "reference"
