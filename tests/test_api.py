"""Drop-in behaviour: errors, state_dict, pickle, convert, backend selection, compile, opcheck."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import backends, ops
from test_cpu_auto import _spy_backends
from tolerances import RTOL, rel_err

TORCH_CLS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell}


def pair(mode, backend="reference", **kwargs):
    kwargs = {"input_size": 4, "hidden_size": 5, **kwargs}
    torch.manual_seed(0)
    ref = TORCH_CLS[mode](**kwargs)
    ours = getattr(fusedrnn, mode)(**kwargs, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare whatever torch raises
        return type(e), str(e)
    return None, None


# ------------------------------------------------------------------------------ error parity
r = torch.randn
BAD_INPUTS = [
    # (id, mode, ctor kwargs, call(module))
    ("lstm-4d", "LSTM", {}, lambda m: m(r(2, 3, 4, 1))),
    ("lstm-1d", "LSTM", {}, lambda m: m(r(4))),
    ("lstm-input-size", "LSTM", {}, lambda m: m(r(3, 2, 7))),
    ("lstm-dtype", "LSTM", {}, lambda m: m(r(3, 2, 4, dtype=torch.float64))),
    ("lstm-seq-len-0", "LSTM", {}, lambda m: m(r(0, 2, 4))),
    ("lstm-hx-rank-batched", "LSTM", {}, lambda m: m(r(3, 2, 4), (r(2, 5), r(1, 2, 5)))),
    ("lstm-hx-rank-unbatched", "LSTM", {}, lambda m: m(r(3, 4), (r(1, 2, 5), r(1, 5)))),
    ("lstm-hx-shape", "LSTM", {}, lambda m: m(r(3, 2, 4), (r(1, 3, 5), r(1, 2, 5)))),
    ("lstm-cx-shape", "LSTM", {}, lambda m: m(r(3, 2, 4), (r(1, 2, 5), r(1, 2, 6)))),
    ("lstm-proj-hx-shape", "LSTM", {"proj_size": 3}, lambda m: m(r(3, 2, 4), (r(1, 2, 5), r(1, 2, 5)))),
    ("lstm-layers-hx", "LSTM", {"num_layers": 2}, lambda m: m(r(3, 2, 4), (r(1, 2, 5), r(2, 2, 5)))),
    ("lstm-bidir-hx", "LSTM", {"bidirectional": True}, lambda m: m(r(3, 2, 4), (r(1, 2, 5), r(1, 2, 5)))),
    ("lstm-batch-first-hx", "LSTM", {"batch_first": True}, lambda m: m(r(2, 3, 4), (r(1, 3, 5), r(1, 3, 5)))),
    ("lstm-packed-input-size", "LSTM", {}, lambda m: m(pack_padded_sequence(r(3, 2, 6), [3, 2]))),
    ("gru-4d", "GRU", {}, lambda m: m(r(2, 3, 4, 1))),
    ("gru-input-size", "GRU", {}, lambda m: m(r(3, 2, 7))),
    ("gru-dtype", "GRU", {}, lambda m: m(r(3, 2, 4, dtype=torch.float64))),
    ("gru-seq-len-0", "GRU", {}, lambda m: m(r(0, 2, 4))),
    ("gru-hx-rank-batched", "GRU", {}, lambda m: m(r(3, 2, 4), r(2, 5))),
    ("gru-hx-rank-unbatched", "GRU", {}, lambda m: m(r(3, 4), r(1, 2, 5))),
    ("gru-hx-shape", "GRU", {}, lambda m: m(r(3, 2, 4), r(1, 3, 5))),
    ("gru-packed-hx-shape", "GRU", {}, lambda m: m(pack_padded_sequence(r(3, 2, 4), [3, 2]), r(1, 3, 5))),
    ("lstmcell-3d", "LSTMCell", {}, lambda m: m(r(1, 2, 4))),
    ("lstmcell-hx-3d", "LSTMCell", {}, lambda m: m(r(2, 4), (r(1, 2, 5), r(2, 5)))),
    ("lstmcell-input-size", "LSTMCell", {}, lambda m: m(r(2, 3))),
    ("lstmcell-batch", "LSTMCell", {}, lambda m: m(r(2, 4), (r(3, 5), r(3, 5)))),
    ("lstmcell-hidden", "LSTMCell", {}, lambda m: m(r(2, 4), (r(2, 5), r(2, 6)))),
    ("lstmcell-dtype", "LSTMCell", {}, lambda m: m(r(2, 4, dtype=torch.float64))),
    ("grucell-3d", "GRUCell", {}, lambda m: m(r(1, 2, 4))),
    ("grucell-hx-3d", "GRUCell", {}, lambda m: m(r(2, 4), r(1, 2, 5))),
    ("grucell-input-size", "GRUCell", {}, lambda m: m(r(2, 3))),
    ("grucell-batch", "GRUCell", {}, lambda m: m(r(2, 4), r(3, 5))),
    ("grucell-hidden", "GRUCell", {}, lambda m: m(r(2, 4), r(2, 6))),
    ("grucell-dtype", "GRUCell", {}, lambda m: m(r(2, 4, dtype=torch.float64))),
    ("grucell-hx-dtype", "GRUCell", {}, lambda m: m(r(2, 4), r(2, 5, dtype=torch.float64))),
]


@pytest.mark.parametrize("case_id,mode,kwargs,call", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_same_error_as_torch(case_id, mode, kwargs, call):
    ref, ours = pair(mode, **kwargs)
    expected = outcome(lambda: call(ref))
    assert expected[0] is not None, "torch accepted this input: not a bad-input case"
    assert outcome(lambda: call(ours)) == expected


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_hidden_dtype_mismatch_raises_torchs_error(mode):
    # torch's message here depends on the device's native kernel (oneDNN / its CPU recurrence on
    # CPU, cuDNN on GPU): fusedrnn lets torch.nn raise it, so it is the same on every device
    ref, ours = pair(mode)
    h = r(1, 2, 5, dtype=torch.float64)
    hx = (h, r(1, 2, 5)) if mode == "LSTM" else h
    expected = outcome(lambda: ref(r(3, 2, 4), hx))
    assert expected[0] is RuntimeError
    assert outcome(lambda: ours(r(3, 2, 4), hx)) == expected


def test_bad_constructor_arguments_same_errors():
    for kwargs in ({"dropout": 1.5}, {"proj_size": 5}, {"proj_size": -1}, {"num_layers": 0}, {"hidden_size": 0}):
        full = {"input_size": 4, "hidden_size": 5, **kwargs}
        assert outcome(lambda: fusedrnn.LSTM(**full)) == outcome(lambda: nn.LSTM(**full))
    with pytest.raises(ValueError, match="unknown backend"):
        fusedrnn.LSTM(4, 5, backend="nope")


# ------------------------------------------------------------------------ parameters / state
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_parameters_and_init_match_torch(mode):
    kwargs = {"input_size": 4, "hidden_size": 5}
    if mode in ("LSTM", "GRU"):
        kwargs.update(num_layers=2, bidirectional=True)
    if mode == "LSTM":
        kwargs["proj_size"] = 3
    torch.manual_seed(7)
    ref = TORCH_CLS[mode](**kwargs)
    torch.manual_seed(7)
    ours = getattr(fusedrnn, mode)(**kwargs)
    assert isinstance(ours, TORCH_CLS[mode])
    ref_params = list(ref.named_parameters())
    our_params = list(ours.named_parameters())
    assert [n for n, _ in ref_params] == [n for n, _ in our_params]
    for (_, a), (_, b) in zip(ref_params, our_params):
        assert a.shape == b.shape and torch.equal(a, b)
    # state_dict both ways, strict
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_pickle_and_deepcopy(mode):
    _, ours = pair(mode, backend="reference")
    x = r(3, 2, 4) if mode in ("LSTM", "GRU") else r(2, 4)
    expected = ours(x)
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(clone) is type(ours) and clone.backend == "reference"
        got = clone(x)
        torch.testing.assert_close(got, expected)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.backend == "reference"


def test_repr_names_backend():
    assert repr(fusedrnn.LSTM(4, 5)) == repr(nn.LSTM(4, 5))
    assert "backend='reference'" in repr(fusedrnn.GRU(4, 5, backend="reference"))


def test_convert_in_place_keeps_everything():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
            self.dec = nn.Sequential(nn.GRU(10, 3), nn.Identity())
            self.c1 = nn.LSTMCell(3, 3)
            self.c2 = nn.GRUCell(3, 3)

        def forward(self, x):
            y, _ = self.enc(x)
            y, _ = self.dec[0](y)
            h, c = self.c1(y[-1])
            return self.c2(h, c)

    model = Model().double().eval()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    expected = model(x)
    params_before = [id(p) for p in model.parameters()]
    out = fusedrnn.convert(model, backend="reference")
    assert out is model
    assert type(model.enc) is fusedrnn.LSTM and type(model.dec[0]) is fusedrnn.GRU
    assert type(model.c1) is fusedrnn.LSTMCell and type(model.c2) is fusedrnn.GRUCell
    assert [id(p) for p in model.parameters()] == params_before
    assert not model.training and all(p.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(model(x), expected)
    single = fusedrnn.convert(nn.GRU(2, 2))
    assert type(single) is fusedrnn.GRU and single.backend == "auto"


# ------------------------------------------------------------------------------- backends
def test_available_backends_reports_every_backend():
    avail = fusedrnn.available_backends()
    assert set(avail) == {"triton", "cuda", "cpp", "reference", "torch"}
    assert avail["reference"] is None and avail["torch"] is None
    for name, reason in avail.items():
        assert reason is None or isinstance(reason, str) and reason


def test_explicit_unavailable_backend_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    monkeypatch.delenv("FUSEDRNN_CUDA_EMULATION", raising=False)  # (it would run cuda on CPU)
    m = fusedrnn.LSTM(4, 5, backend="cuda")
    with pytest.raises((NotImplementedError, ValueError), match="backend='cuda'"):
        m(r(3, 2, 4))


def test_auto_on_cpu_uses_torch_and_env_override(monkeypatch):
    calls = _spy_backends(monkeypatch)
    # a small fp32 LSTM over more than 4 steps: auto's CPU rule (backends._CPU_CPP_FROM_HIDDEN)
    # hands it to torch.nn (up to 4 steps its short-call clause picks cpp: tests/test_cpu_auto.py)
    ref, ours = pair("LSTM", backend="auto")
    x = r(6, 2, 4)
    torch.testing.assert_close(ours(x), ref(x))
    assert calls == []  # torch.nn's own forward, no op backend
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    torch.testing.assert_close(ours(x), ref(x))
    assert "reference" in calls
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        ours(x)


def test_torch_backend_is_torch_nn_exactly():
    ref, ours = pair("LSTM", backend="torch", num_layers=2)
    x = r(3, 2, 4)
    a, b = ref(x), ours(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_torch_backend_packed_and_unbatched_with_hx(mode):
    ref, ours = pair(mode, backend="torch", bidirectional=True)
    h = lambda *s: r(*s)  # noqa: E731
    hx = (h(2, 3, 5), h(2, 3, 5)) if mode == "LSTM" else h(2, 3, 5)
    packed = pack_padded_sequence(r(4, 3, 4), [2, 4, 3], enforce_sorted=False)
    a, b = ref(packed, hx), ours(packed, hx)
    assert torch.equal(a[0].data, b[0].data)
    hx1 = (h(2, 5), h(2, 5)) if mode == "LSTM" else h(2, 5)
    x1 = r(4, 4)
    torch.testing.assert_close(ours(x1, hx1), ref(x1, hx1), rtol=0, atol=0)


def test_auto_warns_once_when_falling_back(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_CUDA_EMULATION", raising=False)  # (it would run cuda on CPU)
    monkeypatch.setattr(backends, "_auto_candidates", lambda cfg, shape=None: ("cuda",))
    monkeypatch.setattr(backends, "_warned", set())
    _, ours = pair("GRU", backend="auto")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours(r(3, 2, 4))
        ours(r(3, 2, 4))
    msgs = [str(w.message) for w in rec if "falls back" in str(w.message)]
    assert len(msgs) == 1 and "cuda" in msgs[0]


# -------------------------------------------------------------------------------- dropout
def test_dropout_only_in_training_between_layers():
    ref, ours = pair("LSTM", num_layers=3, dropout=0.5)
    x = r(4, 3, 4)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    ours.train()
    torch.manual_seed(1)
    a = ours(x)[0]
    torch.manual_seed(1)
    b = ours(x)[0]
    torch.manual_seed(2)
    c = ours(x)[0]
    torch.testing.assert_close(a, b)  # same seed, same mask
    assert not torch.allclose(a, c)  # dropout is active in training
    with pytest.warns(UserWarning):
        ref1, ours1 = pair("GRU", num_layers=1, dropout=0.5)
    ours1.train()
    torch.testing.assert_close(ours1(x)[0], ref1(x)[0])  # no layer boundary, no dropout


# -------------------------------------------------------------------------------- autocast
def test_cpu_autocast_output_dtype_matches_torch():
    ref, ours = pair("GRU")
    x = r(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), ours(x)
    assert a[0].dtype == b[0].dtype and a[1].dtype == b[1].dtype
    # torch runs the GEMMs in bf16 under CPU autocast, fusedrnn in fp32: bf16-level agreement
    assert rel_err(b[0], a[0]) < RTOL[torch.bfloat16]
    ref_c, ours_c = pair("GRUCell")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours_c(r(2, 4)).dtype == ref_c(r(2, 4)).dtype


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_cuda_autocast_output_dtype_matches_torch(mode):
    ref, ours = pair(mode, backend="auto")
    ref, ours = ref.cuda(), ours.cuda()
    x = r(3, 2, 4).cuda() if "Cell" not in mode else r(2, 4).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        a, b = ref(x), ours(x)
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    assert a.dtype == b.dtype


# ------------------------------------------------------------------------- compile, opcheck
@pytest.mark.no_poison
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    kwargs = {"num_layers": 2, "bidirectional": True} if mode in ("LSTM", "GRU") else {}
    ref, ours = pair(mode, backend="reference", **kwargs)
    compiled = torch.compile(ours, fullgraph=True, backend="inductor" if mode == "LSTM" else "aot_eager")
    x = r(3, 2, 4, requires_grad=True) if "Cell" not in mode else r(2, 4, requires_grad=True)
    got = compiled(x)
    expected = ref(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    flat = lambda o: [t for item in (o if isinstance(o, tuple) else (o,)) for t in (item if isinstance(item, tuple) else (item,))]  # noqa: E731
    sum(t.sum() for t in flat(got)).backward()
    g_ours = x.grad.clone()
    x.grad = None
    sum(t.sum() for t in flat(expected)).backward()
    torch.testing.assert_close(g_ours, x.grad, rtol=1e-4, atol=1e-5)


def _op_samples(backend, dtype=torch.float64):
    T, B, H, P, I = 3, 2, 4, 3, 4
    g = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    req = lambda t: t.requires_grad_(True)  # noqa: E731
    lengths = torch.tensor([3, 1])
    yield ops.lstm_fwd, (req(g(T, B, 4 * H)), req(g(4 * H, H)), req(g(4 * H)), req(g(B, H)), req(g(B, H)), None, None, False, True, backend)
    yield ops.lstm_fwd, (req(g(T, B, 4 * H)), req(g(4 * H, P)), None, req(g(B, P)), req(g(B, H)), req(g(P, H)), lengths, True, True, backend)
    yield ops.gru_fwd, (req(g(T, B, 3 * H)), req(g(3 * H, H)), req(g(3 * H)), req(g(B, H)), lengths, True, True, backend)
    yield ops.gru_fwd, (req(g(T, B, 3 * H)), req(g(3 * H, H)), None, req(g(B, H)), None, False, True, backend)
    # inference (save=False): nothing requires grad, gates / cs come back empty
    yield ops.lstm_fwd, (g(T, B, 4 * H), g(4 * H, P), g(4 * H), g(B, P), g(B, H), g(P, H), lengths, True, False, backend)
    yield ops.gru_fwd, (g(T, B, 3 * H), g(3 * H, H), g(3 * H), g(B, H), lengths, False, False, backend)
    yield ops.lstm_cell_fwd, (req(g(B, 4 * H)), req(g(B, 4 * H)), req(g(4 * H)), req(g(4 * H)), req(g(B, H)), backend)
    yield ops.gru_cell_fwd, (req(g(B, 3 * H)), req(g(B, 3 * H)), req(g(3 * H)), None, req(g(B, H)), backend)


def _bwd_op_samples(backend, dtype=torch.float64):
    """The backward ops on saved tensors of real forwards (they carry autograd too: double backward)."""
    from fusedrnn.backends import reference as spec

    T, B, H = 3, 2, 2
    g = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    lengths = torch.tensor([3, 1])
    w4, c0, h0 = g(4 * H, H), g(B, H), g(B, H)
    _, _, _, gates, cs = spec.lstm_fwd(g(T, B, 4 * H), w4, g(4 * H), h0, c0, None, lengths, False)
    yield ops.lstm_bwd, (req(g(T, B, H)), req(g(B, H)), req(g(B, H)), req(w4), None, req(c0), req(gates), req(cs), lengths, False, backend)
    w3 = g(3 * H, H)
    y, _, ggates = spec.gru_fwd(g(T, B, 3 * H), w3, None, h0, lengths, True)
    yield ops.gru_bwd, (req(g(T, B, H)), req(g(B, H)), req(w3), req(h0), req(y), req(ggates), lengths, True, backend)
    _, c_new, cgates = spec.lstm_cell_fwd(g(B, 4 * H), g(B, 4 * H), None, None, c0)
    yield ops.lstm_cell_bwd, (req(g(B, H)), req(g(B, H)), req(c0), req(c_new), req(cgates), backend)
    _, gcgates = spec.gru_cell_fwd(g(B, 3 * H), g(B, 3 * H), None, None, h0)
    yield ops.gru_cell_bwd, (req(g(B, H)), req(h0), req(gcgates), backend)


@pytest.mark.no_poison
@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_opcheck(backend):
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    for op, args in _op_samples(backend):
        torch.library.opcheck(op, args)
    # the backward ops: schema, autograd registration and fake-tensor metadata (their autograd,
    # the spec's derivative, is checked numerically in test_parity_autodiff.py; the AOT-dispatch
    # checks would add a minute per backend)
    for op, args in _bwd_op_samples(backend):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------ TF32 flags (torch >= 2.9 API)
@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_tf32_flags_mixed_through_new_api(backend):
    """conv and rnn TF32 flags set differently through torch >= 2.9's API make the legacy
    ``cudnn.allow_tf32`` getter raise; every backend, the bench metadata and the tests follow
    ``cudnn.rnn.fp32_precision`` (what nn.LSTM follows) instead, and run."""
    from fusedrnn.backends import rnn_tf32, rnn_tf32_enabled
    from fusedrnn.bench import harness

    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is None or not hasattr(rnn, "fp32_precision"):
        pytest.skip("torch < 2.9 has one TF32 flag")
    if fusedrnn.available_backends()[backend] is not None:
        pytest.skip(f"{backend} unavailable")
    conv = torch.backends.cudnn.conv
    old = (conv.fp32_precision, rnn.fp32_precision)
    try:
        for conv_p, rnn_p in (("tf32", "ieee"), ("ieee", "tf32")):
            conv.fp32_precision, rnn.fp32_precision = conv_p, rnn_p
            with pytest.raises(RuntimeError):  # the fault class: the legacy getter raises here
                torch.backends.cudnn.allow_tf32
            assert rnn_tf32_enabled() == (rnn_p == "tf32")
            harness.environment(torch.device("cpu"))
            for cls in (fusedrnn.LSTM, fusedrnn.GRU):
                m = cls(8, 16, backend=backend)
                x = torch.randn(3, 2, 8, requires_grad=True)
                m(x)[0].sum().backward()
        with rnn_tf32(False):
            assert not rnn_tf32_enabled()
        assert rnn.fp32_precision == "tf32"  # restored
    finally:
        conv.fp32_precision, rnn.fp32_precision = old
