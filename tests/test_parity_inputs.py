"""Input parity with torch.nn as the oracle, for every backend that runs on CPU.

Malformed states and dtype mixes raise exactly torch.nn's exception (type and message) or, where
torch.nn silently accepts a malformed call or crashes on it, fusedrnn's own RuntimeError; LSTMCell
promotes a wider cell state as torch.nn does; CPU autocast returns torch.nn's dtypes and ``auto``
runs calls torch.nn itself fails on; inter-layer dropout consumes the random stream as torch.nn.
"""

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from fusedrnn import backends
from tolerances import RTOL, assert_close, rel_err

BACKENDS = ["reference", "triton", "cpp"]
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
r = torch.randn


def _usable(backend):
    if backend == "auto":
        return
    reason = fusedrnn.available_backends()[backend]
    if reason is None:
        cfg = backends.RecurrenceConfig("LSTM", "cpu", -1, F32, 5)
        reason = backends.get(backend).unsupported(cfg)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def pair(mode, backend, dtype=F32, **kwargs):
    kwargs = {"input_size": 4, "hidden_size": 5, **kwargs}
    torch.manual_seed(0)
    ref = getattr(nn, mode)(**kwargs).to(dtype)
    ours = getattr(fusedrnn, mode)(**kwargs, backend=backend).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare whatever torch raises
        return type(e), str(e)
    return None, None


def packed(lengths=(3, 2), enforce_sorted=True, dtype=F32):
    return pack_padded_sequence(r(3, len(lengths), 4, dtype=dtype), list(lengths), enforce_sorted=enforce_sorted)


# ---------------------------------------------------------------- malformed states: torch's error
MALFORMED = [
    # (id, mode, ctor kwargs, call(module))
    ("lstmcell-hx-stacked-tensor", "LSTMCell", {}, lambda m: m(r(3, 4), r(2, 3, 5))),
    ("lstmcell-hx-3-tuple", "LSTMCell", {}, lambda m: m(r(3, 4), (r(3, 5), r(3, 5), r(3, 5)))),
    ("lstmcell-hx-1-tuple", "LSTMCell", {}, lambda m: m(r(3, 4), (r(3, 5),))),
    ("lstmcell-hx-int", "LSTMCell", {}, lambda m: m(r(3, 4), 3)),
    ("lstmcell-unbatched-x-batched-hx-B!=H", "LSTMCell", {}, lambda m: m(r(4), (r(3, 5), r(3, 5)))),
    ("lstmcell-batched-x-1d-hx", "LSTMCell", {}, lambda m: m(r(3, 4), (r(5), r(5)))),
    ("lstmcell-batched-x-1d-hx-B==H", "LSTMCell", {}, lambda m: m(r(5, 4), (r(5), r(5)))),
    ("lstmcell-batched-x-mixed-hx", "LSTMCell", {}, lambda m: m(r(3, 4), (r(3, 5), r(5)))),
    ("grucell-unbatched-x-batched-hx-B!=H", "GRUCell", {}, lambda m: m(r(4), r(3, 5))),
    ("grucell-unbatched-x-batched-hx-B==H", "GRUCell", {}, lambda m: m(r(4), r(5, 5))),
    ("grucell-batched-x-1d-hx", "GRUCell", {}, lambda m: m(r(3, 4), r(5))),
    ("grucell-hx-tuple", "GRUCell", {}, lambda m: m(r(3, 4), (r(3, 5),))),
    ("lstm-hx-4d-tensor", "LSTM", {}, lambda m: m(r(2, 3, 4), r(2, 1, 3, 5))),
    ("lstm-hx-3d-tensor", "LSTM", {}, lambda m: m(r(2, 3, 4), r(1, 3, 5))),
    ("lstm-hx-3-tuple", "LSTM", {}, lambda m: m(r(2, 3, 4), (r(1, 3, 5), r(1, 3, 5), r(1, 3, 5)))),
    ("lstm-hx-1-tuple", "LSTM", {}, lambda m: m(r(2, 3, 4), (r(1, 3, 5),))),
    ("lstm-hx-int", "LSTM", {}, lambda m: m(r(2, 3, 4), 3)),
    ("gru-hx-tuple", "GRU", {}, lambda m: m(r(2, 3, 4), (r(1, 3, 5),))),
    ("lstm-packed-hx-batch-3", "LSTM", {}, lambda m: m(packed(), (r(1, 3, 5), r(1, 3, 5)))),
    ("lstm-packed-hx-batch-1", "LSTM", {}, lambda m: m(packed(), (r(1, 1, 5), r(1, 1, 5)))),
    ("lstm-packed-hx-layers", "LSTM", {}, lambda m: m(packed(), (r(2, 2, 5), r(2, 2, 5)))),
    ("lstm-packed-hx-hidden", "LSTM", {}, lambda m: m(packed(), (r(1, 2, 6), r(1, 2, 5)))),
    ("lstm-packed-cx-hidden", "LSTM", {}, lambda m: m(packed(), (r(1, 2, 5), r(1, 2, 6)))),
    ("lstm-packed-hx-2d", "LSTM", {}, lambda m: m(packed(), (r(2, 5), r(2, 5)))),
    ("lstm-packed-hx-tensor", "LSTM", {}, lambda m: m(packed(), r(2, 1, 2, 5))),
    ("lstm-packed-hx-3-tuple", "LSTM", {}, lambda m: m(packed(), (r(1, 2, 5),) * 3)),
    ("lstm-proj-packed-hx-hidden", "LSTM", {"proj_size": 3}, lambda m: m(packed(), (r(1, 2, 5), r(1, 2, 5)))),
    ("gru-packed-hx-batch-3", "GRU", {}, lambda m: m(packed(), r(1, 3, 5))),
    ("gru-packed-unsorted-hx-2d", "GRU", {}, lambda m: m(packed((2, 3), False), r(2, 5))),
    ("gru-packed-unsorted-hx-batch-1", "GRU", {}, lambda m: m(packed((2, 3), False), r(1, 1, 5))),
    # dtype mixes (exception parity leftovers)
    ("gru-f32-input-f64-h0", "GRU", {}, lambda m: m(r(3, 2, 4), r(1, 2, 5, dtype=F64))),
    ("gru-f32-input-f16-h0", "GRU", {}, lambda m: m(r(3, 2, 4), r(1, 2, 5, dtype=F16))),
    ("lstm-f32-input-f64-h0", "LSTM", {}, lambda m: m(r(3, 2, 4), (r(1, 2, 5, dtype=F64), r(1, 2, 5)))),
    ("lstm-f32-input-f64-c0", "LSTM", {}, lambda m: m(r(3, 2, 4), (r(1, 2, 5), r(1, 2, 5, dtype=F64)))),
    ("lstm-f32-input-bf16-hx", "LSTM", {}, lambda m: m(r(3, 2, 4), (r(1, 2, 5, dtype=BF16), r(1, 2, 5)))),
    ("lstm-packed-f64-input", "LSTM", {}, lambda m: m(packed(dtype=F64))),
    ("lstm-packed-f64-input-f64-hx", "LSTM", {}, lambda m: m(packed(dtype=F64), (r(1, 2, 5, dtype=F64),) * 2)),
    ("lstm-packed-f32-input-f64-h0", "LSTM", {}, lambda m: m(packed(), (r(1, 2, 5, dtype=F64), r(1, 2, 5)))),
    ("gru-packed-f64-input", "GRU", {}, lambda m: m(packed(dtype=F64))),
    ("gru-packed-f32-input-f64-h0", "GRU", {}, lambda m: m(packed(), r(1, 2, 5, dtype=F64))),
    ("lstm-unbatched-f32-input-f64-h0", "LSTM", {}, lambda m: m(r(3, 4), (r(1, 5, dtype=F64), r(1, 5)))),
    ("lstmcell-f64-h", "LSTMCell", {}, lambda m: m(r(3, 4), (r(3, 5, dtype=F64), r(3, 5)))),
    ("grucell-f64-h", "GRUCell", {}, lambda m: m(r(3, 4), r(3, 5, dtype=F64))),
    ("lstmcell-f64-input", "LSTMCell", {}, lambda m: m(r(3, 4, dtype=F64), (r(3, 5), r(3, 5)))),
]


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("case_id,mode,kwargs,call", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_call_raises_torchs_exception(case_id, mode, kwargs, call, backend):
    _usable(backend)
    ref, ours = pair(mode, backend, **kwargs)
    torch.manual_seed(1)
    expected = outcome(lambda: call(ref))
    assert expected[0] is not None, "torch.nn accepted this call: not a malformed-call case"
    torch.manual_seed(1)
    assert outcome(lambda: call(ours)) == expected


# ------------------------------------------- malformed states torch.nn accepts silently: refused
ACCEPTED_BY_TORCH = [
    # packed + enforce_sorted=False: torch.nn index-selects the states by the sort order, so a
    # batch-3 state for a batch of 2 loses a row silently, and a Tensor / 3-tuple is split / cut
    ("lstm-packed-unsorted-hx-batch-3", "LSTM", lambda m: m(packed((2, 3), False), (r(1, 3, 5), r(1, 3, 5))), "hidden[0] size"),
    ("gru-packed-unsorted-hx-batch-3", "GRU", lambda m: m(packed((2, 3), False), r(1, 3, 5)), "hidden[0] size"),
    ("lstm-packed-unsorted-hx-tensor", "LSTM", lambda m: m(packed((2, 3), False), r(2, 1, 2, 5)), "tuple (h_0, c_0)"),
    ("lstm-packed-unsorted-hx-3-tuple", "LSTM", lambda m: m(packed((2, 3), False), (r(1, 2, 5),) * 3), "tuple (h_0, c_0)"),
    ("lstm-unbatched-hx-stacked-tensor", "LSTM", lambda m: m(r(3, 4), r(2, 1, 5)), "tuple (h_0, c_0)"),
    ("lstmcell-unbatched-hx-stacked-tensor", "LSTMCell", lambda m: m(r(4), r(2, 5)), "tuple (h_0, c_0)"),
    ("lstmcell-unbatched-hx-3-tuple", "LSTMCell", lambda m: m(r(4), (r(5), r(5), r(5))), "tuple (h_0, c_0)"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,mode,call,words", ACCEPTED_BY_TORCH, ids=[c[0] for c in ACCEPTED_BY_TORCH])
def test_malformed_call_torch_accepts_is_refused(case_id, mode, call, words, backend):
    _usable(backend)
    ref, ours = pair(mode, backend)
    assert outcome(lambda: call(ref)) == (None, None)  # torch.nn's behaviour this guards against
    err = outcome(lambda: call(ours))
    assert err[0] is RuntimeError and words in err[1] and "torch.nn" in err[1], err


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("states", ["both", "c_only"])
def test_lstmcell_unbatched_input_batched_states_is_refused(backend, states):
    """torch.nn.LSTMCell crashes the process (segfault) on an unbatched input with (B, H) states
    when B == hidden_size; fusedrnn raises a RuntimeError naming the shapes (torch never runs)."""
    _usable(backend)
    _, ours = pair("LSTMCell", backend)
    hx = (r(5, 5), r(5, 5)) if states == "both" else (r(5), r(5, 5))
    with pytest.raises(RuntimeError, match=r"unbatched 1-D input of shape \(4,\) with a 2-D hidden\d of shape \(5, 5\)"):
        ours(r(4), hx)


# ---------------------------------------------------------------------- LSTMCell promotes c
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c_dtype", [F64, F16])
def test_lstmcell_promotes_cell_state_like_torch(backend, c_dtype):
    """x, h float32 and c float64 (or float16): torch.nn runs and returns promote(float32, c)."""
    _usable(backend)
    ref, ours = pair("LSTMCell", backend)
    results = []
    for m in (ref, ours):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(3, 4, generator=g).requires_grad_(True)
        h = torch.randn(3, 5, generator=g).requires_grad_(True)
        c = torch.randn(3, 5, generator=g).to(c_dtype).requires_grad_(True)
        h1, c1 = m(x, (h, c))
        (h1.double().sin().sum() + (c1.double() * 0.7).sum()).backward()
        results.append([h1, c1, x.grad, h.grad, c.grad] + [p.grad for p in m.parameters()])
    assert [t.dtype for t in results[1]] == [t.dtype for t in results[0]]
    # torch runs the gates in float32: agreement to float32's tolerance
    assert_close(results[1], results[0], F32)


# ------------------------------------------------------------------------------ CPU autocast
def _outputs(result):
    items = result if isinstance(result, tuple) else (result,)
    flat = []
    for item in items:
        if isinstance(item, PackedSequence):
            flat.append(item.data)
        elif isinstance(item, tuple):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


RNN_AUTOCAST = list(itertools.product(
    ["LSTM", "LSTM-proj", "GRU"], [F32, BF16], [F32, BF16, F16], [None, F32, BF16], [False, True]
))
# the dtype rule lives in modules.py, the same for every backend: the whole grid runs on the
# reference backend, a slice of it (both paths of each module) on the kernels
RNN_AUTOCAST_SLICE = [c for c in RNN_AUTOCAST if c[1] == F32 and c[2] != F16 and c[3] != F32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_autocast_rnn_dtypes_and_values_match_torch(backend):
    """Under torch.autocast("cpu", bfloat16), every output and state has torch.nn's dtype (oneDNN
    LSTMs return bfloat16; torch's own CPU recurrence keeps the states' dtype) and agrees with
    torch.nn's values to bfloat16's tolerance, for each weight / input / state dtype mix."""
    _usable(backend)
    for name, w_dtype, x_dtype, h_dtype, is_packed in RNN_AUTOCAST if backend == "reference" else RNN_AUTOCAST_SLICE:
        mode = name.split("-")[0]
        kwargs = {"proj_size": 3} if name == "LSTM-proj" else {}
        ref, ours = pair(mode, backend, dtype=w_dtype, **kwargs)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(3, 2, 4, generator=g).to(x_dtype)
        x = pack_padded_sequence(x, [3, 2]) if is_packed else x
        hx = None
        if h_dtype is not None:
            P = kwargs.get("proj_size", 5)
            h0, c0 = torch.randn(1, 2, P, generator=g).to(h_dtype), torch.randn(1, 2, 5, generator=g).to(h_dtype)
            hx = (h0, c0) if mode == "LSTM" else c0
        with torch.autocast("cpu", dtype=BF16):
            expected, got = _outputs(ref(x, hx)), _outputs(ours(x, hx))
        case = (name, w_dtype, x_dtype, h_dtype, is_packed)
        assert [t.dtype for t in got] == [t.dtype for t in expected], case
        for a, b in zip(got, expected):
            assert rel_err(a, b) < RTOL[BF16], case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [BF16, F16])
def test_cpu_autocast_cell_dtypes_match_torch(backend, autocast_dtype):
    _usable(backend)
    grid = itertools.product(["LSTMCell", "GRUCell"], [F32, BF16], [F32, BF16, F16], [None, F32, BF16, F16])
    for mode, w_dtype, x_dtype, h_dtype in grid if backend == "reference" else (
        c for c in grid if c[1] == F32 and c[2] != F16
    ):
        ref, ours = pair(mode, backend, dtype=w_dtype)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(3, 4, generator=g).to(x_dtype)
        hx = None
        if h_dtype is not None:
            h = torch.randn(3, 5, generator=g).to(h_dtype)
            hx = (h, torch.randn(3, 5, generator=g).to(h_dtype)) if mode == "LSTMCell" else h
        with torch.autocast("cpu", dtype=autocast_dtype):
            expected, got = _outputs(ref(x, hx)), _outputs(ours(x, hx))
        case = (mode, w_dtype, x_dtype, h_dtype)
        assert [t.dtype for t in got] == [t.dtype for t in expected], case
        for a, b in zip(got, expected):
            assert rel_err(a, b) < RTOL[BF16], case


def _onednn_error(*args, **kwargs):
    raise RuntimeError(
        "could not create a primitive descriptor for the LSTM forward propagation primitive. Run "
        "workload with environment variable ONEDNN_VERBOSE=all to get additional diagnostic information."
    )


@pytest.mark.parametrize("autocast_dtype", [BF16, F16])
def test_auto_runs_kernels_where_torch_nn_fails(monkeypatch, autocast_dtype):
    """torch.nn.LSTM under CPU autocast fails in oneDNN on CPUs without native bf16/fp16 (on this
    machine already for fp16); ``auto`` must run fusedrnn's own kernels there and give torch's
    dtype: the autocast one.  The measured CPU rule sends an LSTM under CPU autocast to ``cpp`` up
    front (torch.nn is not tried, nothing to warn about); wherever ``auto`` does hand a call to
    torch.nn and torch.nn fails, it runs a kernel backend instead, warning once with torch's error."""
    monkeypatch.setattr(fusedrnn.modules, "_torch_failures", {})
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(nn.LSTM, "forward", _onednn_error)  # the failure, on any CPU
    kernel_backend = fusedrnn.modules._WHEN_TORCH_FAILS["cpu"][0] if fusedrnn.available_backends()["cpp"] is None \
        else "reference"
    _, ours = pair("LSTM", "auto")
    _, kernels = pair("LSTM", kernel_backend)
    x = r(6, 2, 4)  # more than 4 steps: the table's answer for a small fp32 LSTM is torch.nn

    def failure_warnings(rec):
        return [str(w.message) for w in rec if "torch.nn fails" in str(w.message)]

    with warnings.catch_warnings(record=True) as rec, torch.autocast("cpu", dtype=autocast_dtype):
        warnings.simplefilter("always")
        out, (h, c) = ours(x)
        ours(x)
        expected = kernels(x)
    msgs = failure_warnings(rec)
    if kernel_backend == "cpp":
        assert msgs == []  # chosen by the rule, torch.nn never tried
    else:
        assert len(msgs) == 1 and "primitive descriptor" in msgs[0]
    assert out.dtype == h.dtype == c.dtype == autocast_dtype
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
    # without autocast the rule hands this small fp32 LSTM to torch.nn, which fails here too
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = ours(x)[0]
        ours(x)
        expected = kernels(x)[0]
    msgs = failure_warnings(rec)
    assert len(msgs) == 1 and "primitive descriptor" in msgs[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # an explicit torch backend never falls back
    _, explicit = pair("LSTM", "torch")
    with torch.autocast("cpu", dtype=autocast_dtype), pytest.raises(RuntimeError, match="primitive descriptor"):
        explicit(x)


def test_auto_on_a_real_onednn_failure():
    """Where this CPU's oneDNN lacks fp16 (checked, not assumed), torch.nn.LSTM fails under fp16
    CPU autocast and fusedrnn's auto still runs the call, close to the fp64 reference."""
    ref, ours = pair("LSTM", "auto")
    x = r(3, 2, 4)
    with torch.autocast("cpu", dtype=F16):
        torch_fails = outcome(lambda: ref(x))[0] is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ours(x)[0]
    if not torch_fails:
        pytest.skip("torch.nn runs fp16 LSTMs under CPU autocast on this CPU")
    truth = fusedrnn.LSTM(4, 5, backend="reference").double()
    truth.load_state_dict({k: v.half().double() for k, v in ours.state_dict().items()})
    assert out.dtype == F16
    assert rel_err(out, truth(x.half().double())[0]) < RTOL[F16]


# --------------------------------------------------------------------------- dropout stream
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("kind", ["padded", "packed", "packed_batch_first_bidir"])
def test_dropout_stream_matches_torch(backend, mode, kind):
    """Training with inter-layer dropout, same seed: the same outputs as torch.nn (its mask) and
    the same random stream afterwards (so every later dropout of a model matches too)."""
    _usable(backend)
    bidir = kind.endswith("bidir")
    batch_first = "batch_first" in kind
    ref, ours = pair(mode, backend, dtype=F64, num_layers=3, dropout=0.4, bidirectional=bidir,
                     batch_first=batch_first)
    ref.train(), ours.train()
    x = r(3, 4, 4, dtype=F64) if batch_first else r(4, 3, 4, dtype=F64)
    if kind.startswith("packed"):
        x = pack_padded_sequence(x, [4, 2, 3], batch_first=batch_first, enforce_sorted=False)
    results = []
    for m in (ref, ours):
        torch.manual_seed(123)
        outs = _outputs(m(x))
        results.append(outs + [torch.rand(8, dtype=F64)])
    assert_close(results[1], results[0], F64)
    assert torch.equal(results[1][-1], results[0][-1])  # the stream after the call
