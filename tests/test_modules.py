"""The module test grid: fusedrnn modules against torch.nn (float64) and the fp64 reference.

Every backend that can run here (reference always; triton under the interpreter; cpp when the
extension is built; cuda on a GPU machine) runs the same grid: outputs, final states and the
gradients of input, h0, c0 and every parameter with random cotangents on every output.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import backends
from fusedrnn.backends import rnn_tf32_enabled
from tolerances import RTOL, TF32_RTOL, assert_close

KERNEL_BACKENDS = ["reference", "triton", "cpp", "cuda"]


def _usable(backend, device="cpu"):
    """Skip unless ``backend`` runs here on ``device`` (e.g. triton on CPU needs the interpreter)."""
    reason = backends.unavailable_reason(backend)
    if reason is None:
        probe = backends.RecurrenceConfig("LSTM", device, 0 if device == "cuda" else -1, torch.float32, 5)
        reason = backends.get(backend).unsupported(probe)
    if reason is not None:
        pytest.skip(f"backend {backend} does not run on {device} here: {reason}")


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return devs


# ------------------------------------------------------------------------------------ harness
def make_pair(mode, kwargs, backend, dtype=torch.float64, device="cpu"):
    """(torch.nn module, fusedrnn module) with identical parameters."""
    torch_cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell}[mode]
    ours_cls = getattr(fusedrnn, mode)
    ref = torch_cls(**kwargs).to(device=device, dtype=dtype)
    ours = ours_cls(**kwargs, backend=backend).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_inputs(mode, kwargs, T, B, kind, hx_given, dtype, device):
    """Leaf tensors and a builder of the module call arguments.

    kind: "padded", "unbatched", "packed_sorted", "packed_unsorted", "noncontig".
    """
    I, H = kwargs["input_size"], kwargs["hidden_size"]
    P = kwargs.get("proj_size", 0) or H
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    bf = kwargs.get("batch_first", False)
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    leaves = {}
    if kind == "unbatched":
        leaves["x"] = rnd(T, I)
    elif kind == "noncontig":
        leaves["x"] = rnd(I, B, T)  # permuted to (T, B, I) / (B, T, I) below: not contiguous
    else:
        leaves["x"] = rnd(B, T, I) if bf else rnd(T, B, I)
    hshape = (L * D, P) if kind == "unbatched" else (L * D, B, P)
    cshape = (L * D, H) if kind == "unbatched" else (L * D, B, H)
    if hx_given:
        leaves["h0"] = rnd(*hshape)
        if mode == "LSTM":
            leaves["c0"] = rnd(*cshape)
    for t in leaves.values():
        t.requires_grad_(True)
    lengths = None
    if kind.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        if kind == "packed_sorted":
            lengths = lengths.sort(descending=True).values

    def args():
        x = leaves["x"]
        if kind == "noncontig":
            x = x.permute(1, 2, 0) if bf else x.permute(2, 1, 0)
            assert not x.is_contiguous()
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=(kind == "packed_sorted"))
        hx = None
        if hx_given:
            hx = (leaves["h0"], leaves["c0"]) if mode == "LSTM" else leaves["h0"]
        return x, hx

    return leaves, args


def flat_outputs(result):
    out, hidden = result
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return [out] + hidden


def run_with_grads(module, leaves, args, cotangent_seed=99):
    """Outputs and gradients of every leaf and parameter under random cotangents."""
    for t in leaves.values():
        t.grad = None
    module.zero_grad(set_to_none=True)
    outs = flat_outputs(module(*args()))
    g = torch.Generator().manual_seed(cotangent_seed)
    loss = 0
    for o in outs:
        cot = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
        loss = loss + (o * cot).sum()
    loss.backward()
    grads = [leaves[k].grad for k in sorted(leaves)]
    grads += [p.grad for _, p in module.named_parameters()]
    names = [f"out{i}" for i in range(len(outs))] + [f"d{k}" for k in sorted(leaves)]
    names += [f"d{n}" for n, _ in module.named_parameters()]
    return [o.detach() for o in outs] + grads, names


# --------------------------------------------------------------------------------------- grid
RNN_CASES = [
    # id, constructor kwargs (beyond sizes), input kind, hx given
    ("base", {}, "padded", True),
    ("no_hx", {}, "padded", False),
    ("layers2_bidir", {"num_layers": 2, "bidirectional": True}, "padded", True),
    ("no_bias", {"bias": False}, "padded", True),
    ("batch_first", {"batch_first": True}, "padded", True),
    ("unbatched", {}, "unbatched", True),
    ("unbatched_bidir_nohx", {"bidirectional": True}, "unbatched", False),
    ("packed_sorted", {}, "packed_sorted", True),
    ("packed_unsorted_bidir2", {"num_layers": 2, "bidirectional": True}, "packed_unsorted", True),
    ("packed_batch_first_nohx", {"batch_first": True, "bidirectional": True}, "packed_unsorted", False),
    ("noncontig", {"batch_first": True}, "noncontig", True),
]
LSTM_ONLY_CASES = [
    ("proj", {"proj_size": 3}, "padded", True),
    ("proj_bidir2_packed", {"proj_size": 2, "num_layers": 2, "bidirectional": True}, "packed_unsorted", True),
]
SIZES = dict(input_size=4, hidden_size=5)


def _cases():
    for mode in ("LSTM", "GRU"):
        cases = RNN_CASES + (LSTM_ONLY_CASES if mode == "LSTM" else [])
        for case in cases:
            yield pytest.param(mode, *case[1:], id=f"{mode}-{case[0]}")


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode,extra,kind,hx_given", list(_cases()))
def test_matches_torch_float64(backend, mode, extra, kind, hx_given, device):
    """Every output and gradient equals torch.nn's in float64."""
    _usable(backend, device)
    kwargs = dict(SIZES, **extra)
    ref, ours = make_pair(mode, kwargs, backend, device=device)
    T, B = 4, 3
    leaves, args = make_inputs(mode, kwargs, T, B, kind, hx_given, torch.float64, device)
    expected, names = run_with_grads(ref, leaves, args)
    got, _ = run_with_grads(ours, leaves, args)
    assert_close(got, expected, torch.float64, names)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,extra", [
    ("padded", {}),
    ("packed_unsorted", {"bidirectional": True, "num_layers": 2}),
])
def test_low_precision_vs_fp64_reference(backend, mode, dtype, kind, extra, device):
    """fp32 / bf16 / fp16 modules against the fp64 reference on the same (rounded) inputs."""
    _usable(backend, device)
    kwargs = dict(SIZES, **extra)
    _, ours = make_pair(mode, kwargs, backend, dtype=dtype, device=device)
    _, truth = make_pair(mode, kwargs, "reference", dtype=torch.float64, device=device)
    truth.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    T, B = 5, 3
    leaves, args = make_inputs(mode, kwargs, T, B, kind, True, dtype, device)
    # the fp64 run sees the very same (rounded) input values
    leaves64_ref, args64 = make_inputs(mode, kwargs, T, B, kind, True, torch.float64, device)
    with torch.no_grad():
        for k in leaves64_ref:
            leaves64_ref[k].copy_(leaves[k].double())
    got, names = run_with_grads(ours, leaves, args)
    expected, _ = run_with_grads(truth, leaves64_ref, args64)
    for g in got:
        assert g.dtype == dtype
    # TF32 is the cuda backend's (on a GPU, or on CPU under the CUDA emulation)
    tf32 = backend == "cuda" and dtype == torch.float32 and rnn_tf32_enabled()
    torch_got = None
    if tf32:  # TF32 error depends on the shape: allow 2x what cuDNN's TF32 RNN gets here
        torch_mod = make_pair(mode, kwargs, "torch", dtype=dtype, device=device)[0]  # torch.nn itself
        torch_mod.load_state_dict(ours.state_dict())
        leaves_t, args_t = make_inputs(mode, kwargs, T, B, kind, True, dtype, device)
        with torch.no_grad():
            for k in leaves_t:
                leaves_t[k].copy_(leaves[k])
        torch_got, _ = run_with_grads(torch_mod, leaves_t, args_t)
    assert_close(got, expected, dtype, names, rtol=TF32_RTOL if tf32 else None, torch_outs=torch_got)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_single_step_and_batch_of_one(backend, mode):
    _usable(backend)
    kwargs = dict(SIZES, num_layers=2, bidirectional=True)
    ref, ours = make_pair(mode, kwargs, backend)
    leaves, args = make_inputs(mode, kwargs, 1, 1, "padded", True, torch.float64, "cpu")
    expected, names = run_with_grads(ref, leaves, args)
    got, _ = run_with_grads(ours, leaves, args)
    assert_close(got, expected, torch.float64, names)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_zero_size_batch(backend, mode):
    _usable(backend)
    ref, ours = make_pair(mode, dict(SIZES), backend)
    x = torch.randn(0, 4, dtype=torch.float64) if "Cell" in mode else torch.randn(3, 0, 4, dtype=torch.float64)
    a, b = ref(x), ours(x)
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    fa = [t for item in a for t in (item if isinstance(item, tuple) else (item,))]
    fb = [t for item in b for t in (item if isinstance(item, tuple) else (item,))]
    assert [t.shape for t in fa] == [t.shape for t in fb]


# -------------------------------------------------------------------------------------- cells
CELL_CASES = [
    ("batched", True, True, True),
    ("no_hx", True, False, True),
    ("unbatched", False, True, True),
    ("no_bias", True, True, False),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("name,batched,hx_given,bias", CELL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cells(backend, mode, name, batched, hx_given, bias, dtype):
    _usable(backend)
    kwargs = dict(SIZES, bias=bias)
    ref, ours = make_pair(mode, kwargs, backend, dtype=dtype)
    truth_ref = ref if dtype == torch.float64 else make_pair(mode, kwargs, "reference")[1]
    if dtype != torch.float64:
        truth_ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    shape = (3, 4) if batched else (4,)
    hshape = (3, 5) if batched else (5,)
    x = torch.randn(*shape, dtype=torch.float64)
    hs = [torch.randn(*hshape, dtype=torch.float64) for _ in range(2 if mode == "LSTMCell" else 1)]

    def run(module, dt):
        leaves = [x.to(dt).double().to(dt).requires_grad_(True)] + [h.to(dt).requires_grad_(True) for h in hs]
        module.zero_grad(set_to_none=True)
        hx = None
        if hx_given:
            hx = tuple(leaves[1:]) if mode == "LSTMCell" else leaves[1]
        out = module(leaves[0], hx)
        outs = list(out) if isinstance(out, tuple) else [out]
        g = torch.Generator().manual_seed(5)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(dt)).sum() for o in outs)
        loss.backward()
        grads = [leaf.grad for leaf in (leaves if hx_given else leaves[:1])]
        return [o.detach() for o in outs] + grads + [p.grad for p in module.parameters()]

    got = run(ours, dtype)
    expected = run(truth_ref, torch.float64) if dtype != torch.float64 else run(ref, dtype)
    assert_close(got, expected, dtype)


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck(backend, mode):
    _usable(backend)
    kwargs = dict(input_size=3, hidden_size=2, num_layers=2, bidirectional=True)
    if mode == "LSTM":
        kwargs["proj_size"] = 1
    _, ours = make_pair(mode, kwargs, backend)
    params = list(ours.parameters())
    names = [n for n, _ in ours.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])

    def f(x, *ps):
        out, hidden = torch.func.functional_call(
            ours, dict(zip(names, ps)), (pack_padded_sequence(x, lengths, enforce_sorted=False),)
        )
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return (out.data,) + hidden

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_gradcheck_cells(backend, mode):
    _usable(backend)
    _, ours = make_pair(mode, dict(input_size=3, hidden_size=2), backend)
    names = [n for n, _ in ours.named_parameters()]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def f(x, h, c, *ps):
        hx = (h, c) if mode == "LSTMCell" else h
        out = torch.func.functional_call(ours, dict(zip(names, ps)), (x, hx))
        return out if isinstance(out, tuple) else (out,)

    assert torch.autograd.gradcheck(f, (x, h, c, *ours.parameters()), eps=1e-6, atol=1e-7, fast_mode=True)
