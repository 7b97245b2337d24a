"""GPU-only checks of issue 8 that the test suite cannot make on CPU (run by scripts/gpu_check.sh).

    python scripts/gpu_extra_checks.py [--backends cuda triton] [--only NAME ...] [--json FILE]

Each check prints one line as soon as it ends (PASS / FAIL / SKIP, with numbers), so a check that
hangs or is killed by the caller's timeout still leaves the earlier results; a summary table is
printed last.  Checks, fastest first:

  tf32_new_api   conv and rnn TF32 flags set differently through torch >= 2.9's API: fp32 LSTM runs
                 and follows ``cudnn.rnn.fp32_precision`` (IEEE error level when "ieee", TF32 level
                 when "tf32"), for each backend
  sync_debug     ``torch.cuda.set_sync_debug_mode("error")`` around forward and backward: no host sync
  graph_capture  2-layer bidirectional LSTM forward+backward captured in a CUDA graph and replayed:
                 replay equals eager
  proj_fit       LSTM(1536, proj_size=1280) bf16: explicit backend raises before any work (or runs
                 both passes); ``auto`` falls back with a warning and matches torch.nn
  large_batch    Triton LSTM bf16 (H, B) in {(512, 300), (300, 512), (200, 1024)} vs torch.nn
  int64_offsets  bf16 LSTM T=1100 B=512 H=1024 (T*B*4H > 2**31 gate elements): last step vs torch.nn
  barrier_stress bf16 LSTM and GRU at the backend's largest H, B=64, T=2000, 20 forwards: bitwise equal
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import fusedrnn  # noqa: E402
from fusedrnn.backends import rnn_tf32  # noqa: E402

DEV = torch.device("cuda")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    n = b.norm().item()
    return (a - b).norm().item() / (n if n > 0 else 1.0)


def pair(mode, I, H, dtype, backend, **kw):
    """(torch.nn module, fusedrnn module with the same weights)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, mode)(I, H, device=DEV, dtype=dtype, **kw)
    mod = getattr(fusedrnn, mode)(I, H, device=DEV, dtype=dtype, backend=backend, **kw)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def largest_h(backend, mode, dtype):
    if backend == "cuda":
        from fusedrnn.backends import cuda

        return cuda.max_hidden_size(mode, dtype, torch.cuda.current_device())
    from fusedrnn.backends.triton import _common as C

    return C.max_hidden_size(4 if mode == "LSTM" else 3, dtype, DEV)


# --------------------------------------------------------------------------------------- checks
def check_tf32_new_api(backend):
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is None or not hasattr(rnn, "fp32_precision"):
        return "SKIP", "torch has no cudnn.rnn.fp32_precision (< 2.9)"
    conv = torch.backends.cudnn.conv
    old = (conv.fp32_precision, rnn.fp32_precision)
    out = {}
    try:
        for conv_p, rnn_p in (("tf32", "ieee"), ("ieee", "tf32")):
            conv.fp32_precision, rnn.fp32_precision = conv_p, rnn_p
            ref, mod = pair("LSTM", 256, 256, torch.float64, backend)
            mod = mod.float()
            x = torch.randn(50, 8, 256, device=DEV, dtype=torch.float64)
            y_ref, _ = ref(x)
            y, _ = mod(x.float())
            out[rnn_p] = rel(y, y_ref)
    finally:
        conv.fp32_precision, rnn.fp32_precision = old
    ok = out["ieee"] < 2e-5 and out["tf32"] < 3e-3
    return ("PASS" if ok else "FAIL"), f"rel err vs fp64: rnn=ieee {out['ieee']:.1e}, rnn=tf32 {out['tf32']:.1e}"


def check_sync_debug(backend):
    ref, mod = pair("LSTM", 64, 256, torch.bfloat16, backend, num_layers=2, bidirectional=True)
    x = torch.randn(20, 8, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    mod(x)[0].sum().backward()  # warm-up: compilation and first-call setup may sync
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, _ = mod(x)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()
    return "PASS", "forward + backward without a host sync"


def check_graph_capture(backend):
    ref, mod = pair("LSTM", 64, 256, torch.bfloat16, backend, num_layers=2, bidirectional=True)
    x = torch.randn(20, 8, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up on a side stream, as torch's graph docs require
            mod.zero_grad(set_to_none=True)
            y, _ = mod(x)
            y.float().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    mod.zero_grad(set_to_none=True)
    x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_g, _ = mod(x)
        y_g.float().sum().backward()
    src = torch.randn_like(x)
    x.data.copy_(src)
    g.replay()
    torch.cuda.synchronize()
    y_eager, _ = mod(x.detach())
    gx = x.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    mod(x2)[0].float().sum().backward()
    e1, e2 = rel(y_g, y_eager), rel(gx, x2.grad)
    ok = e1 == 0.0 and e2 < 1e-6
    return ("PASS" if ok else "FAIL"), f"replay vs eager: y {e1:.1e}, dx {e2:.1e}"


def check_proj_fit(backend):
    H, P, I = 1536, 1280, 128
    torch.manual_seed(0)
    x = torch.randn(10, 4, I, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    ref = torch.nn.LSTM(I, H, proj_size=P, device=DEV, dtype=torch.bfloat16)
    mod = fusedrnn.LSTM(I, H, proj_size=P, device=DEV, dtype=torch.bfloat16, backend=backend)
    mod.load_state_dict(ref.state_dict())
    explicit = None
    try:
        y, _ = mod(x)
        y.float().sum().backward()
        explicit = f"explicit runs fwd+bwd (rel err {rel(y, ref(x)[0]):.1e})"
    except (ValueError, NotImplementedError) as e:
        explicit = f"explicit raises up front: {str(e)[:160]}"
    except RuntimeError as e:
        return "FAIL", f"explicit backend failed mid-way (RuntimeError): {str(e)[:200]}"
    auto = fusedrnn.LSTM(I, H, proj_size=P, device=DEV, dtype=torch.bfloat16, backend="auto")
    auto.load_state_dict(ref.state_dict())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x.grad = None
        ya, _ = auto(x)
        ya.float().sum().backward()
    e = rel(ya, ref(x)[0])
    return ("PASS" if e < 2e-2 else "FAIL"), f"{explicit}; auto rel err {e:.1e}, {len(w)} warning(s)"


def check_large_batch(backend):
    if backend != "triton":
        return "SKIP", "Triton batch-chunk check"
    res = []
    ok = True
    for H, B in ((512, 300), (300, 512), (200, 1024)):
        ref, mod = pair("LSTM", 64, H, torch.bfloat16, backend)
        x = torch.randn(8, B, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        y, (h, c) = mod(x)
        y.float().sum().backward()
        y_ref, _ = ref(x)
        e = rel(y, y_ref)
        ok &= e < 2e-2
        res.append(f"H={H} B={B} {e:.1e}")
    return ("PASS" if ok else "FAIL"), "; ".join(res)


def check_int64_offsets(backend):
    T, B, H = 1100, 512, 1024
    ref, mod = pair("LSTM", 32, H, torch.bfloat16, backend)
    x = torch.randn(T, B, 32, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        y, (h, c) = mod(x)
        y_ref, (h_ref, c_ref) = ref(x)
    e_last, e_h = rel(y[-1], y_ref[-1]), rel(h, h_ref)
    ok = e_last < 3e-2 and e_h < 3e-2 and torch.isfinite(y[-1]).all().item()
    return ("PASS" if ok else "FAIL"), f"last step rel err {e_last:.1e}, h_n {e_h:.1e}"


def check_barrier_stress(backend):
    res = []
    ok = True
    for mode in ("LSTM", "GRU"):
        H = largest_h(backend, mode, torch.bfloat16)
        ref, mod = pair(mode, 64, H, torch.bfloat16, backend)
        x = torch.randn(2000, 64, 64, device=DEV, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        with torch.no_grad():
            first = mod(x)[0]
            same = all(torch.equal(first, mod(x)[0]) for _ in range(19))
            e = rel(first, ref(x)[0])
        torch.cuda.synchronize()
        ok &= same and e < 5e-2
        res.append(f"{mode} H={H}: bitwise {'equal' if same else 'DIFFERENT'}, rel err {e:.1e} "
                   f"({time.perf_counter() - t0:.1f} s)")
    return ("PASS" if ok else "FAIL"), "; ".join(res)


CHECKS = {
    "tf32_new_api": check_tf32_new_api,
    "sync_debug": check_sync_debug,
    "graph_capture": check_graph_capture,
    "proj_fit": check_proj_fit,
    "large_batch": check_large_batch,
    "int64_offsets": check_int64_offsets,
    "barrier_stress": check_barrier_stress,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    p.add_argument("--only", nargs="+", choices=sorted(CHECKS))
    p.add_argument("--json")
    p.add_argument("--list", action="store_true", help="print the checks and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.list:
        for name, fn in CHECKS.items():
            print(f"{name:15s} {fn.__name__}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_extra_checks: no CUDA device")
        return 1
    avail = fusedrnn.available_backends()
    results = []
    for name in args.only or CHECKS:
        for backend in args.backends:
            if avail.get(backend) is not None:
                status, detail = "SKIP", f"backend unavailable: {avail.get(backend)}"
                dt = 0.0
            else:
                t0 = time.perf_counter()
                try:
                    status, detail = CHECKS[name](backend)
                except Exception as e:  # noqa: BLE001  (report every check)
                    status, detail = "FAIL", f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                    torch.cuda.synchronize() if torch.cuda.is_available() else None
                dt = time.perf_counter() - t0
            results.append(dict(check=name, backend=backend, status=status, detail=detail, seconds=round(dt, 2)))
            print(f"{status:4s} {name:15s} {backend:7s} {dt:6.1f}s  {detail}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print("\n==== gpu_extra_checks summary")
    for r in results:
        print(f"{r['status']:4s} {r['check']:15s} {r['backend']:7s} {r['detail'][:150]}")
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
