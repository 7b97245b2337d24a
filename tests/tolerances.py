"""The one tolerance rule of the test suite (GUIDE §4), written once.

Errors are relative norms ||out - ref|| / ||ref|| per output and per gradient, against float64
truth.  Never loosen these to make a test pass.
"""

import torch

RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,  # full fp32 (no TF32)
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
TF32_RTOL = 1e-3  # fp32 inputs on a GPU with TF32 allowed (cudnn.rnn.fp32_precision == "tf32")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are empty or ref is 0 and out equals it)."""
    # on the CPU: a CUDA result is compared with a CPU float64 reference
    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return num
    return num / den


def assert_close(outs, refs, dtype, names=None, rtol=None, torch_outs=None):
    """Every pair within the dtype's tolerance, and no NaN anywhere.

    ``torch_outs``: torch.nn's own results in the same dtype on the same inputs; an output then
    passes within ``max(rtol, 2 x torch's own error)`` (GUIDE section 4's second rule, used for
    TF32, whose error grows with the reduction length and is not one fixed number)."""
    rtol = RTOL[dtype] if rtol is None else rtol
    assert len(outs) == len(refs)
    names = names or [str(i) for i in range(len(outs))]
    torch_outs = torch_outs if torch_outs is not None else [None] * len(outs)
    bad = []
    for name, o, r, t in zip(names, outs, refs, torch_outs):
        if o is None or r is None:
            assert o is None and r is None, f"{name}: one side has no gradient"
            continue
        assert not torch.isnan(o).any(), f"{name}: NaN in output"
        e = rel_err(o, r)
        tol = rtol if t is None else max(rtol, 2 * rel_err(t, r))
        if not e <= tol:
            bad.append(f"{name}: rel err {e:.3e} > {tol:.1e}")
    assert not bad, "; ".join(bad)
