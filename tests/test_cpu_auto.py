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


def _spy_backends(monkeypatch):
    """The kernel backends a call asks for (backends.get), in order."""
    calls = []
    real = backends.get

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backends, "get", spy)
    return calls


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
    calls = _spy_backends(monkeypatch)
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
    calls = _spy_backends(monkeypatch)
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


# ------------------------------------------------------------------------- short (streaming) calls
def _resolve_shape(mode, dtype, hidden, shape, grad=True):
    cfg = RecurrenceConfig(mode, "cpu", -1, dtype, hidden)
    with torch.set_grad_enabled(grad):
        return backends.resolve("auto", cfg, shape)


def _table(mode, dtype, hidden, grad):
    start = backends._CPU_CPP_FROM_HIDDEN.get((mode, dtype, "training" if grad else "inference"))
    return "cpp" if start is not None and hidden >= start else "torch"


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_short_call_rule(grad):
    """fp32 LSTM: cpp for T <= 4 with B <= 16 (oneDNN's per-call setup dominates); one step of
    anything torch.nn runs without oneDNN (GRU; LSTM in fp16 / fp64): torch; else the table."""
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    for hidden in (64, 512, 1024):
        for shape in [(1, 1), (1, 16), (2, 1), (4, 4), (4, 16)]:
            assert _resolve_shape("LSTM", torch.float32, hidden, shape, grad) == "cpp", (hidden, shape)
        for shape in [(1, 17), (5, 1), (16, 4), (64, 16), (1, 0)]:
            want = _table("LSTM", torch.float32, hidden, grad)
            assert _resolve_shape("LSTM", torch.float32, hidden, shape, grad) == want, (hidden, shape)
        for dtype in DTYPES:
            assert _resolve_shape("GRU", dtype, hidden, (1, 1), grad) == "torch"
            assert _resolve_shape("GRU", dtype, hidden, (1, 64), grad) == "torch"
            assert _resolve_shape("GRU", dtype, hidden, (2, 1), grad) == _table("GRU", dtype, hidden, grad)
        for dtype in (torch.float16, torch.float64):
            assert _resolve_shape("LSTM", dtype, hidden, (1, 1), grad) == "torch"
            assert _resolve_shape("LSTM", dtype, hidden, (2, 1), grad) == _table("LSTM", dtype, hidden, grad)
        for shape in [(1, 1), (1, 16)]:
            assert _resolve_shape("LSTM", torch.bfloat16, hidden, shape, grad) == _table("LSTM", torch.bfloat16, hidden, grad)
    # without a shape (cells, compiled graphs): the table alone
    assert _resolve_shape("GRU", torch.float32, 64, None, grad) == "cpp"
    assert _resolve_shape("LSTM", torch.float32, 64, None, grad) == "torch"
    # CPU autocast still sends every LSTM to cpp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _resolve_shape("LSTM", torch.float64, 64, (1, 1), grad) == "cpp"


@pytest.mark.parametrize("batch_first", [False, True])
def test_modules_pass_their_steps_and_batch_to_auto(monkeypatch, batch_first):
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    calls = _spy_backends(monkeypatch)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 16, batch_first=batch_first)
    m = fusedrnn.LSTM(8, 16, batch_first=batch_first)
    m.load_state_dict(ref.state_dict())
    step = torch.randn(2, 1, 8) if batch_first else torch.randn(1, 2, 8)  # one step of two sequences
    torch.testing.assert_close(m(step), ref(step))
    assert "cpp" in calls
    calls.clear()
    long = torch.randn(6, 6, 8)  # six steps either way: the table (torch.nn below H = 1024)
    torch.testing.assert_close(m(long), ref(long))
    assert "cpp" not in calls
    calls.clear()
    unbatched = torch.randn(1, 8)  # (T = 1, I): one step of one sequence
    torch.testing.assert_close(m(unbatched), ref(unbatched))
    assert "cpp" in calls
    calls.clear()
    gru_ref = torch.nn.GRU(8, 16, batch_first=batch_first)
    gru = fusedrnn.GRU(8, 16, batch_first=batch_first)
    gru.load_state_dict(gru_ref.state_dict())
    torch.testing.assert_close(gru(step), gru_ref(step))  # one GRU step: torch.nn
    assert "cpp" not in calls
    torch.testing.assert_close(gru(long), gru_ref(long))
    assert "cpp" in calls


def test_short_call_rule_needs_onednn_lstm():
    """The fp32 LSTM clause is about oneDNN's per-call setup: with a projection or with oneDNN
    disabled torch.nn runs its own cheap one-step path, and a single step goes to torch.nn."""
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    proj = RecurrenceConfig("LSTM", "cpu", -1, torch.float32, 64, 32)
    assert backends.resolve("auto", proj, (1, 1)) == "torch"
    assert backends.resolve("auto", RecurrenceConfig("LSTM", "cpu", -1, torch.float32, 64), (1, 1)) == "cpp"
    with torch.backends.mkldnn.flags(enabled=False):
        assert backends.resolve("auto", RecurrenceConfig("LSTM", "cpu", -1, torch.float32, 64), (1, 1)) == "torch"


def test_packed_input_reaches_the_short_call_rule(monkeypatch):
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    calls = _spy_backends(monkeypatch)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 16)
    m = fusedrnn.LSTM(8, 16)
    m.load_state_dict(ref.state_dict())
    one_step = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(1, 3, 8), [1, 1, 1])  # T = 1, B = 3
    got, want = m(one_step), ref(one_step)
    torch.testing.assert_close(got[0].data, want[0].data)
    assert "cpp" in calls
    calls.clear()
    longer = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 8), [5, 3, 2])
    torch.testing.assert_close(m(longer)[0].data, ref(longer)[0].data)
    assert "cpp" not in calls


def test_traced_calls_use_the_hidden_size_rule(monkeypatch):
    """jit.trace records one backend for every later size: it must not come from the example's T and B."""
    if not _cpp_built():
        pytest.skip("cpp backend not built")
    calls = _spy_backends(monkeypatch)
    torch.manual_seed(0)
    m = fusedrnn.LSTM(8, 16)
    ref = torch.nn.LSTM(8, 16)
    ref.load_state_dict(m.state_dict())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        traced = torch.jit.trace(m, (torch.randn(1, 2, 8),), check_trace=False)
    # the rule reads no size: no "tensor to a Python integer" conversion is recorded
    assert not [w for w in rec if "Python integer" in str(w.message)]
    assert "cpp" not in calls  # the table: torch.nn at H = 16
    x = torch.randn(7, 3, 8)
    torch.testing.assert_close(traced(x), ref(x))
