"""The inference path (issue 10 item 1): a forward nothing will differentiate saves nothing.

The modules pass ``save = ops.needs_saving(inputs)`` to the recurrence ops; with ``save=False``
every backend returns gates / cs as empty (0,) tensors (and writes none of them), while y, h_n
and c_n are bitwise those of the saving forward.  A backward of an unsaved forward raises.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import backends, ops

BACKENDS = ["reference", "cpp", "triton", "cuda"]


def _backend_or_skip(name):
    """Skips an unavailable backend (cuda on a CPU machine without FUSEDRNN_CUDA_EMULATION=1);
    returns the device its tensors live on (CPU: the Triton interpreter, the CUDA emulation)."""
    reason = backends.unavailable_reason(name)
    if reason is not None:
        pytest.skip(reason)
    return "cuda" if name in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


class _SaveSpy:
    """Records the ``save`` argument of every recurrence forward the backend module receives."""

    def __init__(self, monkeypatch, name):
        self.saves = []
        mod = backends.get(name)
        for fn in ("lstm_fwd", "gru_fwd"):
            orig = getattr(mod, fn)

            def spy(*args, _orig=orig, save=True, **kwargs):
                self.saves.append(save)
                out = _orig(*args, save=save, **kwargs)
                return out

            monkeypatch.setattr(mod, fn, spy)


def _model(mode, backend, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return getattr(fusedrnn, mode)(5, 7, backend=backend, dtype=dtype, **kw)


CASES = [
    ("LSTM", {}),
    ("LSTM", {"proj_size": 3, "num_layers": 2, "bidirectional": True}),
    ("GRU", {"num_layers": 2, "bidirectional": True, "bias": False}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kw", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("packed", [False, True])
def test_inference_outputs_bitwise_equal_training_forward(backend, mode, kw, packed, monkeypatch):
    device = _backend_or_skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    m = _model(mode, backend, dtype=dtype, **kw).to(device)
    x = torch.randn(4, 3, 5, dtype=dtype, device=device)
    lengths = [4, 1, 3]  # unsorted
    arg = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    spy = _SaveSpy(monkeypatch, backend)

    def run():
        out, state = m(arg)
        data = out.data if packed else out
        return [data] + list(state if isinstance(state, tuple) else (state,))

    trained = [t.detach() for t in run()]
    assert spy.saves and all(spy.saves), "a forward with parameters requiring grad must save"
    for ctx in (torch.no_grad, torch.inference_mode):
        spy.saves.clear()
        with ctx():
            got = run()
        assert spy.saves and not any(spy.saves), f"under {ctx.__name__} nothing may be saved"
        for a, b in zip(got, trained):
            assert torch.equal(a, b)
    # frozen parameters and an input that needs no grad: nothing to save either
    m.requires_grad_(False)
    spy.saves.clear()
    got = run()
    assert spy.saves and not any(spy.saves)
    for a, b in zip(got, trained):
        assert torch.equal(a, b)
    # frozen parameters, but the input requires grad (a saliency map): save
    spy.saves.clear()
    x.requires_grad_(True)
    arg = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    out = run()
    assert spy.saves and all(spy.saves)
    out[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsaved_ops_return_empty_saved_tensors(backend):
    device = _backend_or_skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    T, B, H, P = 3, 2, 4, 3
    g = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    lengths = torch.tensor([3, 0], device=device)  # a zero length too
    args = (g(T, B, 4 * H), g(4 * H, P), g(4 * H), g(B, P), g(B, H), g(P, H), lengths, True)
    full = ops.lstm_fwd(*args, True, backend)
    lean = ops.lstm_fwd(*args, False, backend)
    for a, b in zip(lean[:3], full[:3]):
        assert torch.equal(a, b)
    assert lean[3].shape == (0,) and lean[3].dtype == full[3].dtype
    assert lean[4].shape == (0,) and lean[4].dtype == full[4].dtype
    gargs = (g(T, B, 3 * H), g(3 * H, H), None, g(B, H), lengths, False)
    full = ops.gru_fwd(*gargs, True, backend)
    lean = ops.gru_fwd(*gargs, False, backend)
    for a, b in zip(lean[:2], full[:2]):
        assert torch.equal(a, b)
    assert lean[2].shape == (0,) and lean[2].dtype == full[2].dtype


def test_backward_of_an_unsaved_forward_raises():
    T, B, H = 3, 2, 4
    g = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    y, *_ = ops.lstm_fwd(g(T, B, 4 * H), g(4 * H, H), None, g(B, H), g(B, H), None, None, False, False, "reference")
    with pytest.raises(RuntimeError, match="save=False"):
        y.sum().backward()
    y, *_ = ops.gru_fwd(g(T, B, 3 * H), g(3 * H, H), None, g(B, H), None, False, False, "reference")
    with pytest.raises(RuntimeError, match="save=False"):
        y.sum().backward()


def test_transforms_still_save():
    """torch.func transforms and forward-mode AD differentiate the op: they get save=True."""
    m = _model("LSTM", "reference")
    ref = torch.nn.LSTM(5, 7, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    g_ours = torch.func.grad(lambda v: m(v)[0].sum())(x)
    g_ref = torch.func.grad(lambda v: ref(v)[0].sum())(x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # jvp under no_grad: forward AD still needs the tangents
        t = torch.randn_like(x)
        _, j_ours = torch.func.jvp(lambda v: m(v)[0], (x,), (t,))
        _, j_ref = torch.func.jvp(lambda v: ref(v)[0], (x,), (t,))
    torch.testing.assert_close(j_ours, j_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.no_poison
def test_compiled_inference_forward():
    torch._dynamo.reset()
    m = _model("GRU", "reference", num_layers=2)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    expected = m(x)[0].detach()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x)[0]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_traced_under_no_grad_still_trains(mode):
    """torch.jit.trace records ``save`` as a constant: a trace made under no_grad must still
    differentiate (torch.nn's traces do), so tracing always saves."""
    m = _model(mode, "reference")
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        traced = torch.jit.trace(m, (x,), check_trace=False)
    out = traced(x)[0]
    out.sum().backward()
    expected = torch.autograd.grad(m(x)[0].sum(), m.weight_hh_l0)[0]
    torch.testing.assert_close(traced.weight_hh_l0.grad, expected, rtol=1e-12, atol=1e-14)


def test_backward_ops_refuse_unsaved_tensors():
    T, B, H = 3, 2, 4
    g = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    y, h, c, gates, cs = ops.lstm_fwd(g(T, B, 4 * H), g(4 * H, H), None, g(B, H), g(B, H), None, None, False,
                                      False, "reference")
    with pytest.raises(RuntimeError, match="save=False"):
        ops.lstm_bwd(g(T, B, H), g(B, H), g(B, H), g(4 * H, H), None, g(B, H), gates, cs, None, False, "reference")
    y, h, gates = ops.gru_fwd(g(T, B, 3 * H), g(3 * H, H), None, g(B, H), None, False, False, "reference")
    with pytest.raises(RuntimeError, match="save=False"):
        ops.gru_bwd(g(T, B, H), g(B, H), g(3 * H, H), g(B, H), y, gates, None, False, "reference")
