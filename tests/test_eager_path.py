"""The eager fast path of ``ops.call``: plain eager calls skip torch.library's dispatch (same
implementation, same registered setup/backward); every other mode still reaches the custom op."""

import pytest
import torch
from torch.autograd import forward_ad

from fusedrnn import ops

torch.manual_seed(0)
T, B, H = 5, 3, 4


def _lstm_args(requires_grad: bool, backend: str = "reference"):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(requires_grad)  # noqa: E731
    return [mk(T, B, 4 * H), mk(4 * H, H), mk(4 * H), mk(B, H), mk(B, H), None, None, False, requires_grad, backend]


class _DispatchCounter:
    """Counts calls that reach fusedrnn::lstm_fwd through torch.library (its CPU kernel)."""

    def __init__(self, monkeypatch):
        self.n = 0
        counter = self
        # calling the custom op goes through its OpOverload (torch.library's dispatch); the
        # direct path calls ops._IMPLS[op] and never touches it
        orig = ops.lstm_fwd._opoverload

        class Spy:
            def __call__(self, *args, **kwargs):
                counter.n += 1
                return orig(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(orig, name)

        monkeypatch.setattr(ops.lstm_fwd, "_opoverload", Spy())


@pytest.mark.parametrize("requires_grad", [False, True])
def test_plain_eager_skips_dispatch_and_matches_the_custom_op(monkeypatch, requires_grad):
    spy = _DispatchCounter(monkeypatch)
    args = _lstm_args(requires_grad)
    direct = ops.call(ops.lstm_fwd, *args)
    assert spy.n == 0
    through_op = ops.lstm_fwd(*args)
    assert spy.n == 1
    for a, b in zip(direct, through_op):
        assert torch.equal(a, b)
    if requires_grad:
        assert type(direct[0].grad_fn).__name__ == "LstmFwdDirectBackward"
        cot = [torch.randn_like(t) for t in direct[:3]]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        g1 = torch.autograd.grad(direct[:3], tensors, cot)
        g2 = torch.autograd.grad(through_op[:3], tensors, cot)
        for a, b in zip(g1, g2):
            assert torch.equal(a, b)
    else:
        assert direct[0].grad_fn is None


def test_direct_path_double_backward_matches_the_custom_op():
    args = _lstm_args(True)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def penalty(fn):
        y, h, c, _, _ = fn(*args)
        gs = torch.autograd.grad((y.square().sum() + h.sum() + c.sum()), tensors, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in gs), tensors)

    a = penalty(lambda *a: ops.call(ops.lstm_fwd, *a))
    b = penalty(ops.lstm_fwd)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_other_modes_reach_the_custom_op(monkeypatch):
    spy = _DispatchCounter(monkeypatch)
    args = _lstm_args(False)
    with torch.device("cpu"):  # a torch function mode
        ops.call(ops.lstm_fwd, *args)
    assert spy.n == 1
    with forward_ad.dual_level():  # a forward-AD level: the twin (whose forward is the op)
        ops.call(ops.lstm_fwd, *args)
    assert spy.n == 2
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # a dispatch mode: the fake runs, no kernel
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = ops.call(ops.lstm_fwd, *fake)[0]
    assert y.shape == (T, B, H) and spy.n == 3
