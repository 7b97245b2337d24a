"""Reports of a benchmark run: terminal table, JSON, markdown (for BENCHMARKS.md) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

# (header, key, format) of the table columns, terminal and markdown alike
COLUMNS = [
    ("config", "config", "{}"),
    ("backend", "backend", "{}"),
    ("fwd ms", "fwd_ms", "{:.3f}"),
    ("fwd+bwd ms", "fwdbwd_ms", "{:.3f}"),
    ("x torch", "ratio_vs_torch", "{:.2f}"),
    ("x torch fwd", "fwd_ratio_vs_torch", "{:.2f}"),
    ("max rel err", "max_rel_err", "{:.1e}"),
    ("ok", "ok", "{}"),
    ("peak MB", "peak_mem_mb", "{:.0f}"),
    ("tokens/s", "tokens_per_s", "{}"),
    ("floor ms", "floor_ms", "{:.3f}"),
    ("fwd/floor", "fwd_over_floor", "{:.1f}"),
]


# columns of a --callgrind run: instructions per call inside fusedrnn's C++ CPU ops
CALLGRIND_COLUMNS = [
    ("config", "config", "{}"),
    ("backend", "backend", "{}"),
    ("fwd Minstr", "fwd_ir", "{:.3f}"),
    ("fwd+bwd Minstr", "fwdbwd_ir", "{:.3f}"),
    ("max rel err", "max_rel_err", "{:.1e}"),
    ("ok", "ok", "{}"),
]


def _columns(rows: List[dict]):
    return CALLGRIND_COLUMNS if any(r.get("fwd_ir") is not None for r in rows) else COLUMNS


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}"


def cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "ok":
        return "yes" if v else "NO"
    if key == "tokens_per_s":
        return _si(v)
    if key in ("fwd_ir", "fwdbwd_ir"):
        v = v / 1e6
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return fmt.format(v)


def _cells(row: dict, columns=COLUMNS) -> List[str]:
    if row.get("error"):
        return [row["config"], row["backend"], "error: " + row["error"]]
    return [cell(row, k, f) for _, k, f in columns]


def format_table(rows: List[dict], color: Optional[bool] = None) -> str:
    """Fixed-width table; rows failing the accuracy check are red on a terminal."""
    if color is None:
        color = os.isatty(1) and not os.environ.get("NO_COLOR")
    columns = _columns(rows)
    headers = [h for h, _, _ in columns]
    body = [_cells(r, columns) for r in rows]
    widths = [len(h) for h in headers]
    for cells in body:
        if len(cells) == len(headers):
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]
        else:  # error rows: config and backend only count
            widths[0], widths[1] = max(widths[0], len(cells[0])), max(widths[1], len(cells[1]))
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and r["config"] != prev:
            lines.append("")
        prev = r["config"]
        if len(cells) == len(headers):
            line = "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        else:
            line = f"{cells[0].ljust(widths[0])}  {cells[1].ljust(widths[1])}  {cells[2]}"
        bad = r.get("ok") is False or (r.get("error") and not r["error"].startswith(("skipped", "unavailable", "unsupported")))
        if color and bad:
            line = f"\033[31m{line}\033[0m"
        lines.append(line)
    return "\n".join(lines)


def header_lines(meta: dict) -> List[str]:
    commit = meta.get("git_commit", "unknown")
    if meta.get("git_dirty"):
        commit += " (dirty)"
    return [
        f"device: {meta.get('device')}",
        f"date: {meta.get('date')}  commit: {commit}  suite: {meta.get('suite')}",
        f"torch {meta.get('torch_version')}  triton {meta.get('triton_version')}  "
        f"CUDA {meta.get('cuda_version')}  cuDNN {meta.get('cudnn_version')}  "
        f"python {meta.get('python_version')}  rnn_tf32={meta.get('rnn_tf32', meta.get('cudnn_allow_tf32'))}"
        + (f"  cpu kernels: {meta['cpu_kernel_isa']}" if meta.get("cpu_kernel_isa") else ""),
    ]


# ============================================================================================ JSON
def _clean(v):
    """JSON-safe values: non-finite floats become None (their text is kept in the table)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def to_json(meta: dict, rows: List[dict]) -> dict:
    return _clean({**meta, "rows": rows})


def write_json(path, meta: dict, rows: List[dict]) -> None:
    """Atomic write (the CLI rewrites the file after every config, so a killed run leaves data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(to_json(meta, rows), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


# ======================================================================================== markdown
MD_LEGEND = """\
`fwd`: inference forward (eval, no_grad); `fwd+bwd`: forward + gradients of input, h0, c0 and every
parameter; medians in ms.  `x torch`: torch.nn time / this row's time (same process, same inputs;
> 1 is faster).  `max rel err`: largest ||a-b||/||b|| over outputs and gradients against torch.nn in
float64 on the same inputs; `ok`: within the dtype tolerance or 2x torch's own error.  `floor`:
estimated lower bound of the forward on this device (GPU: bytes and FLOP per step over peak rates plus
one grid barrier per step; CPU: FLOP over the GEMM rate torch.mm reaches in the run); `fwd/floor`:
measured / floor."""


def to_markdown(meta: dict, rows: List[dict]) -> str:
    out = [f"### fusedrnn benchmarks: {meta.get('device')}", ""]
    out += [f"- {line}" for line in header_lines(meta)[1:]]
    out.append("")
    columns = _columns(rows)
    headers = [h for h, _, _ in columns]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|")
    for r in rows:
        if r.get("error"):
            err = r["error"].replace("|", "\\|")
            out.append(f"| {r['config']} | {r['backend']} | " + " | ".join(["-"] * (len(headers) - 3))
                       + f" | {err} |")
            continue
        cells = [c.replace("|", "\\|") for c in _cells(r, columns)]
        if r.get("ok") is False:
            cells[headers.index("ok")] = "**NO**"
            cells[headers.index("max rel err")] = f"**{cells[headers.index('max rel err')]}**"
        out.append("| " + " | ".join(cells) + " |")
    out += ["", MD_LEGEND, ""]
    return "\n".join(out)


def ratio_markdown(meta: dict, rows: List[dict]) -> str:
    """Compact table: per config and non-torch backend, torch's and the backend's times and their
    ratio (torch / backend, > 1 is faster) for the forward and forward+backward, and the accuracy.
    The header gives the run's spread: max / min of each row's repeated timings (``--repeat``)."""
    torch_rows = {r["config"]: r for r in rows if r["backend"] == "torch" and not r.get("error")}
    spreads = sorted(
        max(runs) / min(runs)
        for r in rows
        for runs in (r.get("fwd_ms_runs"), r.get("fwdbwd_ms_runs"))
        if runs and len(runs) > 1 and min(runs) > 0
    )
    out = [f"- {line}" for line in header_lines(meta)]
    if spreads:
        mid = spreads[len(spreads) // 2]
        out.append(f"- timing spread (max/min of each row's {len(rows[0].get('fwd_ms_runs') or [])} runs): "
                   f"median {mid:.2f}, worst {spreads[-1]:.2f}")
    # CPU rows carry a compute floor (harness.cpu_floor_estimate): torch's time over it is the most
    # any backend could reach over torch.nn there ("max x")
    ceiling = any(r.get("fwd_ceiling_vs_torch") is not None for r in rows)
    if ceiling:
        rates: Dict[tuple, List[float]] = {}
        for r in rows:
            if r.get("cpu_gemm_gflops") and r["backend"] != "torch":
                rates.setdefault((r.get("threads") or 0, r["dtype"]), []).append(r["cpu_gemm_gflops"])

        def span(v):
            return f"{min(v):.0f}" if round(min(v)) == round(max(v)) else f"{min(v):.0f}-{max(v):.0f}"

        out.append("- floor: FLOP / the GEMM rate of torch.mm measured before each config (GFLOP/s: "
                   + ", ".join(f"{d} {span(v)} on {t} thread{'s' if t != 1 else ''}"
                               for (t, d), v in sorted(rates.items(), key=str))
                   + "); max x = torch time / floor: about the most a backend running at that rate could reach "
                   "over torch.nn (an estimate: a kernel may beat MKL's rate by a few percent)")
    extra_h = " max x fwd | max x fwd+bwd |" if ceiling else ""
    extra_a = "---:|---:|" if ceiling else ""
    out += ["", "| config | backend | threads | torch fwd ms | fwd ms | x fwd | torch fwd+bwd ms | fwd+bwd ms "
            "| x fwd+bwd |" + extra_h + " max rel err | ok |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|" + extra_a + "---:|---|"]

    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        if r["backend"] == "torch":
            continue
        t = torch_rows.get(r["config"], {})
        if r.get("error"):
            out.append(f"| {r['config']} | {r['backend']} |" + " |" * (10 if ceiling else 8) + f" {r['error'][:60]} |")
            continue
        extra = (f" {f(r.get('fwd_ceiling_vs_torch'), '{:.2f}')} | {f(r.get('ceiling_vs_torch'), '{:.2f}')} |"
                 if ceiling else "")
        out.append(
            f"| {r['config']} | {r['backend']} | {f(r.get('threads'), '{}')} | {f(t.get('fwd_ms'), '{:.3f}')} "
            f"| {f(r['fwd_ms'], '{:.3f}')} | **{f(r.get('fwd_ratio_vs_torch'), '{:.2f}')}** "
            f"| {f(t.get('fwdbwd_ms'), '{:.3f}')} | {f(r['fwdbwd_ms'], '{:.3f}')} "
            f"| **{f(r.get('ratio_vs_torch'), '{:.2f}')}** |{extra} {f(r.get('max_rel_err'), '{:.1e}')} "
            f"| {'yes' if r.get('ok') else ('NO' if r.get('ok') is False else '-')} |"
        )
    return "\n".join(out) + "\n"


def write_markdown(path, meta: dict, rows: List[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_markdown(meta, rows))


# =========================================================================================== plots
def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_speedup(path, meta: dict, rows: List[dict], exclude=()) -> Optional[str]:
    """Grouped bars: fwd+bwd speed-up vs torch per config and backend (log scale, 1 = torch);
    a short tick marks the forward-only speed-up; red hatched bars failed the accuracy check.
    Configs named in ``exclude`` (sweep points, plotted by ``plot_sweeps``) are left out."""
    exclude = set(exclude)
    rows = [r for r in rows if r.get("ratio_vs_torch") and r["backend"] != "torch" and r["config"] not in exclude]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    plt = _plt()
    width_in = min(20.0, max(6.0, 1.5 + 0.6 * len(configs) * max(1, len(backends)) ** 0.5))
    fig, ax = plt.subplots(figsize=(width_in, 5.2))
    if not rows:
        ax.text(0.5, 0.5, "no rows with a torch baseline", ha="center", va="center", transform=ax.transAxes)
    else:
        width = 0.8 / len(backends)
        for j, b in enumerate(backends):
            xs, fb, fw, bad = [], [], [], []
            for i, c in enumerate(configs):
                r = next((r for r in rows if r["config"] == c and r["backend"] == b), None)
                if r is None:
                    continue
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                fb.append(r["ratio_vs_torch"])
                fw.append(r.get("fwd_ratio_vs_torch"))
                bad.append(r.get("ok") is False)
            bars = ax.bar(xs, fb, width, label=f"{b} fwd+bwd")
            for bar_, is_bad in zip(bars, bad):
                if is_bad:  # a fast wrong kernel shows red
                    bar_.set_edgecolor("red")
                    bar_.set_linewidth(2.0)
                    bar_.set_hatch("//")
            ax.scatter(xs, [v if v else float("nan") for v in fw], marker="_", s=200, color="k",
                       zorder=3, label="fwd only" if j == 0 else None)
            for x, v in zip(xs, fb):
                ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter  # noqa: PLC0415

        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        lo, hi = ax.get_ylim()
        if hi / lo < 20:  # within about one decade: label the minor ticks too
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        else:
            from matplotlib.ticker import NullFormatter  # noqa: PLC0415

            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=30 if len(configs) <= 12 else 60, ha="right", fontsize=8)
        ax.set_ylabel("speed-up vs torch.nn (torch time / time)")
        ax.legend(fontsize=8)
    ax.set_title(f"{meta.get('device', '')}\n{meta.get('date', '')}  {str(meta.get('git_commit', ''))[:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_sweeps(path, meta: dict, rows: List[dict], configs_by_name: Dict[str, object]) -> List[str]:
    """Per-step forward latency vs H / B / T (one PNG per swept axis), floor drawn dashed.

    Written next to ``path`` as <stem>_vs_<axis>.png; only axes with data."""
    written = []
    path = Path(path)
    for axis in ("H", "B", "T"):
        pts = [r for r in rows if not r.get("error") and r.get("per_step_us")
               and getattr(configs_by_name.get(r["config"]), "sweep", None) == axis]
        if not pts:
            continue
        plt = _plt()
        modes = list(dict.fromkeys(r["mode"] for r in pts))
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            mrows = [r for r in pts if r["mode"] == mode]
            for b in dict.fromkeys(r["backend"] for r in mrows):
                br = sorted((r for r in mrows if r["backend"] == b), key=lambda r: r[axis])
                ax.plot([r[axis] for r in br], [r["per_step_us"] for r in br], "o-", label=b)
            fl = sorted({(r[axis], r["floor_per_step_us"]) for r in mrows if r.get("floor_per_step_us")})
            if fl:
                ax.plot([a for a, _ in fl], [f for _, f in fl], "k--", label="floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel("forward per step (us)")
            fixed = {k: mrows[0][k] for k in ("H", "B", "T", "dtype") if k != axis}
            ax.set_title(f"{mode}  " + " ".join(f"{k}={v}" for k, v in fixed.items()), fontsize=9)
            ax.legend(fontsize=8)
        fig.suptitle(f"{meta.get('device', '')}  {str(meta.get('git_commit', ''))[:10]}", fontsize=9)
        fig.tight_layout()
        out = path.with_name(f"{path.stem}_vs_{axis}{path.suffix or '.png'}")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(str(out))
    return written
