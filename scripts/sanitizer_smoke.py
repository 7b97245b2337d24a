"""Run every CUDA and Triton kernel of fusedrnn once, forward and backward, on small inputs.

Meant to run under compute-sanitizer (scripts/gpu_check.sh runs it plain first, which also fills
Triton's compile cache, then under ``--tool memcheck`` and ``--tool racecheck``):

    python scripts/sanitizer_smoke.py [--backends cuda triton] [--quick] [--list]
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitizer_smoke.py --quick

It goes through the public modules only (fusedrnn.LSTM / GRU / LSTMCell / GRUCell with an explicit
``backend=``).  Shapes are chosen to reach each kernel path: a small H (one program owns every unit)
and a larger H (units split over programs/CTAs with a grid barrier), odd batch, padded packed
sequences in both directions, an LSTM projection, fp32 and bf16.  Each case also compares its output
with torch.nn (same dtype) and prints the relative error, so a sanitizer-clean but wrong kernel still
shows.  Exit status 1 if any case raised an error other than "backend does not support this".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import fusedrnn  # noqa: E402


def cases(quick: bool):
    """(name, mode, kwargs) for each call; kwargs: H, I, T, B, dtype, layers, bidir, packed, proj."""
    out = []
    hs = (32, 512) if quick else (32, 256, 512, 1024)  # a superset: the plain run fills the Triton cache
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for mode in ("LSTM", "GRU"):
        for H in hs:
            for dt in dtypes:
                out.append((f"{mode} H={H} {dt}", mode, dict(H=H, I=H, T=5, B=3, dtype=dt)))
        out.append((f"{mode} 2-layer bidir packed", mode,
                    dict(H=hs[-1], I=24, T=7, B=5, dtype=torch.bfloat16, layers=2, bidir=True, packed=True)))
    out.append(("LSTM proj_size", "LSTM", dict(H=hs[-1], I=64, T=5, B=3, dtype=torch.bfloat16, proj=64)))
    for mode in ("LSTMCell", "GRUCell"):
        for H in hs:
            out.append((f"{mode} H={H} bf16", mode, dict(H=H, I=H, T=1, B=3, dtype=torch.bfloat16)))
        out.append((f"{mode} H={hs[0]} fp32", mode, dict(H=hs[0], I=hs[0], T=1, B=3, dtype=torch.float32)))
    return out


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    n = b.norm().item()
    return (a - b).norm().item() / (n if n > 0 else 1.0)


def run_case(mode, backend, H, I, T, B, dtype, layers=1, bidir=False, packed=False, proj=0):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cell = mode.endswith("Cell")
    tcls = getattr(torch.nn, mode)
    if cell:
        ref = tcls(I, H, device=dev, dtype=dtype)
        mod = getattr(fusedrnn, mode)(I, H, device=dev, dtype=dtype, backend=backend)
    else:
        kw = dict(num_layers=layers, bidirectional=bidir)
        if proj:
            kw["proj_size"] = proj
        ref = tcls(I, H, device=dev, dtype=dtype, **kw)
        mod = getattr(fusedrnn, mode)(I, H, device=dev, dtype=dtype, backend=backend, **kw)
    mod.load_state_dict(ref.state_dict())
    if cell:
        x = torch.randn(B, I, device=dev, dtype=dtype, requires_grad=True)
        h = torch.randn(B, H, device=dev, dtype=dtype, requires_grad=True)
        hx = (h, torch.randn(B, H, device=dev, dtype=dtype, requires_grad=True)) if mode == "LSTMCell" else h
        out = mod(x, hx)
        out_ref = ref(x, hx)
        outs = list(out) if isinstance(out, tuple) else [out]
        outs_ref = list(out_ref) if isinstance(out_ref, tuple) else [out_ref]
    else:
        x = torch.randn(T, B, I, device=dev, dtype=dtype, requires_grad=True)
        inp = x
        if packed:
            lengths = torch.randint(1, T + 1, (B,))
            lengths[0] = T
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, hn = mod(inp)
        out_ref, hn_ref = ref(inp)
        if packed:
            out, out_ref = out.data, out_ref.data
        outs = [out] + (list(hn) if isinstance(hn, tuple) else [hn])
        outs_ref = [out_ref] + (list(hn_ref) if isinstance(hn_ref, tuple) else [hn_ref])
    loss = sum((o.float() * torch.randn_like(o, dtype=torch.float32)).sum() for o in outs)
    loss.backward()
    torch.cuda.synchronize()
    return max(rel(a, b) for a, b in zip(outs, outs_ref))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    p.add_argument("--quick", action="store_true", help="fewer sizes and dtypes (for the sanitizers)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    todo = cases(args.quick)
    if args.list:
        for name, mode, kw in todo:
            print(name, mode, kw)
        return 0
    if not torch.cuda.is_available():
        print("sanitizer_smoke: no CUDA device")
        return 1
    avail = fusedrnn.available_backends()
    failed = ran = 0
    t_all = time.perf_counter()
    for backend in args.backends:
        if avail.get(backend) is not None:
            print(f"SKIP {backend}: unavailable ({avail.get(backend, 'unknown backend')})", flush=True)
            continue
        for name, mode, kw in todo:
            t0 = time.perf_counter()
            try:
                err = run_case(mode, backend, **kw)
                ran += 1
                print(f"OK   {backend:6s} {name:32s} rel err vs torch.nn {err:.1e}  "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
            except (NotImplementedError, ValueError) as e:
                if isinstance(e, NotImplementedError) or "does not support" in str(e):
                    print(f"SKIP {backend:6s} {name:32s} {str(e).splitlines()[0][:120]}", flush=True)
                else:
                    failed += 1
                    print(f"FAIL {backend:6s} {name:32s} {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc()
            except Exception as e:  # noqa: BLE001  (keep going: report every failing kernel)
                failed += 1
                print(f"FAIL {backend:6s} {name:32s} {type(e).__name__}: {str(e)[:300]}", flush=True)
                traceback.print_exc()
    print(f"sanitizer_smoke: {ran} ran, {failed} failed, {time.perf_counter() - t_all:.1f} s", flush=True)
    return 1 if failed or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
