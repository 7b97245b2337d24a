"""``python -m fusedrnn.bench``: run a benchmark suite, print a table, write JSON / markdown / plots.

Examples
    python -m fusedrnn.bench --quick                                   # CPU: a minute or two
    python -m fusedrnn.bench --suite standard --json bench.json --plot speedup.png --markdown bench.md
    python -m fusedrnn.bench --suite full --backends torch cuda triton --filter 'lstm-*'
    python -m fusedrnn.bench --suite tiny --device cpu --backends torch triton   # Triton interpreter
    python -m fusedrnn.bench --suite cpu --json cpu.json --markdown cpu.md       # CPU suite, 1 and 2 threads
    python -m fusedrnn.bench --quick --callgrind cg/ --backends cpp    # instruction counts (valgrind)

Exit status: 0 when every row ran and passed its accuracy check (rows skipped as unavailable or
unsupported count as passed), 1 when some row errored or failed the check, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import time
from typing import List, Optional

import torch

from . import configs as C
from . import costmodel, harness, report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedrnn.bench",
        description="Benchmark fusedrnn backends against torch.nn (same process, same inputs).",
    )
    p.add_argument("--suite", choices=C.SUITES, default=None,
                   help="config set (default: standard on CUDA, quick on CPU)")
    p.add_argument("--quick", action="store_true", help="alias for --suite quick")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="backends to run (default: torch + every usable kernel backend; on CPU torch, "
                        "reference, cpp if built).  'triton' on CPU runs under TRITON_INTERPRET=1 with tiny sizes.")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--filter", nargs="+", default=None, metavar="GLOB", help="only configs matching a glob")
    p.add_argument("--json", metavar="FILE", help="write rows + environment as JSON (rewritten after every config)")
    p.add_argument("--plot", metavar="FILE.png", help="speed-up bar chart; sweeps go to FILE_vs_{H,B,T}.png")
    p.add_argument("--markdown", metavar="FILE.md", help="markdown table for BENCHMARKS.md")
    p.add_argument("--ratios", metavar="FILE.md",
                   help="compact markdown table of the ratios vs torch.nn (times, x fwd, x fwd+bwd, accuracy)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 accuracy check")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new row after S seconds (the rest are recorded as skipped)")
    p.add_argument("--min-time", type=float, default=None, metavar="S", help="seconds per measurement")
    p.add_argument("--max-reps", type=int, default=None, help="cap on repetitions per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before each measurement")
    p.add_argument("--clock", choices=("auto", "wall", "thread"), default="auto",
                   help="CPU clock: thread = CPU time of the calling thread (not disturbed by other processes on a "
                        "shared machine; one-thread rows only), wall; auto (default): thread for rows on one thread")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="timings per row, interleaved across the backends of each config; a row reports the "
                        "fastest run's median (default 3 for the cpu suite, else 1): for shared, noisy machines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: 1 for the quick/tiny suites on CPU, whose "
                        "sizes gain nothing from threads and whose timings threads make noisy on a shared "
                        "machine; 0: torch's default)")
    p.add_argument("--callgrind", metavar="DIR",
                   help="count instructions instead of timing: rerun under valgrind's callgrind (dumps in DIR) "
                        "and report, per row, the instructions executed inside fusedrnn's C++ CPU ops per call "
                        "(one thread; AVX2 kernels, valgrind has no AVX-512).  Deterministic, for A/B comparisons "
                        "of kernel changes on a noisy machine.  Default backends: cpp")
    p.add_argument("--callgrind-scope", choices=harness.CALLGRIND_SCOPES, default="ops",
                   help="with --callgrind: 'ops' (default) counts inside fusedrnn's C++ CPU ops only; 'call' "
                        "counts everything a call executes (Python path, dispatch, GEMMs, kernels), torch.nn "
                        "rows included: for A/B comparisons of the per-call overhead")
    p.add_argument("--list", action="store_true", help="list the suite's configs and exit")
    p.add_argument("--no-progress", action="store_true", help="plain per-row lines instead of a progress bar")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: render the table / --markdown / --plot of an earlier --json file")
    p.add_argument("--profile-steps", action="store_true",
                   help="CUDA: after the suite, time the recurrence ops alone (T=1 vs T=N, inference vs "
                        "training, backward) for every FUSEDRNN_CUDA_PLAN variant next to the cost model")
    p.add_argument("--profile-T", type=int, default=1000, metavar="N", help="long sequence of --profile-steps")
    return p


def _write_reports(args, meta, rows, cfgs) -> None:
    if args.ratios:
        from pathlib import Path  # noqa: PLC0415

        Path(args.ratios).write_text(report.ratio_markdown(meta, rows))
        print(f"wrote {args.ratios}")
    if args.markdown:
        report.write_markdown(args.markdown, meta, rows)
        extra = costmodel.markdown(rows, meta.get("profile"))
        if extra:
            with open(args.markdown, "a") as f:
                f.write(extra)
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            by_name = {c.name: c for c in cfgs}
            sweeps = {c.name for c in cfgs if c.sweep}
            print(f"wrote {report.plot_speedup(args.plot, meta, rows, exclude=sweeps)}")
            for f in report.plot_sweeps(args.plot, meta, rows, by_name):
                print(f"wrote {f}")
        except ImportError as e:
            print(f"fusedrnn.bench: no plot ({e}); pip install matplotlib", file=sys.stderr)


def _failed(rows):
    return [r for r in rows if r.get("ok") is False
            or (r.get("error") and not r["error"].startswith(harness.NOT_FAILURES))]


def _finish(rows) -> int:
    failed = _failed(rows)
    if failed:
        print(f"{len(failed)} row(s) failed: " + ", ".join(f"{r['config']}[{r['backend']}]" for r in failed[:20]),
              file=sys.stderr)
    return 1 if failed else 0


def _render(args) -> int:
    import json  # noqa: PLC0415

    with open(args.from_json) as f:
        data = json.load(f)
    rows = data.pop("rows")
    cfgs = [C.BenchConfig(**{**d, "lengths": tuple(d["lengths"]) if d.get("lengths") else None})
            for d in data.get("configs", {}).values()]
    print("\n".join(report.header_lines(data)))
    print(report.format_table(rows))
    _write_reports(args, data, rows, cfgs)
    return _finish(rows)


def _select(args, device: torch.device) -> List[C.BenchConfig]:
    name = "quick" if args.quick else (args.suite or ("standard" if device.type == "cuda" else "quick"))
    args.suite = name
    cfgs = C.suite(name, device.type)
    if args.filter:
        cfgs = [c for c in cfgs if any(fnmatch.fnmatch(c.name, g) for g in args.filter)]
    return cfgs


def _triton_interpreter(device: torch.device, backends: List[str], argv: List[str]) -> None:
    """Triton on CPU means the interpreter; the variable must be set before kernels are defined."""
    if device.type != "cpu" or "triton" not in backends or os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if any(m.startswith("fusedrnn.backends.triton.") for m in sys.modules):
        # kernels were already defined for the GPU: start again with the variable set
        os.execv(sys.executable, [sys.executable, "-m", "fusedrnn.bench", *argv])


def _rerun_under_callgrind(args, argv: List[str]) -> int:
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        print(f"fusedrnn.bench: --callgrind needs {' and '.join(missing)} on PATH", file=sys.stderr)
        return 2
    os.makedirs(args.callgrind, exist_ok=True)
    cmd = harness.callgrind_command(args.callgrind, argv, args.callgrind_scope)
    env = dict(os.environ, **{harness.CALLGRIND_ENV: os.path.abspath(args.callgrind)})
    print("fusedrnn.bench: running under callgrind (imports take a minute): " + " ".join(cmd[:5]) + " ...",
          flush=True)
    return subprocess.run(cmd, env=env).returncode


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.from_json:
        return _render(args)
    if args.callgrind and not os.environ.get(harness.CALLGRIND_ENV):
        return _rerun_under_callgrind(args, argv)
    threads = torch.get_num_threads()
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)


def _run(args, argv: List[str]) -> int:
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fusedrnn.bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    cfgs = _select(args, device)
    counter = None
    if args.callgrind:
        if device.type != "cpu":
            print("fusedrnn.bench: --callgrind counts CPU kernels: use --device cpu", file=sys.stderr)
            return 2
        args.threads = 1
    elif args.threads is None and device.type == "cpu" and args.suite in ("quick", "tiny"):
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        for c in cfgs:
            print(c.name, c.to_dict())
        return 0
    if not cfgs:
        print("fusedrnn.bench: no config matches", file=sys.stderr)
        return 2
    backends = args.backends
    if backends:
        _triton_interpreter(device, backends, argv)
    else:
        backends = ["cpp"] if args.callgrind else harness.default_backends(device)
    opts = harness.TimingOptions.for_device(device, args.suite)
    if args.min_time is not None:
        opts.min_time_s = args.min_time
    if args.max_reps is not None:
        opts.max_reps = max(1, args.max_reps)
        opts.min_reps = min(opts.min_reps, opts.max_reps)
    if args.warmup is not None:
        opts.warmup = max(0, args.warmup)
    if args.repeat is not None:
        opts.repeat = max(1, args.repeat)
    opts.clock = args.clock
    if device.type == "cpu" and args.suite not in ("quick", "tiny", "cpu"):
        print(f"fusedrnn.bench: suite {args.suite!r} on CPU uses GPU-sized configs and can take very long",
              file=sys.stderr)

    meta = harness.environment(device)
    if args.callgrind:
        counter = harness.Callgrind(os.environ[harness.CALLGRIND_ENV], args.callgrind_scope)
        meta["callgrind"] = True
        meta["callgrind_scope"] = args.callgrind_scope
    meta.update(suite=args.suite, backends=list(backends),
                configs={c.name: c.to_dict() for c in cfgs},
                timing=dict(vars(opts)), command="python -m fusedrnn.bench " + " ".join(argv))
    print("\n".join(report.header_lines(meta)), flush=True)
    print(f"backends: {', '.join(backends)}   configs: {len(cfgs)}", flush=True)

    def checkpoint(rows):
        if args.json:
            report.write_json(args.json, meta, rows)

    t0 = time.perf_counter()
    rows = harness.run_suite(cfgs, backends, device, opts=opts, check=not args.no_check, seed=args.seed,
                             time_budget_s=args.time_budget, progress="lines" if args.no_progress else True,
                             on_config_done=checkpoint, counter=counter)
    if args.profile_steps:
        if device.type != "cuda":
            print("fusedrnn.bench: --profile-steps needs a CUDA device", file=sys.stderr)
        else:
            meta["profile"] = costmodel.profile_steps(cfgs, device, steps=max(2, args.profile_T),
                                                      tf32=harness.rnn_tf32_enabled())
    meta["elapsed_s"] = round(time.perf_counter() - t0, 2)
    print()
    print(report.format_table(rows))
    cost = costmodel.cost_rows(rows)
    if cost:
        print("\nCUDA cost model (forward us per step: measured vs predicted terms)")
        print(costmodel.format_rows(cost, costmodel.COST_COLUMNS))
    if meta.get("profile"):
        print("\nStep profile (recurrence ops alone, layer 0)")
        print(costmodel.format_rows(meta["profile"], costmodel.PROFILE_COLUMNS))
    print(f"\n{len(rows)} rows in {meta['elapsed_s']:.1f} s")
    if args.json:
        report.write_json(args.json, meta, rows)
        print(f"wrote {args.json}")
    _write_reports(args, meta, rows, cfgs)
    return _finish(rows)


if __name__ == "__main__":
    sys.exit(main())
