"""Every autodiff mode torch.nn supports, with torch.nn (float64, CPU) as the oracle.

Higher-order reverse mode (a gradient penalty: create_graph=True, then backward again),
torch.func.grad / jacrev / jvp / jacfwd / hessian / vmap, and torch.autograd.forward_ad, for every
module and every backend that runs on CPU.  Small shapes: the slow paths (the spec's derivatives)
run Python time loops, and Triton runs under the interpreter.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from fusedrnn import ops
from tolerances import assert_close

BACKENDS = ["reference", "triton", "cpp"]
F64 = torch.float64

# mode -> constructor kwargs: the richest configuration each module has (projection, two layers,
# both directions, packed unsorted input with its reverse direction's padded steps, given states)
CONFIGS = {
    "LSTM": dict(input_size=3, hidden_size=3, num_layers=2, bidirectional=True, proj_size=2),
    "GRU": dict(input_size=3, hidden_size=3, num_layers=2, bidirectional=True),
    "LSTMCell": dict(input_size=3, hidden_size=3),
    "GRUCell": dict(input_size=3, hidden_size=3),
}
MODES = list(CONFIGS)
T, B = 3, 2
LENGTHS = torch.tensor([2, 3])  # unsorted, one padded step


def _usable(backend):
    reason = fusedrnn.available_backends()[backend]
    if reason is None:
        cfg = fusedrnn.backends.RecurrenceConfig("LSTM", "cpu", -1, F64, 3)
        reason = fusedrnn.backends.get(backend).unsupported(cfg)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def make_pair(mode, backend):
    torch.manual_seed(0)
    ref = getattr(nn, mode)(**CONFIGS[mode]).double()
    ours = getattr(fusedrnn, mode)(**CONFIGS[mode], backend=backend).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_inputs(mode):
    """x and the initial states (a tuple of tensors), float64, fixed values."""
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    kw = CONFIGS[mode]
    H = kw["hidden_size"]
    if "Cell" in mode:
        states = (rnd(B, H), rnd(B, H)) if mode == "LSTMCell" else (rnd(B, H),)
        return rnd(B, kw["input_size"]), states
    LD = kw["num_layers"] * (2 if kw["bidirectional"] else 1)
    P = kw.get("proj_size", 0) or H
    states = (rnd(LD, B, P), rnd(LD, B, H)) if mode == "LSTM" else (rnd(LD, B, H),)
    return rnd(*PACKING.data.shape), states  # the packed rows (N, I)


# the packing of every RNN call; x is its data (rows in packed order).  Packing outside the
# differentiated functions: torch's pack_padded_sequence has no forward-mode derivative.
PACKING = pack_padded_sequence(torch.zeros(T, B, 3, dtype=F64), LENGTHS, enforce_sorted=False)


def call(module, mode, x, states, params=None):
    """Every output of one call, flattened to a tuple of tensors (packed data for RNNs)."""
    hx = states if mode in ("LSTM", "LSTMCell") else states[0]
    if "Cell" not in mode:
        x = PackedSequence(x, PACKING.batch_sizes, PACKING.sorted_indices, PACKING.unsorted_indices)
    args = (x, hx)
    out = module(*args) if params is None else torch.func.functional_call(module, params, args)
    flat = []
    for item in out if isinstance(out, tuple) else (out,):
        if isinstance(item, PackedSequence):
            flat.append(item.data)
        else:
            flat.extend(item if isinstance(item, tuple) else (item,))
    return tuple(flat)


def weighted_sum(outs):
    """A scalar of every output with fixed, distinct weights (so no cotangent is uniform); no
    random draw, so it runs under vmap (jacrev, hessian)."""
    total = 0
    for k, o in enumerate(outs):
        w = torch.arange(o.numel(), dtype=F64).mul(0.7).add(k).sin().reshape(o.shape)
        total = total + (o * (w + 0.3)).sum()
    return total


def summary(outs):
    """Three fixed linear functionals of every output: a Jacobian with three rows (jacrev runs
    one backward per row, and Triton's run under the interpreter)."""
    return torch.stack([weighted_sum(outs), weighted_sum(outs[::-1]), weighted_sum([o.cos() for o in outs])])


# ------------------------------------------------------------------------ higher-order reverse
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_double_backward_gradient_penalty(backend, mode):
    """grad of the input and states with create_graph=True, then backward of its norm (the WGAN-GP
    penalty): every second-order gradient equals torch.nn's."""
    _usable(backend)
    ref, ours = make_pair(mode, backend)
    x0, states0 = make_inputs(mode)
    results = []
    for module in (ref, ours):
        x = x0.clone().requires_grad_(True)
        states = tuple(s.clone().requires_grad_(True) for s in states0)
        loss = weighted_sum(call(module, mode, x, states))
        grads = torch.autograd.grad(loss, (x, *states), create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        params = list(module.parameters())
        second = torch.autograd.grad(penalty, (x, *states, *params))
        results.append([g.detach() for g in grads] + list(second))
    assert_close(results[1], results[0], F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_func_grad_jacrev_hessian(backend, mode):
    """torch.func.grad (parameters), jacrev (input) and hessian (input, forward-over-reverse).

    torch.nn's packed RNNs do not run under torch.func (no storage behind functorch's wrapped
    tensors), so torch.nn's side is computed with plain autograd (torch.autograd.functional)."""
    _usable(backend)
    ref, ours = make_pair(mode, backend)
    x, states = make_inputs(mode)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    names = list(params)

    loss = lambda p, x: weighted_sum(call(ours, mode, x, states, p))  # noqa: E731
    g_params = torch.func.grad(loss)(params, x)
    jac_x = torch.func.jacrev(lambda x: summary(call(ours, mode, x, states, params)))(x)
    hess_x = torch.func.hessian(lambda x: loss(params, x))(x)
    got = [g_params[n] for n in names] + [jac_x, hess_x]

    ref_loss = lambda *ps: weighted_sum(call(ref, mode, x, states, dict(zip(names, ps))))  # noqa: E731
    expected = list(torch.autograd.functional.jacobian(ref_loss, tuple(params.values())))
    expected.append(torch.autograd.functional.jacobian(lambda x: summary(call(ref, mode, x, states)), x))
    expected.append(torch.autograd.functional.hessian(lambda x: weighted_sum(call(ref, mode, x, states)), x))
    assert_close(got, expected, F64)


# -------------------------------------------------------------------------------- forward mode
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_tangents(backend, mode):
    """torch.func.jvp (input, states and parameters all carrying tangents), jacfwd, and
    torch.autograd.forward_ad give torch.nn's tangents (never zeros).  torch.nn's side:
    torch.autograd.functional.jvp (plain autograd, the double-vjp construction)."""
    _usable(backend)
    ref, ours = make_pair(mode, backend)
    x, states = make_inputs(mode)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    names = list(params)
    g = torch.Generator().manual_seed(3)
    tangent = lambda t: torch.randn(t.shape, generator=g, dtype=F64)  # noqa: E731
    t_x, t_states = tangent(x), tuple(tangent(s) for s in states)
    t_params = {n: tangent(p) for n, p in params.items()}

    f = lambda x, s, p: call(ours, mode, x, s, p)  # noqa: E731
    _, tangents = torch.func.jvp(f, (x, states, params), (t_x, t_states, t_params))
    jac_x = torch.func.jacfwd(lambda x: f(x, states, params)[0])(x)
    with fwAD.dual_level():
        dual_x = fwAD.make_dual(x, t_x)
        dual_states = tuple(fwAD.make_dual(s, t) for s, t in zip(states, t_states))
        dual_tangents = [fwAD.unpack_dual(o).tangent for o in call(ours, mode, dual_x, dual_states)]
    assert all(t is not None for t in dual_tangents)
    got = list(tangents) + [jac_x] + dual_tangents
    for t in got:
        assert t.abs().sum() > 0  # the fault this guards against: all-zero tangents

    n_s = len(states)
    ref_f = lambda x, *rest: call(ref, mode, x, rest[:n_s], dict(zip(names, rest[n_s:])))  # noqa: E731
    primals = (x, *states, *params.values())
    expected = list(torch.autograd.functional.jvp(ref_f, primals, (t_x, *t_states, *t_params.values()))[1])
    expected.append(torch.autograd.functional.jacobian(lambda x: call(ref, mode, x, states)[0], x))
    zeros = tuple(torch.zeros_like(p) for p in params.values())
    expected += list(torch.autograd.functional.jvp(ref_f, primals, (t_x, *t_states, *zeros))[1])
    assert_close(got, expected, F64)


# --------------------------------------------------------------------------------------- vmap
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["LSTM", "GRUCell"])
def test_vmap_per_sample_gradients(backend, mode):
    """vmap(grad) (per-sample gradients) equals one torch.nn backward per sample."""
    _usable(backend)
    ref, ours = make_pair(mode, backend)
    x, states = make_inputs(mode)
    xs = torch.stack([x, 2 * x])  # two "samples", each a whole call
    params = {n: p.detach() for n, p in ref.named_parameters()}
    loss = lambda p, x: weighted_sum(call(ours, mode, x, states, p))  # noqa: E731
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for k in range(2):
        ref.zero_grad()
        weighted_sum(call(ref, mode, xs[k], states)).backward()
        assert_close([per_sample[n][k] for n in params], [p.grad for p in ref.parameters()], F64)


# ------------------------------------------------------------------------- the ops themselves
def _op_cases(backend):
    """(op, args) for every forward op: lengths unsorted, both directions, projection, no bias."""
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_(True)  # noqa: E731
    Tn, Bn, H, P = 3, 2, 2, 1
    lengths = torch.tensor([3, 1])
    return [
        (ops.lstm_fwd, (rnd(Tn, Bn, 4 * H), rnd(4 * H, H), rnd(4 * H), rnd(Bn, H), rnd(Bn, H), None, lengths, False, True, backend)),
        (ops.lstm_fwd, (rnd(Tn, Bn, 4 * H), rnd(4 * H, P), None, rnd(Bn, P), rnd(Bn, H), rnd(P, H), lengths, True, True, backend)),
        (ops.gru_fwd, (rnd(Tn, Bn, 3 * H), rnd(3 * H, H), rnd(3 * H), rnd(Bn, H), lengths, True, True, backend)),
        (ops.gru_fwd, (rnd(Tn, Bn, 3 * H), rnd(3 * H, H), None, rnd(Bn, H), None, False, True, backend)),
        (ops.lstm_cell_fwd, (rnd(Bn, 4 * H), rnd(Bn, 4 * H), rnd(4 * H), None, rnd(Bn, H), backend)),
        (ops.gru_cell_fwd, (rnd(Bn, 3 * H), rnd(Bn, 3 * H), rnd(3 * H), rnd(3 * H), rnd(Bn, H), backend)),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ops_gradgradcheck_and_forward_ad(backend):
    """Finite differences of every output, saved gates and cell states included, so the
    backward's handling of cotangents on saved tensors is checked on its own.  (Triton is left
    out for time: its kernels run only the first-order parts, checked against torch.nn above.)"""
    _usable(backend)
    for op, args in _op_cases(backend):
        tensors = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]

        def f(*diff, op=op, args=args, tensors=tensors):
            full = list(args)
            for k, t in zip(tensors, diff):
                full[k] = t
            return ops.call(op, *full)

        inputs = tuple(args[k] for k in tensors)
        assert torch.autograd.gradgradcheck(f, inputs, atol=1e-6, fast_mode=True), op
        assert torch.autograd.gradcheck(
            f, inputs, atol=1e-6, check_forward_ad=True, check_backward_ad=False,
            check_undefined_grad=False, fast_mode=True,
        ), op
