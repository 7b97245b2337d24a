"""The CUDA backend's per-step cost model next to the measurement (issue 10, item 7).

The planner of ``csrc/include/fusedrnn/cuda_plan.h`` chooses each launch's geometry with a model of
one time step (reached through ``fusedrnn.backends.cuda.plan``); this module puts its terms next
to what a GPU measures, so a GPU run tells which term was wrong:

``predict(cfg, device)``
    the predicted forward (inference) and backward microseconds per step of a benchmark config, with
    the forward's split into the model's terms (see ``cuda_plan.h``):
        lat   dependent L2 round trips of the operand loads
        mma   tensor-core (or FMA) issue, or the dependent-MMA chain
        smem  shared-memory reads: W fragments + the partial-sum reduction
        l2    exchange bytes from L2 (per-SM bandwidth, or the grid's aggregate)
        cell  pointwise epilogues
        sync  grid barrier or flag round trip per exchange
    per step = lat + max(mma, smem, l2) + cell per pass, + sync.  A layer's directions run one
    after the other, so a bidirectional layer's step counts both.

``profile_steps(cfgs, device)`` (``python -m fusedrnn.bench --profile-steps``)
    times the recurrence ops alone for layer 0 of each LSTM/GRU config: T=1 and T=N (the slope is
    the per-step cost, the intercept launch and setup), inference (``save=False``) and training
    forward, and the backward, for every planner variant (``FUSEDRNN_CUDA_PLAN`` = auto, legacy,
    barrier, flags, stepwise), each next to the model's prediction for that variant.
"""

from __future__ import annotations

import os
import statistics
from typing import Dict, List, Optional

import torch

from .configs import BenchConfig

TERMS = ("lat_us", "mma_us", "smem_us", "l2_us", "cell_us", "sync_us")
VARIANTS = ("auto", "legacy", "barrier", "flags", "stepwise")


def _cuda():
    from ..backends import cuda  # noqa: PLC0415  (lazy: the harness imports without the extension)

    return cuda


def _passes(cfg: BenchConfig):
    m = "lstm" if cfg.mode == "LSTM" else "gru"
    return f"{m}_fwd", f"{m}_bwd"


def describe(plan: dict) -> str:
    """Short text of a plan: units per CTA x unit slices, batch groups, n-tiles, protocol."""
    if not plan.get("ok"):
        return "does not fit: " + plan.get("why", "")
    if plan.get("stepwise"):
        return "stepwise (GEMM + pointwise per step)"
    s = f"U{plan['U']}x{plan['unit_slices']}"
    if plan["batch_groups"] > 1:
        s += f" g{plan['batch_groups']}"
    s += f" nt{plan['n_tiles']} {plan['sync']}"
    return s + (" (legacy)" if plan["legacy"] else "")


def predict(cfg: BenchConfig, device, tf32: bool = False, variant: str = "",
            batch: Optional[int] = None) -> Optional[Dict[str, object]]:
    """Predicted µs per step of ``cfg`` on the CUDA backend (None for cells, other modes, or when
    the planner is unavailable).  Keys: ``plan`` (text), ``fwd_step_us`` (inference forward, summed
    over directions), ``bwd_step_us``, ``fwd_train_step_us`` and the forward's terms ``TERMS``."""
    if cfg.is_cell or cfg.mode not in ("LSTM", "GRU"):
        return None
    try:
        cuda = _cuda()
        B = batch if batch is not None else cfg.B
        fwd, bwd = _passes(cfg)
        common = dict(device=device, tf32=tf32, variant=variant)
        pf = cuda.plan(fwd, cfg.torch_dtype, cfg.H, B, train=False, **common)
        pt = cuda.plan(fwd, cfg.torch_dtype, cfg.H, B, train=True, **common)
        pb = cuda.plan(bwd, cfg.torch_dtype, cfg.H, B, train=True, **common)
    except Exception as e:  # noqa: BLE001  (no extension, no device: no prediction)
        return {"plan": f"no prediction ({type(e).__name__}: {e})"}
    if not (pf["ok"] and pb["ok"]):
        return {"plan": describe(pf if not pf["ok"] else pb)}
    D = cfg.directions
    out: Dict[str, object] = {"plan": describe(pf), "plan_bwd": describe(pb)}
    out["fwd_step_us"] = D * pf["cost"]["step_us"]
    out["fwd_train_step_us"] = D * pt["cost"]["step_us"]
    out["bwd_step_us"] = D * pb["cost"]["step_us"]
    for k in TERMS:
        out[k] = D * pf["cost"][k]
    return out


def row_prediction(cfg: BenchConfig, backend: str, device: torch.device, tf32: bool) -> Dict[str, object]:
    """The ``pred_*`` fields of a benchmark row (empty unless a CUDA-backend row on a GPU)."""
    if backend != "cuda" or device.type != "cuda":
        return {}
    p = predict(cfg, device, tf32=tf32)
    if not p:
        return {}
    return {"pred_" + k: v for k, v in p.items()}


# ---------------------------------------------------------------------------------- profiling
def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class _PlanVariant:
    """FUSEDRNN_CUDA_PLAN set for the block (the planner reads it on every call)."""

    def __init__(self, variant: str):
        self.variant, self.old = variant, None

    def __enter__(self):
        self.old = os.environ.get("FUSEDRNN_CUDA_PLAN")
        os.environ["FUSEDRNN_CUDA_PLAN"] = self.variant
        return self

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("FUSEDRNN_CUDA_PLAN", None)
        else:
            os.environ["FUSEDRNN_CUDA_PLAN"] = self.old


def profile_config(cfg: BenchConfig, device: torch.device, steps: int = 1000, reps: int = 10,
                   variants=VARIANTS, tf32: bool = False) -> List[dict]:
    """Rows of ``profile_steps`` for one config (layer 0, one direction, dense batch of cfg.B)."""
    cuda = _cuda()
    if cfg.is_cell or cfg.mode not in ("LSTM", "GRU"):
        return []
    dt, H, B = cfg.torch_dtype, cfg.H, cfg.B
    G = (4 if cfg.mode == "LSTM" else 3) * H
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    k = H ** -0.5
    w, b = rnd(G, H, scale=k), rnd(G, scale=k)
    h0, c0 = rnd(B, H), rnd(B, H)
    xs = {T: rnd(T, B, G) for T in (1, steps)}
    dys = {T: rnd(T, B, H) for T in (1, steps)}
    out = []
    for variant in variants:
        row = {"config": cfg.name, "variant": variant, "steps": steps}
        pred = predict(cfg, device, tf32=tf32, variant=variant)
        if pred:
            row["plan"] = pred.get("plan")
            row["pred_fwd_step_us"] = pred.get("fwd_step_us", None) and pred["fwd_step_us"] / cfg.directions
            row["pred_fwd_train_step_us"] = (pred.get("fwd_train_step_us", None)
                                             and pred["fwd_train_step_us"] / cfg.directions)
            row["pred_bwd_step_us"] = pred.get("bwd_step_us", None) and pred["bwd_step_us"] / cfg.directions
        try:
            with _PlanVariant(variant):
                times = {}
                saved = {}
                for T in (1, steps):
                    x = xs[T]
                    if cfg.mode == "LSTM":
                        def fwd(save, x=x):
                            return cuda.lstm_fwd(x, w, b, h0, c0, None, None, False, save=save)
                    else:
                        def fwd(save, x=x):
                            return cuda.gru_fwd(x, w, b, h0, None, False, save=save)
                    times[("inf", T)] = _median_ms(lambda: fwd(False), reps)
                    times[("train", T)] = _median_ms(lambda: fwd(True), reps)
                    saved[T] = fwd(True)
                for T in (1, steps):
                    s, dy = saved[T], dys[T]
                    if cfg.mode == "LSTM":
                        def bwd(s=s, dy=dy):
                            return cuda.lstm_bwd(dy, h0, c0, w, None, c0, s[3], s[4], None, False)
                    else:
                        def bwd(s=s, dy=dy):
                            return cuda.gru_bwd(dy, h0, w, h0, s[0], s[2], None, False)
                    times[("bwd", T)] = _median_ms(bwd, reps)
            for kind in ("inf", "train", "bwd"):
                t1, tn = times[(kind, 1)], times[(kind, steps)]
                row[f"{kind}_t1_ms"] = t1
                row[f"{kind}_tN_ms"] = tn
                row[f"{kind}_step_us"] = (tn - t1) * 1e3 / (steps - 1)
            row["error"] = None
        except Exception as e:  # noqa: BLE001  (a variant that fails is a row, not a crash)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        out.append(row)
    return out


def profile_steps(cfgs, device, steps: int = 1000, reps: int = 10, tf32: bool = False,
                  progress=print) -> List[dict]:
    rows = []
    for cfg in cfgs:
        rows += profile_config(cfg, device, steps=steps, reps=reps, tf32=tf32 and cfg.dtype == "fp32")
        if progress and rows:
            progress(f"profiled {cfg.name}")
    return rows


PROFILE_COLUMNS = [
    ("config", "config", "{}"), ("variant", "variant", "{}"), ("plan", "plan", "{}"),
    ("inf us/step", "inf_step_us", "{:.2f}"), ("pred", "pred_fwd_step_us", "{:.2f}"),
    ("train us/step", "train_step_us", "{:.2f}"), ("pred", "pred_fwd_train_step_us", "{:.2f}"),
    ("bwd us/step", "bwd_step_us", "{:.2f}"), ("pred", "pred_bwd_step_us", "{:.2f}"),
    ("T=1 inf ms", "inf_t1_ms", "{:.3f}"), ("T=1 bwd ms", "bwd_t1_ms", "{:.3f}"),
]

COST_COLUMNS = [
    ("config", "config", "{}"), ("plan", "pred_plan", "{}"),
    ("meas us/step", "per_step_us", "{:.2f}"), ("pred", "pred_fwd_step_us", "{:.2f}"),
    ("lat", "pred_lat_us", "{:.2f}"), ("mma", "pred_mma_us", "{:.2f}"), ("smem", "pred_smem_us", "{:.2f}"),
    ("L2", "pred_l2_us", "{:.2f}"), ("cell", "pred_cell_us", "{:.2f}"), ("sync", "pred_sync_us", "{:.2f}"),
    ("pred bwd", "pred_bwd_step_us", "{:.2f}"),
]


def format_rows(rows: List[dict], columns) -> str:
    """Fixed-width table of ``rows`` (missing values "-"; error rows show the error)."""
    def cell(r, k, f):
        v = r.get(k)
        return "-" if v is None else f.format(v)

    body = []
    for r in rows:
        if r.get("error"):
            body.append([str(r.get(columns[0][1], "")), str(r.get(columns[1][1], "")), "error: " + r["error"]])
        else:
            body.append([cell(r, k, f) for _, k, f in columns])
    headers = [h for h, _, _ in columns]
    widths = [len(h) for h in headers]
    for cells in body:
        if len(cells) == len(headers):
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    for cells in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) if len(cells) == len(headers)
                     else "  ".join(cells))
    return "\n".join(lines)


def cost_rows(rows: List[dict]) -> List[dict]:
    """The benchmark rows that carry a prediction (CUDA-backend rows on a GPU)."""
    return [r for r in rows if r.get("pred_plan") is not None and not r.get("error")]


def markdown(rows: List[dict], profile: Optional[List[dict]] = None) -> str:
    """Markdown tables of the cost model (benchmark rows with a prediction, and the profile)."""
    out = []

    def table(rs, columns, title):
        if not rs:
            return
        out.extend(["", f"#### {title}", "", "| " + " | ".join(h for h, _, _ in columns) + " |",
                    "|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|"])
        for r in rs:
            if r.get("error"):
                out.append(f"| {r.get(columns[0][1])} | {r.get(columns[1][1])} | error: "
                           + r["error"].replace("|", "\\|") + " |")
            else:
                out.append("| " + " | ".join("-" if r.get(k) is None else f.format(r.get(k)).replace("|", "\\|")
                                             for _, k, f in columns) + " |")

    table(cost_rows(rows), COST_COLUMNS, "CUDA cost model: forward µs per step, measured vs predicted terms")
    table(profile or [], PROFILE_COLUMNS, "Step profile (recurrence ops alone, layer 0): T=1 vs T=N per variant")
    if out:
        out += ["", "Terms (cuda_plan.h): lat = dependent L2 round trips, mma, smem = W fragments + partial "
                    "sums, L2 = exchange bytes (per SM or aggregate), cell = pointwise, sync = barrier or flag "
                    "round trip; a step is lat + max(mma, smem, L2) + cell per pass, + sync.  Profile: per "
                    "step = (t(T=N) - t(T=1)) / (N - 1); inf = save=False forward.", ""]
    return "\n".join(out)
