"""Shared pieces of the Triton recurrence kernels (LSTM in ``lstm.py``, GRU in ``gru.py``).

Everything a cell module needs besides its own math lives here, once:

* environment and device: :func:`interpret_mode`, :func:`unavailable_reason`, :func:`device_info`
  (a ``torch.device`` or any object with the attributes of ``torch.cuda.get_device_properties``)
* dtypes: :func:`acc_dtype`, :func:`tl_dtype`, :func:`dot_precision` (TF32 only when
  ``torch.backends.cudnn.rnn.fp32_precision`` is "tf32", the flag that governs nn.LSTM/nn.GRU)
* the plan of a launch (:class:`Variant`), the resource models (:func:`smem_bytes`,
  :func:`regs_per_thread`), the per-step cost model (:func:`step_cost_ns`) and THE selection rule
  (:func:`candidates` / :func:`select_variant`), the size limits (:func:`max_hidden_size`,
  :func:`unsupported_reason`: both from the same candidates, so they cannot disagree)
* the check of the compiled kernel against the device before its first launch
  (:func:`checked_variant`), cached per (kernel, variant, device)
* ``@triton.jit`` helpers: activations, the split-K GEMM over K pieces (:func:`gemm`), gate
  extraction (:func:`split4`), the grid barrier split into :func:`barrier_arrive` /
  :func:`barrier_wait` (and :func:`grid_barrier` = both)
* the launch loop shared by both cells (:func:`launch_recurrence`; forwards through
  :func:`launch_forward`, which sets ``SAVE``: False is the inference kernel), launch bookkeeping
  (:data:`LAUNCHES`, tests prove a kernel ran) and a test hook :func:`force_variant`.

Kernel structure (both cells, forward and backward)
---------------------------------------------------
A program owns ``block_u`` hidden units (all gates of each) of ``block_b`` batch rows.  Its slice
of the recurrent weights is loaded once, before the time loop, and stays in shared memory (the
``tl.dot`` operand) for the whole sequence.  Per step every program needs the whole previous
state of its batch tile (forward: h_{t-1}; backward: the gate gradients of every unit), exchanged
through a double-buffered global buffer (L2, ``.cg`` loads) and a grid barrier.

The recurrent GEMM of a step is ONE ``tl.dot`` chain with ONE split-K reduction:

* forward: ``pre[BB, 4 * BU] = h_{t-1}[BB, K] @ W_slice^T[K, 4 * BU]`` with the columns ordered
  unit-major, gate-minor (column ``u * 4 + g``): the four gates of a unit come out of one reshape +
  two ``tl.split`` (:func:`split4`).  GRU uses the same 4 gate slots (r, z, n and a zero slot: the
  dot needs power-of-two shapes).  K = P (LSTM) or H (GRU).
* backward: ``dh[BB, BU] = dgates[BB, G * H] @ W_hh[G * H, units]`` (K = all gate rows of W_hh).

K is split over the warps (``KS`` chunks, the batch dimension of a 3-D ``tl.dot``: each warp
reduces its own chunk, one reduction over the warps at the end) and each chunk is cut into at most
4 power-of-two pieces (:func:`k_pieces`): K is padded to a multiple of 16 * KS, not to a power of
two (768 = 4 x (128 + 64), no zero MMAs).  Pieces are loaded -> staged -> multiplied one after
the other, so the staging buffer of one piece is reused by the next.

Per step the critical path is: exchange load -> GEMM -> cell math -> exchange store -> barrier
arrive; the stores nobody waits for (y, gates, c_t, dxproj) and the loads of the next step's
inputs are issued after the arrive and before the wait (:func:`barrier_arrive` / `_wait`).

Execution modes
---------------
``single``      one program per batch tile owns every unit (``n_unit_progs == 1``): no grid
                barrier; the forward keeps h in registers (with a projection, and in the
                backward, the exchange goes through the global buffer and a CTA barrier).
``persistent``  units split over ``n_unit_progs`` programs per batch tile; one launch covers the
                whole sequence, programs meet at a grid barrier on atomics.  The launch is
                cooperative (the driver guarantees co-residency or refuses), the spin is bounded
                (a timeout traps on a GPU, sets the error flag under the interpreter).
``stepwise``    same kernel and grid as ``persistent`` but launched once per step and phase (the
                kernel boundary is the barrier).  Used under TRITON_INTERPRET=1, where programs run
                one after another and a multi-program spin barrier would deadlock.

Selection rule (:func:`candidates`, :func:`select_variant`)
-----------------------------------------------------------
Every (block_b, block_u, num_warps, programs per SM) in a small grid of powers of two is a
candidate.  A candidate is kept when it fits the device under the running triton version's
shared-memory model (:func:`smem_bytes`, validated against the compiled kernels by
``tools/triton_aot.py``), a per-thread register budget (:data:`REG_BUDGET`, :func:`regs_per_thread`:
this is what stops block_b / block_u from growing into spills) and co-residency (the grid of
one launch <= SMs x programs per SM).  Batch tiles beyond one co-resident grid run as sequential
launches over batch chunks.  The kept candidates are ranked by the cost model
``launches x step_cost_ns`` (:func:`step_cost_ns`: barrier + exchange + GEMM + cell math, per
SM), which trades wider tiles against more programs against sequential chunks.  Before the
first launch of a variant on a device, :func:`checked_variant` compiles it and checks its real
shared memory, registers x warps x programs per SM and spills against the device, stepping down
the ranked list otherwise.

Limits: the largest H with at least one fitting candidate for forward and backward
(:func:`max_hidden_size`), per dtype / device / proj_size.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import os
import threading
from typing import Callable, Optional, Sequence

import torch

try:  # the package must import without triton
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
    TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
except Exception as _e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"triton does not import ({_e})"
    TRITON_VERSION = (0, 0)

# ------------------------------------------------------------------------------------ constants
MIN_TILE = 16  # tl.dot needs every dimension >= 16
MAX_SPIN = 1 << 22  # bounded spin of the grid barrier (~ seconds): then error flag / trap, no hang
ERR_BARRIER_TIMEOUT = 1
REG_BUDGET = 224  # modelled registers per thread a candidate may need (255 is the hardware cap)
SPILL_BUDGET_BYTES = 64  # compiled local memory per thread tolerated (stack of a call, no loop spills)
SMEM_RESERVED = 1024  # shared memory the driver reserves per CTA (sm_80 / sm_90)
MAX_PIECES = 4  # K pieces per split chunk (each a power of two >= 16)

# Kernel launches per kernel name (incremented by the launchers); tests read it to prove that a
# Triton kernel ran (no silent fallback).
LAUNCHES: collections.Counter = collections.Counter()


def count_launch(name: str, n: int = 1) -> None:
    LAUNCHES[name] += n


# ---------------------------------------------------------------------------------- environment
def interpret_mode() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> Optional[str]:
    """None when triton imports and a CUDA device exists (or the interpreter is on), else why not."""
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    if interpret_mode():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU in the interpreter)"
    return None


def device_unsupported_reason(device_type: str) -> Optional[str]:
    if device_type == "cuda" and not interpret_mode():
        return None
    if device_type == "cpu" and interpret_mode():
        return None
    return (
        f"the triton backend runs on cuda tensors (or cpu tensors with TRITON_INTERPRET=1); "
        f"got device {device_type!r} with TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the selection rule needs to know about a device (bytes, counts)."""

    sms: int
    smem_optin: int  # shared memory one CTA may use (opt-in limit)
    capability: tuple
    smem_per_sm: int = 0  # shared memory of one SM (CTAs on it share it); 0: = smem_optin + reserve
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    name: str = ""
    index: int = -1  # CUDA device index (-1: a description, not a present device)

    @property
    def smem_sm(self) -> int:
        return self.smem_per_sm or (self.smem_optin + SMEM_RESERVED)


# H100 SXM / H200 (sm_90) and A100 (sm_80): the AOT targets, and the interpreter's nominal device
AOT_TARGETS = {
    80: DeviceInfo(108, 163 * 1024, (8, 0), 164 * 1024, 65536, 2048, "A100 (nominal)"),
    90: DeviceInfo(132, 227 * 1024, (9, 0), 228 * 1024, 65536, 2048, "H100 (nominal)"),
}
NOMINAL_SMS = AOT_TARGETS[90].sms


def info_from_properties(p, index: int = -1) -> DeviceInfo:
    """DeviceInfo from ``torch.cuda.get_device_properties(...)`` or any object with its attributes
    (``multi_processor_count``, ``shared_memory_per_block_optin``, ``shared_memory_per_multiprocessor``,
    ``regs_per_multiprocessor``, ``max_threads_per_multi_processor``, ``major``, ``minor``, ``name``)."""
    optin = int(getattr(p, "shared_memory_per_block_optin", 0) or 0)
    cap = (int(p.major), int(p.minor))
    if optin <= 0:  # older torch: fall back to the architecture's documented opt-in limit
        optin = AOT_TARGETS[90 if cap >= (9, 0) else 80].smem_optin
    return DeviceInfo(
        sms=int(p.multi_processor_count),
        smem_optin=optin,
        capability=cap,
        smem_per_sm=int(getattr(p, "shared_memory_per_multiprocessor", 0) or 0),
        regs_per_sm=int(getattr(p, "regs_per_multiprocessor", 0) or 65536),
        max_threads_per_sm=int(getattr(p, "max_threads_per_multi_processor", 0) or 2048),
        name=str(getattr(p, "name", "")),
        index=index,
    )


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    return info_from_properties(torch.cuda.get_device_properties(index), index)


def device_info(device) -> DeviceInfo:
    """Resources of ``device`` (a torch.device / str, a DeviceInfo, or a properties-like object);
    a nominal H100 for CPU tensors (the interpreter) and when no device is present."""
    if isinstance(device, DeviceInfo):
        return device
    if device is not None and hasattr(device, "multi_processor_count"):
        return info_from_properties(device)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available() and not interpret_mode():
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    return AOT_TARGETS[90]


# --------------------------------------------------------------------------------------- dtypes
_ELT = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
SUPPORTED_DTYPES = tuple(_ELT)
TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / cell-state dtype: float64 for float64, else float32 (as reference.py)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def elt_size(dtype: torch.dtype) -> int:
    return _ELT[dtype]


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch floating dtype."""
    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]


def acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: "tf32" for fp32 only when the rnn TF32 flag is set
    (:func:`fusedrnn.backends.rnn_tf32_enabled`, what nn.LSTM follows)."""
    from .. import rnn_tf32_enabled

    if dtype == torch.float32 and not interpret_mode() and rnn_tf32_enabled():
        return "tf32"
    return "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """True when ``tl.dot`` must see fp32 operands: the interpreter's bf16 dot is wrong (triton 3.8
    multiplies the raw bf16 bit patterns), so under TRITON_INTERPRET=1 bf16 tiles are upcast."""
    return dtype == torch.bfloat16 and interpret_mode()


def next_pow2(n: int, minimum: int = 1) -> int:
    p = 1
    while p < n:
        p *= 2
    return max(p, minimum)


def prev_pow2(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------- GEMM geometry
@dataclasses.dataclass(frozen=True)
class Split:
    """Split-K geometry of one recurrent GEMM: ``ks`` chunks (one per warp), each cut into the
    power-of-two pieces ``kc`` (zeros = absent).  K index of element j of piece i in chunk s:
    ``ks * sum(kc[:i]) + s * kc[i] + j`` (piece-major: every piece is one contiguous range)."""

    ks: int = 1
    kc: tuple = (16, 0, 0, 0)

    @property
    def chunk(self) -> int:
        return sum(self.kc)

    @property
    def k_padded(self) -> int:
        return self.ks * self.chunk

    @property
    def kc_max(self) -> int:
        return max(self.kc)

    def consts(self, prefix: str) -> dict:
        d = {f"{prefix}_KS": self.ks}
        d.update({f"{prefix}_KC{i + 1}": c for i, c in enumerate(self.kc)})
        return d


def k_pieces(chunk: int, kc_max: int) -> Optional[tuple]:
    """``chunk`` (multiple of 16) as <= 4 powers of two in [16, kc_max], largest first, with the
    least padding (the last piece rounds up); None if 4 pieces cannot cover it."""
    pieces = []
    rem = chunk
    while rem > 0:
        if len(pieces) == MAX_PIECES:
            return None
        if len(pieces) == MAX_PIECES - 1:
            p = next_pow2(rem, MIN_TILE)
            if p > kc_max:
                return None
        else:
            p = max(MIN_TILE, min(kc_max, prev_pow2(rem)))
        pieces.append(p)
        rem -= p
    return tuple(pieces + [0] * (MAX_PIECES - len(pieces)))


MIN_CHUNK = 64  # K per split chunk below which splitting costs more (a bigger accumulator) than it saves


def split_for(K: int, ks_max: int, kc_max: int) -> Split:
    """Split-K geometry for a GEMM over K with at most ``ks_max`` chunks and pieces <= ``kc_max``:
    as many chunks as keep >= MIN_CHUNK of K each (the split-K accumulator [KS, BB, N] grows with
    KS, the dependent MMA chain of a warp shrinks), pieces grown when 4 cannot cover a chunk."""
    K16 = cdiv(max(K, 1), MIN_TILE) * MIN_TILE
    ks = max(1, prev_pow2(ks_max))
    while ks > 1 and K16 < ks * MIN_CHUNK:
        ks //= 2
    chunk = cdiv(cdiv(K16, ks), MIN_TILE) * MIN_TILE
    cap = max(MIN_TILE, kc_max)
    while True:
        kc = k_pieces(chunk, cap)
        if kc is not None:
            return Split(ks, kc)
        cap *= 2


# ------------------------------------------------------------------------------- cell / kernels
@dataclasses.dataclass(frozen=True)
class CellSpec:
    """What the planner needs to know about a cell: gates per unit (LSTM 4, GRU 3) and the
    projection (LSTM only).  Gate slots of the forward GEMM are always 4 (power of two)."""

    name: str
    gates: int
    slots: int = 4


LSTM_CELL = CellSpec("lstm", 4)
GRU_CELL = CellSpec("gru", 3)


# ------------------------------------------------------------------------------ variant selection
@dataclasses.dataclass(frozen=True)
class Variant:
    """How one recurrence launch is organised (see the module docstring)."""

    mode: str  # "single" | "persistent" | "stepwise"
    backward: bool
    block_b: int  # batch rows per program (pow2 >= 16)
    block_u: int  # hidden units per program, all gates of each (pow2)
    block_p: int  # slice of P per program for the projection phase (pow2 >= 16)
    n_unit_progs: int  # programs sharing one batch tile (barrier participants)
    n_batch_tiles: int  # batch tiles per launch (grid = (n_unit_progs, n_batch_tiles))
    num_warps: int
    split_a: Split  # GEMM of phase A (forward: h @ W_hh^T; backward with projection: dh @ W_hr)
    split_b: Split  # GEMM of phase B (forward: m @ W_hr^T; backward: dgates @ W_hh)
    progs_per_sm: int = 1  # co-resident programs per SM the grid relies on
    h_in_regs: bool = False  # single-program forward without projection: h never leaves registers
    num_stages: int = 1

    @property
    def grid_size(self) -> int:
        return self.n_batch_tiles * self.n_unit_progs

    @property
    def batch_per_launch(self) -> int:
        return self.n_batch_tiles * self.block_b

    def compile_key(self) -> tuple:
        """Fields that change the compiled kernel (not the grid)."""
        return (self.mode == "stepwise", self.backward, self.block_b, self.block_u, self.block_p,
                self.num_warps, self.split_a, self.split_b, self.h_in_regs, self.num_stages)

    def consts(self) -> dict:
        d = dict(BB=self.block_b, BU=self.block_u, BP=self.block_p, H_IN_REGS=self.h_in_regs)
        d.update(self.split_a.consts("A"))
        d.update(self.split_b.consts("B"))
        return d


_FORCED: list = []


@contextlib.contextmanager
def force_variant(mode: Optional[str] = None, block_u: Optional[int] = None, block_b: Optional[int] = None):
    """Test hook: pin the variant mode and/or units / batch rows per program inside the block."""
    _FORCED.append((mode, block_u, block_b))
    try:
        yield
    finally:
        _FORCED.pop()


def _elt_op(dtype: torch.dtype) -> int:
    """Bytes of a ``tl.dot`` operand element as compiled (the interpreter's bf16 upcast aside)."""
    return elt_size(dtype)


def _acc_elt(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def _gemms(cell: CellSpec, backward: bool, H: int, P: int, v_bu: int, v_bp: int):
    """(K, N) of the phase-A and phase-B GEMMs a kernel runs per step (None where absent); N is the
    width of the on-chip W^T slice, K its height."""
    proj = P != H
    if not backward:
        a = (P, cell.slots * v_bu)
        b = (H, v_bp) if proj else None
    else:
        a = (P, v_bu) if proj else None
        b = (cell.gates * H, v_bp if proj else v_bu)
    return a, b


def smem_bytes(cell: CellSpec, v: Variant, H: int, P: int, dtype: torch.dtype,
               version: Optional[tuple] = None) -> int:
    """Modelled shared memory of the kernel for variant ``v`` under triton ``version``.

    Both versions keep every W piece of both GEMMs for the whole sequence and stage one A-operand
    piece (load -> shared -> dot operand) at a time.  Triton 3.6 keeps the split-K reduction
    scratch [KS, BB, N] (accumulation dtype) live beside the staged operand; 3.8 reuses the
    staging space for it.  Small layout-conversion scratch (gate split, reductions of [BB, N]
    tiles) fits in the same space.  ``tools/triton_aot.py`` checks model >= compiled for every
    variant it builds, under the triton it runs with."""
    version = version or TRITON_VERSION
    e = _elt_op(dtype)
    ea = _acc_elt(dtype)
    bb = v.block_b
    w = 0
    stage = 0
    scratch = 0
    for g, sp in zip(_gemms(cell, v.backward, H, P, v.block_u, v.block_p), (v.split_a, v.split_b)):
        if g is None:
            continue
        K, N = g
        w += sp.k_padded * N * e
        stage = max(stage, sp.ks * bb * sp.kc_max * e)
        scratch = max(scratch, sp.ks * bb * N * ea)
    if v.h_in_regs:  # A operand comes from registers through one conversion buffer
        stage = max(stage, bb * v.split_a.k_padded * e)
    conv = bb * max(v.block_u * cell.slots, v.block_p) * ea  # gate split / output conversions
    if version < (3, 7):
        return w + stage + max(scratch, conv)
    return w + max(stage, scratch, conv)


def regs_per_thread(cell: CellSpec, v: Variant, H: int, P: int, dtype: torch.dtype) -> int:
    """Modelled 32-bit registers per thread of the kernel for ``v``.

    Fitted (tools/triton_aot.py reports model beside compiled) to triton 3.6 and 3.8 builds of
    these kernels for sm_90: the exchanged A operand of a step is loaded all at once (its loads
    are independent of each other and hoisted for latency), one W piece is live in dot-operand
    registers, the split-K accumulator [KS, BB, N], and per cell of the own [BB, BU] tile the
    state, the prefetched inputs and the gate values.  What matters is the order it puts the
    candidates in; the compiled kernel is checked before its first launch anyway."""
    threads = 32 * v.num_warps
    e = _elt_op(dtype)
    ea = _acc_elt(dtype)
    # forward / backward fits (coefficients of: whole A operand, one W piece, accumulator, cells);
    # 4- and 8-byte accumulators of FMA-class dots were seen to pack tighter (0.75)
    c_a, c_w, c_acc, c_cell = (0.75, 0.25, 1.0, 16.0) if v.backward else (0.5, 0.25, 1.0, 32.0)
    if _mma_class(dtype, "ieee") in ("fma32", "fma64"):
        c_acc = 0.75
    fma = 1.0
    big = 0.0
    for g, sp in zip(_gemms(cell, v.backward, H, P, v.block_u, v.block_p), (v.split_a, v.split_b)):
        if g is None:
            continue
        K, N = g
        a_all = v.block_b * sp.k_padded * e / 4 / threads
        w_piece = sp.ks * sp.kc_max * N * e / 4 / threads
        acc = sp.ks * v.block_b * N * ea / 4 / threads
        a_piece = sp.ks * v.block_b * sp.kc_max * e / 4 / threads
        term = fma * (c_a * a_all + c_w * w_piece) + c_acc * acc
        if v.backward:  # long K (4H): big pieces add their own staging registers (AOT: GRU H=1584)
            term += 0.25 * a_all + 0.5 * a_piece
        else:  # each K piece past two keeps another staged load in flight (AOT: H=1152 244, 1365 spills)
            term += 40.0 * max(0, sum(1 for c in sp.kc if c) - 2)
        # the projected backward keeps both phases' operands in flight (AOT: fp64 H=200 P=100)
        big = big + term if (v.backward and P != H) else max(big, term)
    cells = v.block_b * max(v.block_u, v.block_p) / threads
    extra = big + c_cell * cells * ea / 4
    if dtype == torch.float64 and v.backward and P != H:  # AOT: fp64 projected backward, 1.4x the fit
        extra *= 1.4
    return int(40.0 + extra + 0.999)


# ---- per-step cost model ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostModel:
    """Constants of the per-step cost model of one architecture.

    The time loop of these kernels is latency bound with little instruction-level overlap: on the
    first H200 run (BENCHMARKS.md Run 1) the four recurrence kernels of the first Triton version
    took 0.86-1.12 ns per warp-instruction of their time loop (SASS loop length x warps, as
    ``tools/triton_aot.py`` reports it).  The model estimates that count for a variant (a
    least-squares fit to triton 3.6 sm_90 builds of these kernels, within ~15 %) and converts it
    with ``ns_per_warp_instr``; a second co-resident program on an SM costs ``extra_program`` of
    its own time (its latencies overlap the first one's); the exchanged operands of all programs
    must also cross L2 (``l2_bytes_per_ns``).  It ranks candidates; BENCHMARKS.md "Triton design
    round 2" lists the predictions the next GPU run checks."""

    ns_per_warp_instr: float
    per_warp: float  # warp-instructions per warp per step: loop, barrier, addresses, loads/stores
    per_mma: float  # per m16n8k16-equivalent MMA (operand fragments, the MMA itself)
    per_partial: float  # per split-K partial element read back in the reduction (per 32 lanes)
    per_cell: float  # per (cell x gate slot) of the pointwise math (per 32 lanes, replicated)
    per_vector: float  # per 16-byte load of the exchanged operand (per 32 lanes)
    extra_program: float
    l2_bytes_per_ns: float
    barrier_ns: float  # per grid barrier (split variants; one per phase with an exchange)


# Run 1: old kernels at 10.6K-24.7K warp-instructions per step took 9.1-27.7 us per step with one
# or two barriers: 0.9 ns per warp-instruction + 1 us per barrier fits them within 20 %.
COST = {
    90: CostModel(0.9, 222.0, 2.12, 8.95, 19.7, 7.85, 0.5, 5500.0, 1000.0),
    80: CostModel(1.26, 222.0, 2.12, 8.95, 19.7, 7.85, 0.5, 4000.0, 1200.0),  # A100 clock 1.41 vs 1.98 GHz
}


def _mma_class(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "tc16"
    if dtype == torch.float32:
        return "tf32" if precision == "tf32" else "fma32"
    return "fma64"


# MMA-instruction equivalents per (16 x 8 x 16) block of a GEMM, by operand class: TF32 mma is
# m16n8k8 (twice the instructions), FMA dots issue one FMA per 32 multiply-adds (64 per block
# and warp-instruction... 2048 MACs / 32 lanes), fp64 FMAs at half rate
_MMA_WEIGHT = {"tc16": 1.0, "tf32": 2.0, "fma32": 64.0, "fma64": 128.0}


def warp_instructions(cell: CellSpec, v: Variant, H: int, P: int, dtype: torch.dtype, precision: str = "ieee") -> float:
    """Estimated warp-instructions one program issues per step (the static count of its loop x warps)."""
    cm = COST[90]
    e = elt_size(dtype)
    w = cm.per_warp * v.num_warps
    for i, (g, sp) in enumerate(zip(_gemms(cell, v.backward, H, P, v.block_u, v.block_p), (v.split_a, v.split_b))):
        if g is None:
            continue
        K, N = g
        blocks = v.block_b / 16 * N / 8 * sp.k_padded / 16
        w += cm.per_mma * blocks * _MMA_WEIGHT[_mma_class(dtype, precision)]
        w += cm.per_partial * sp.ks * v.block_b * N / 32
        if not (v.h_in_regs and i == 0):
            w += cm.per_vector * v.block_b * sp.k_padded * e / 16 / 32
    cells = v.block_b * max(v.block_u, v.block_p)
    rep = max(1.0, 32 * v.num_warps / cells)
    w += cm.per_cell * cells * (cell.gates if v.backward else cell.slots) / 32 * rep
    return w


def step_cost_ns(cell: CellSpec, v: Variant, H: int, P: int, dtype: torch.dtype, info: DeviceInfo,
                 precision: str = "ieee") -> float:
    """Predicted time of one recurrence step of one launch (ns): the estimated warp-instructions of
    one program (:func:`warp_instructions`) at the calibrated rate, the co-resident programs of an
    SM adding ``extra_program`` each, one grid barrier per exchange phase (split variants), bounded
    below by the exchange traffic through L2."""
    cm = COST[90 if info.capability >= (9, 0) else 80]
    t = warp_instructions(cell, v, H, P, dtype, precision) * cm.ns_per_warp_instr
    t *= 1.0 + cm.extra_program * (v.progs_per_sm - 1)
    if v.n_unit_progs > 1:
        t += cm.barrier_ns * (2 if P != H else 1)
    x_bytes = 0.0
    for i, (g, sp) in enumerate(zip(_gemms(cell, v.backward, H, P, v.block_u, v.block_p), (v.split_a, v.split_b))):
        if g is not None and not (v.h_in_regs and i == 0):
            x_bytes += v.block_b * sp.k_padded * elt_size(dtype) * v.grid_size
    return max(t, x_bytes / cm.l2_bytes_per_ns)


# ---- candidates ---------------------------------------------------------------------------------
def _fits(cell: CellSpec, v: Variant, H: int, P: int, dtype: torch.dtype, info: DeviceInfo,
          version: Optional[tuple] = None) -> Optional[str]:
    """None when ``v`` fits ``info`` under the static models, else why not.

    Shared memory is judged by triton 3.6's model under every version: the GPU machines run 3.6,
    and the larger sizes 3.8's leaner model admits spill there (AOT, triton 3.8, sm_90: the GRU
    bf16/fp16 backward at H=1365 compiled to 128 registers with 2808 B of spills in every
    variant), so a limit never depends on the triton version."""
    smem = smem_bytes(cell, v, H, P, dtype, min(version or TRITON_VERSION, (3, 6)))
    if smem > info.smem_optin:
        return f"shared memory {smem} B > {info.smem_optin} B"
    if v.progs_per_sm * (smem + SMEM_RESERVED) > info.smem_sm:
        return f"{v.progs_per_sm} programs x {smem} B shared memory > {info.smem_sm} B per SM"
    regs = regs_per_thread(cell, v, H, P, dtype)
    if regs > REG_BUDGET:
        return f"{regs} registers per thread > budget {REG_BUDGET}"
    if v.num_warps > 4 and 32 * v.num_warps > v.block_b * max(v.block_u, v.block_p):
        return f"{v.num_warps} warps for {v.block_b * max(v.block_u, v.block_p)} cells (cell math replicated per warp)"
    threads = 32 * v.num_warps * v.progs_per_sm
    if threads > info.max_threads_per_sm or regs * threads > info.regs_per_sm:
        return f"{v.progs_per_sm} programs x {v.num_warps} warps x {regs} registers > the SM's {info.regs_per_sm}"
    if v.mode == "persistent" and v.grid_size > info.sms * v.progs_per_sm:
        return f"grid {v.grid_size} > {info.sms} SMs x {v.progs_per_sm}"
    return None


def _kc_max(block_b: int, dtype: torch.dtype, precision: str) -> int:
    """Largest K piece per split chunk: a staged A piece [KS, BB, kc] of <= 2048 elements per warp
    on tensor cores (<= 32 registers per thread); FMA dots (fp32 without TF32, fp64) hold their
    operands per thread, so their pieces stay short."""
    cls = _mma_class(dtype, precision)
    base = {"tc16": 2048, "tf32": 1024, "fma32": 512, "fma64": 256}[cls]
    return max(MIN_TILE, prev_pow2(base // block_b))


def _warp_choices(dtype: torch.dtype, precision: str) -> tuple:
    # FMA dots need more warps (more K splits) to keep their per-thread operands small
    return (4, 8) if _mma_class(dtype, precision) in ("tc16", "tf32") else (4, 8, 16)


def _make(cell: CellSpec, backward: bool, mode: str, H: int, P: int, B: int, dtype: torch.dtype,
          info: DeviceInfo, block_b: int, block_u: int, num_warps: int, pps: int, precision: str = "ieee") -> Variant:
    proj = P != H
    n_u = cdiv(H, block_u)
    h_in_regs = (mode == "single") and not backward and not proj
    block_p = max(MIN_TILE, next_pow2(cdiv(P, n_u)))
    kc = _kc_max(block_b, dtype, precision)
    a, b = _gemms(cell, backward, H, P, block_u, block_p)
    if h_in_regs:  # A operand from registers: one piece over the padded unit tile
        ks = num_warps
        while ks > 1 and block_u // ks < MIN_CHUNK:
            ks //= 2
        split_a = Split(ks, (block_u // ks, 0, 0, 0))
    else:
        split_a = split_for(a[0], num_warps, kc) if a is not None else Split()
    split_b = split_for(b[0], num_warps, kc) if b is not None else Split()
    n_tiles_total = cdiv(max(B, 1), block_b)
    if mode in ("stepwise", "single"):  # no barrier across programs: no co-residency needed
        n_tiles = n_tiles_total
    else:
        n_tiles = max(1, min(n_tiles_total, (info.sms * pps) // n_u))
    return Variant(mode=mode, backward=backward, block_b=block_b, block_u=block_u, block_p=block_p,
                   n_unit_progs=n_u, n_batch_tiles=n_tiles, num_warps=num_warps, split_a=split_a,
                   split_b=split_b, progs_per_sm=pps, h_in_regs=h_in_regs)


BLOCK_B_CHOICES = (16, 32, 64)  # forward; the backward's exchanged operand is 3-4x wider: 16 only
PPS_CHOICES = (1, 2, 3, 4)


def candidates(cell: CellSpec, backward: bool, H: int, P: int, B: int, dtype: torch.dtype,
               info: Optional[DeviceInfo] = None, interpret: Optional[bool] = None,
               precision: str = "ieee", version: Optional[tuple] = None, forced: Optional[tuple] = None) -> list:
    """Every fitting variant for this shape, cheapest first (cost model x launches).

    ``info`` / ``interpret`` / ``version`` override the device, the interpreter check and the
    triton version (AOT compilation, limits for other devices)."""
    info = info or AOT_TARGETS[90]
    interpret = interpret_mode() if interpret is None else interpret
    if forced is None:
        forced = _FORCED[-1] if _FORCED else (None, None, None)
    return list(_candidates(cell, backward, H, P, B, dtype, dataclasses.replace(info, index=-1, name=""),
                            bool(interpret), precision, version or TRITON_VERSION, tuple(forced)))


@functools.lru_cache(maxsize=4096)
def _candidates(cell: CellSpec, backward: bool, H: int, P: int, B: int, dtype: torch.dtype, info: DeviceInfo,
                interpret: bool, precision: str, version: tuple, forced: tuple) -> tuple:
    forced_mode, forced_u, forced_b = forced
    min_u_fwd = max(1, MIN_TILE // cell.slots)  # forward GEMM N = slots * block_u >= 16
    h_pad = next_pow2(H)
    us = []
    u = MIN_TILE if backward else min_u_fwd
    while u <= max(h_pad, MIN_TILE):
        us.append(u)
        u *= 2
    if forced_u is not None:
        us = [max(MIN_TILE if backward else min_u_fwd, next_pow2(forced_u))]
    bbs = (forced_b,) if forced_b else ((MIN_TILE,) if backward else BLOCK_B_CHOICES)
    out = []
    for bu in us:
        n_u = cdiv(H, bu)
        if n_u == 1:
            mode = "single"
        else:
            mode = "stepwise" if interpret else "persistent"
        if forced_mode is not None:
            if forced_mode == "single" and n_u != 1:
                continue
            mode = forced_mode
        if mode == "single" and not backward and P == H and bu < MIN_TILE:
            continue  # h from registers is the dot's K: >= 16 wide
        for bb in bbs:
            if bb > MIN_TILE and cdiv(max(B, 1), bb // 2) <= 1 and forced_b is None:
                continue  # a narrower tile already holds the whole batch
            for nw in _warp_choices(dtype, precision):
                for pps in PPS_CHOICES if mode == "persistent" else (1,):
                    if pps > 1 and n_u * cdiv(max(B, 1), bb) <= info.sms * (pps - 1):
                        continue  # fewer programs per SM already hold the grid
                    v = _make(cell, backward, mode, H, P, B, dtype, info, bb, bu, nw, pps, precision)
                    # a variant pinned by a test under the interpreter runs whatever its resources
                    # (it exercises a code path; a GPU never gets there unless it fits)
                    pinned = interpret and any(f is not None for f in forced)
                    if pinned or _fits(cell, v, H, P, dtype, info, version) is None:
                        if mode == "single":  # one launch; tiles beyond one per SM run in waves
                            launches = cdiv(v.n_batch_tiles, info.sms)
                        else:
                            launches = cdiv(cdiv(max(B, 1), bb), v.n_batch_tiles)
                        cost = launches * step_cost_ns(cell, v, H, P, dtype, info, precision)
                        out.append((cost, len(out), v))
    out.sort(key=lambda c: (c[0], c[1]))
    return tuple(v for _, _, v in out)


def select_variant(gates_per_unit: int, H: int, P: int, B: int, dtype: torch.dtype, device=None,
                   info: Optional[DeviceInfo] = None, interpret: Optional[bool] = None,
                   backward: bool = False, precision: Optional[str] = None) -> Variant:
    """THE variant-selection rule (module docstring): the cheapest fitting candidate.
    Raises ValueError (naming the limit) when nothing fits."""
    cell = LSTM_CELL if gates_per_unit == 4 else GRU_CELL
    info = info or device_info(device)
    if precision is None:
        precision = dot_precision(dtype) if dtype in _ELT else "ieee"
    cands = candidates(cell, backward, H, P, B, dtype, info, interpret, precision)
    if not cands:
        raise ValueError("fusedrnn triton: " + (_limit_message(cell, H, P if P != H else 0, dtype, info)))
    return cands[0]


def supports(gates_per_unit: int, H: int, P: int, dtype: torch.dtype, info: DeviceInfo,
             version: Optional[tuple] = None) -> bool:
    return _supports(gates_per_unit, H, P, dtype, dataclasses.replace(info, index=-1, name=""), version)


@functools.lru_cache(maxsize=1024)
def _supports(gates_per_unit: int, H: int, P: int, dtype: torch.dtype, info: DeviceInfo,
              version: Optional[tuple] = None) -> bool:
    """Whether forward and backward have a fitting variant for hidden size H with h size P
    (under the shared-memory model of triton ``version``, default the running one)."""
    cell = LSTM_CELL if gates_per_unit == 4 else GRU_CELL
    precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)  # the TF32 flag may change
    return all(
        candidates(cell, bwd, H, P, MIN_TILE, dtype, info, interpret=False, precision=prec, version=version,
                   forced=(None, None, None))
        for bwd in (False, True) for prec in precisions
    )


@functools.lru_cache(maxsize=256)
def _max_hidden_size(gates_per_unit: int, dtype: torch.dtype, info: DeviceInfo, proj_size: int,
                     version: Optional[tuple]) -> int:
    def ok(h):
        P = proj_size if proj_size else h
        return (not proj_size or proj_size < h) and supports(gates_per_unit, h, P, dtype, info, version)

    lo, hi = 0, proj_size + 1  # a projection needs hidden_size > proj_size
    while hi <= (1 << 15) and ok(hi):
        lo, hi = hi, hi * 2
    # largest h in [lo, hi) with ok(h); feasibility shrinks as h grows (more bytes per program)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_hidden_size(gates_per_unit: int, dtype: torch.dtype, device=None, proj_size: int = 0,
                    info: Optional[DeviceInfo] = None, version: Optional[tuple] = None) -> int:
    """Largest H the kernels support for ``dtype`` on ``device`` (a torch.device, a DeviceInfo or
    a properties-like object; see :func:`device_info`), with ``proj_size`` if given, under the
    running triton (``version`` overrides: triton 3.6 keeps more shared memory live)."""
    info = info or device_info(device)
    return _max_hidden_size(gates_per_unit, dtype, dataclasses.replace(info, index=-1, name=""), int(proj_size),
                            version)


def _limit_message(cell: CellSpec, hidden_size: int, proj_size: int, dtype: torch.dtype, info: DeviceInfo) -> str:
    limit = max_hidden_size(cell.gates, dtype, info=info)
    where = f"{info.smem_optin // 1024} KiB shared memory per program, {info.sms} SMs"
    if proj_size and hidden_size <= limit:
        plimit = max_hidden_size(cell.gates, dtype, info=info, proj_size=proj_size)
        return (
            f"proj_size={proj_size} with hidden_size={hidden_size} exceeds the on-chip limit for {dtype} "
            f"(largest hidden size with this proj_size: {plimit}; without projection: {limit}; {where})"
        )
    return (
        f"hidden_size={hidden_size} exceeds the largest supported hidden size {limit} for {dtype} "
        f"(the recurrent weights are split over the programs and kept on chip: {where})"
    )


def unsupported_reason(
    gates_per_unit: int, hidden_size: int, proj_size: int, dtype: torch.dtype, device_type: str, device=None
) -> Optional[str]:
    """None when the Triton recurrence kernels run this shape, else the reason naming the limit."""
    r = device_unsupported_reason(device_type)
    if r is not None:
        return r
    if dtype not in _ELT:
        return f"dtype {dtype} is not supported (float16, bfloat16, float32, float64)"
    info = device_info(device)
    P = proj_size or hidden_size
    if supports(gates_per_unit, hidden_size, P, dtype, info):
        return None
    cell = LSTM_CELL if gates_per_unit == 4 else GRU_CELL
    return _limit_message(cell, hidden_size, proj_size, dtype, info)


# ------------------------------------------------------------------ compiled-kernel resource check
_CHECKED: dict = {}
_CHECK_LOCK = threading.Lock()


def compiled_resources(compiled) -> dict:
    """shared (B), registers per thread, spills (B per thread) of a compiled kernel; loads it on the
    current device (which raises OutOfResources when its shared memory exceeds the device's)."""
    if hasattr(compiled, "result"):  # async compile mode
        compiled = compiled.result()
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
    return dict(
        shared=int(compiled.metadata.shared),
        regs=int(getattr(compiled, "n_regs", 0) or 0),
        spill_bytes=4 * int(getattr(compiled, "n_spills", 0) or 0),
        num_warps=int(compiled.metadata.num_warps),
    )


def resources_reason(res: dict, v: Variant, info: DeviceInfo) -> Optional[str]:
    """None when compiled resources ``res`` (see :func:`compiled_resources`) fit ``info`` for ``v``."""
    threads = 32 * res["num_warps"]
    regs_alloc = cdiv(max(res["regs"], 1) * 32, 256) * 256 // 32  # warp register allocation unit
    if res["shared"] > info.smem_optin:
        return f"compiled shared memory {res['shared']} B > {info.smem_optin} B"
    if v.progs_per_sm * (res["shared"] + SMEM_RESERVED) > info.smem_sm:
        return f"{v.progs_per_sm} x {res['shared']} B compiled shared memory > {info.smem_sm} B per SM"
    if v.progs_per_sm * threads * regs_alloc > info.regs_per_sm:
        return f"{v.progs_per_sm} x {threads} threads x {res['regs']} registers > {info.regs_per_sm} per SM"
    if res["spill_bytes"] > SPILL_BUDGET_BYTES:
        return f"{res['spill_bytes']} B of spills per thread > {SPILL_BUDGET_BYTES}"
    return None


class NoCompiledFit(ValueError):
    """No candidate's compiled kernel fits the device (:func:`checked_variant`); nothing ran."""


def checked_variant(cands: Sequence[Variant], compile_fn: Callable[[Variant], list], key: tuple,
                    info: DeviceInfo) -> Variant:
    """The first of ``cands`` (cheapest first) whose compiled kernels fit the device.

    ``compile_fn(v)`` compiles (without launching) every kernel launch variant ``v`` uses and
    returns the compiled kernels.  The decision is cached per (``key``, variant, device), so a
    variant is compiled and checked once per process; under the interpreter nothing is compiled
    and the static models decide."""
    if interpret_mode() or not cands:
        return cands[0]
    reasons = []
    for v in cands:
        ck = (key, v.compile_key(), v.progs_per_sm, info.index)
        with _CHECK_LOCK:
            reason = _CHECKED.get(ck, "unchecked")
        if reason == "unchecked":
            try:
                reason = None
                for compiled in compile_fn(v):
                    reason = resources_reason(compiled_resources(compiled), v, info)
                    if reason is not None:
                        break
            except Exception as e:  # OutOfResources at load, or a compile failure
                if type(e).__name__ != "OutOfResources":
                    raise
                reason = f"{type(e).__name__}: {e}"
            with _CHECK_LOCK:
                _CHECKED[ck] = reason
        if reason is None:
            return v
        reasons.append(f"block_b={v.block_b} block_u={v.block_u} warps={v.num_warps}: {reason}")
    raise NoCompiledFit("fusedrnn triton: no variant fits the device after compilation: " + "; ".join(reasons[:4]))


# ---------------------------------------------------------------------------- AOT compilation
def aot_spec(name: str, fn, ptr_types: dict, constexprs: dict, num_warps: int, num_stages: int = 1) -> dict:
    """One kernel variant for ``tools/triton_aot.py``.

    ``ptr_types``: pointer argument -> triton type ("bf16", "fp32", "i64", ...); ``constexprs``:
    every constexpr argument; every other argument is a runtime ``i32``.  Pointers carry the
    16-byte alignment the JIT specialises on for every torch allocation (``tt.divisibility``)."""
    sig = {}
    attrs = {}
    for i, a in enumerate(fn.arg_names):
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in ptr_types:
            sig[a] = "*" + ptr_types[a]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "i32"
    return dict(name=name, fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs,
                num_warps=num_warps, num_stages=num_stages)


def aot_shapes(cell: CellSpec, dtype: torch.dtype, info: DeviceInfo) -> list:
    """(H, P, B) the AOT check compiles per dtype: an odd small H, the largest single-program H and
    the next one, 768 and 1024 where supported and the limit, at batches 16, 256 and one so large
    that the rule forms its widest chunk (plus 64 at 768: programs side by side); for the LSTM,
    projections (P = H / 2 at 200 and 1024, and the largest H with P = limit / 4)."""
    limit = max_hidden_size(cell.gates, dtype, info=info)
    single_max = 1
    for h in range(1, min(limit, 256) + 1):
        c = candidates(cell, False, h, h, MIN_TILE, dtype, info, interpret=False)
        if c and c[0].mode == "single":
            single_max = h
    hs = sorted({37, single_max, min(single_max + 1, limit), min(768, limit), min(1024, limit), limit})
    out = [(h, h, b) for h in hs for b in (16, 256, 1 << 14)] + [(min(768, limit),) * 2 + (64,)]
    if cell.gates == 4:
        for h in sorted({200, min(1024, limit)}):
            out += [(h, h // 2, b) for b in (16, 256)]
        ph = max_hidden_size(cell.gates, dtype, info=info, proj_size=max(16, limit // 4))
        if ph:
            out += [(ph, max(16, limit // 4), 16)]
    return out


AOT_ALTERNATIVES = 6  # ranked candidates the AOT check may step down through (as the runtime does)


def aot_recurrence_specs(cell: CellSpec, capability: int, build: Callable) -> list:
    """AOT groups of every recurrence variant the rule picks for :func:`aot_shapes` on the
    ``capability`` target (forward and backward, IEEE and TF32 for fp32), plus the stepwise
    variant once per dtype.

    The rule is the ranked candidate list plus the compiled-kernel check before the first launch
    (:func:`checked_variant`), so each group lists the first ``AOT_ALTERNATIVES`` candidates, each
    as the specs of its launch phases; ``tools/triton_aot.py`` compiles them in order and reports
    the first that passes :func:`resources_reason`, which is what a GPU with this triton runs.
    ``build(v, H, P, dtype, precision, phase_a, phase_b, tag, save=...)`` makes one spec (the cell
    module knows its kernel and pointer types); every forward group comes twice, saving the
    tensors backward needs and not (``save=False``, inference: kernel name ``*_fwd_nosave``).
    Specs record the modelled shared memory (:func:`smem_bytes`, this triton version) and
    registers, checked against the compiled kernel."""
    info = AOT_TARGETS[capability]
    groups = []
    for dt in SUPPORTED_DTYPES:
        seen = set()
        stepwise_done = set()
        for precision in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
            for H, P, B in aot_shapes(cell, dt, info):
                for backward in (False, True):
                    cands = candidates(cell, backward, H, P, B, dt, info, interpret=False, precision=precision)
                    if not cands:
                        continue
                    key = (H, P, precision, tuple(v.compile_key() for v in cands[:AOT_ALTERNATIVES]))
                    if key in seen:
                        continue
                    seen.add(key)
                    modes = [None]
                    if backward not in stepwise_done and cands[0].mode == "persistent" and B == MIN_TILE and P == H:
                        modes.append("stepwise")
                        stepwise_done.add(backward)
                    # the forward also without saving (inference): same candidates, its own kernels
                    for mode, save in itertools.product(modes, (True,) if backward else (True, False)):
                        alts = []
                        for v in cands[:AOT_ALTERNATIVES]:
                            if mode is not None:
                                v = dataclasses.replace(v, mode=mode)
                            two = backward or P != H
                            tag = (f"{TL_NAMES[dt]} H={H} P={P} B={B} {v.mode} u={v.block_u} b={v.block_b} "
                                   f"w={v.num_warps} pps={v.progs_per_sm}" + (" tf32" if precision == "tf32" else ""))
                            phase_specs = []
                            for pa, pb in phases(v, two):
                                ph = "" if v.mode != "stepwise" else (" A" if not pb else " B")
                                spec = build(v, H, P, dt, precision, pa, pb, tag + ph, save=save)
                                spec.update(model_shared=smem_bytes(cell, v, H, P, dt),
                                            model_regs=regs_per_thread(cell, v, H, P, dt),
                                            variant=v, info=info)
                                phase_specs.append(spec)
                            alts.append(phase_specs)
                        groups.append(dict(name=alts[0][0]["name"], alternatives=alts))
    return groups


# ------------------------------------------------------------------------------------ launching
def launch_options(variant: Variant) -> dict:
    """Triton launch options of a recurrence launch.  A persistent grid (programs spinning on a
    grid barrier) is launched cooperatively: the driver then guarantees that every program is
    co-resident, or refuses the launch with an error, instead of a barrier that waits on programs
    which never get an SM (another stream or NCCL holding SMs, MPS limits)."""
    if variant.mode == "persistent" and variant.n_unit_progs > 1 and not interpret_mode():
        return {"launch_cooperative_grid": True}
    return {}


def new_sync_buffers(n_batch_tiles: int, device):
    """(barrier counters (n_batch_tiles,), error flag (1,)) int32 zeros for one launch."""
    return (
        torch.zeros(max(1, n_batch_tiles), dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
    )


def check_error_flag(err: torch.Tensor, what: str) -> None:
    """Raise RuntimeError when a kernel set the error flag (grid barrier timed out).

    Reads the flag only where that costs no device sync (CPU tensors: the interpreter).  On a GPU
    a timed-out barrier traps instead (:func:`grid_barrier`), so the launch itself fails loudly;
    reading the flag there would sync the host every call and break CUDA-graph capture."""
    if err.device.type != "cpu":
        return
    code = int(err.item())
    if code == ERR_BARRIER_TIMEOUT:
        raise RuntimeError(
            f"fusedrnn triton {what}: grid barrier timed out after {MAX_SPIN} spins (programs were not "
            "co-resident: another kernel occupies SMs, or MPS/MIG limits the SM count); results are invalid"
        )
    if code != 0:
        raise RuntimeError(f"fusedrnn triton {what}: kernel reported error code {code}")


def phases(variant: Variant, two_phase: bool) -> list:
    """(PHASE_A, PHASE_B) per launch of one step: stepwise splits a two-phase step over launches."""
    if variant.mode == "stepwise" and two_phase:
        return [(True, False), (False, True)]
    return [(True, two_phase)]


def max_spins() -> int:
    # the interpreter polls slowly and runs programs one after another: fail fast there
    return 64 if interpret_mode() else MAX_SPIN


def launch_recurrence(kernel, name: str, cell: CellSpec, backward: bool, H: int, P: int, B: int, T: int,
                      dtype: torch.dtype, args: tuple, consts: dict, device) -> Variant:
    """Select (and on a GPU check) the variant, then launch ``kernel`` over the whole sequence.

    Every recurrence kernel takes ``(*args, sync, err, T, B, tile0, s_begin, s_end, N_U, **consts,
    **variant.consts(), PHASE_A, PHASE_B, SYNC, MAX_SPINS)``; batch tiles beyond one co-resident
    grid run as further launches over batch chunks (batch rows never interact)."""
    if B * cell.slots * H >= 2**31:
        raise ValueError(f"fusedrnn triton: batch * 4 * hidden_size = {B * cell.slots * H} must be < 2**31 "
                         "(per-step offsets are int32; the time offset is int64)")
    info = device_info(device)
    precision = consts.get("DOT_PRECISION", "ieee")
    cands = candidates(cell, backward, H, P, B, dtype, info, precision=precision)
    if not cands:
        raise ValueError("fusedrnn triton: " + _limit_message(cell, H, P if P != H else 0, dtype, info))
    two_phase = backward or P != H

    def launch_kwargs(v, pa, pb):
        return dict(consts, **v.consts(), PHASE_A=pa, PHASE_B=pb, SYNC=v.mode != "stepwise",
                    MAX_SPINS=max_spins(), num_warps=v.num_warps, num_stages=v.num_stages, **launch_options(v))

    def compile_fn(v):
        sync, err = new_sync_buffers(1, device)
        return [kernel.warmup(*args, sync, err, 1, B, 0, 0, 1, v.n_unit_progs, grid=(1,), **launch_kwargs(v, pa, pb))
                for pa, pb in phases(v, two_phase)]

    key = (name, H, P, dtype, tuple(sorted((k, str(x)) for k, x in consts.items())))
    v = checked_variant(cands, compile_fn, key, info)
    if T == 0 or B == 0:
        return v
    steps = [(s, s + 1) for s in range(T)] if v.mode == "stepwise" else [(0, T)]
    n_tiles_total = cdiv(B, v.block_b)
    for t0 in range(0, n_tiles_total, v.n_batch_tiles):
        nt = min(v.n_batch_tiles, n_tiles_total - t0)
        grid = (v.n_unit_progs, nt)
        sync, err = new_sync_buffers(n_tiles_total, device)
        for s0, s1 in steps:
            for pa, pb in phases(v, two_phase):
                kernel[grid](*args, sync, err, T, B, t0, s0, s1, v.n_unit_progs, **launch_kwargs(v, pa, pb))
                count_launch(name)
        if v.mode == "persistent" and v.n_unit_progs > 1:
            check_error_flag(err, name)
    return v


def launch_forward(kernel, name: str, cell: CellSpec, H: int, P: int, B: int, T: int, dtype: torch.dtype,
                   make_args: Callable[[bool], tuple], consts: dict, device, save: bool) -> Variant:
    """:func:`launch_recurrence` of a forward kernel with its ``SAVE`` constexpr (False: the
    inference kernel, no stores of what only the backward reads).  ``make_args(save)`` gives the
    kernel's arguments, allocating the saved-tensor buffers only when ``save`` is True.

    The inference kernel is the training kernel minus some stores, yet ptxas may allocate it
    differently: at the edge of the register file it can spill a little more (AOT, triton 3.8,
    sm_90: GRU bf16 H=1365, 72 B of stack against the training kernel's 64 B and the 64 B budget).
    Then the training kernel runs instead, into scratch buffers (same y / final states; the
    memory saving is lost for that shape, said once in a warning): inference is never less
    available than training."""
    try:
        return launch_recurrence(kernel, name, cell, False, H, P, B, T, dtype, make_args(save),
                                 dict(consts, SAVE=save), device)
    except NoCompiledFit as e:
        if save:
            raise
        from .. import _warn_once

        _warn_once(("triton-nosave", name, H, P, dtype),
                   f"fusedrnn triton {name}: the inference kernel (save=False) does not fit the device after "
                   f"compilation ({e}); running the training kernel into scratch buffers instead")
    return launch_recurrence(kernel, name, cell, False, H, P, B, T, dtype, make_args(True),
                             dict(consts, SAVE=True), device)


# --------------------------------------------------------------------------------- jit helpers
if triton is not None:
    # On a GPU a timed-out grid barrier traps (see barrier_wait); under the interpreter it only
    # sets the error flag, which the launcher reads (a CPU tensor: no device sync involved).
    TRAP_ON_TIMEOUT = tl.constexpr(not interpret_mode())

    @triton.jit
    def sigmoid(x):
        """1 / (1 + exp(-x)) in x's dtype (fp32 or fp64)."""
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def tanh(x):
        """tanh with full relative precision: sign(x) * (1 - e) / (1 + e), e = exp(-2|x|)."""
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def mma(a, b, acc, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b with ``ACC`` accumulation (``acc`` may be None).  ``UPCAST``: see dot_upcast."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=ACC)
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    @triton.jit
    def load_w_piece(w_ptr, col_off, col_ok, K_STRIDE: tl.constexpr, K: tl.constexpr,
                     KS: tl.constexpr, KC: tl.constexpr, OFF: tl.constexpr):
        """Piece [KS, KC, N] of the B operand ``W^T``: element [s, j, n] = w[col_off[n] + k * K_STRIDE]
        with k = KS * OFF + s * KC + j (zero where k >= K or the column is masked)."""
        k = KS * OFF + tl.arange(0, KS)[:, None, None] * KC + tl.arange(0, KC)[None, :, None]  # [KS, KC, 1]
        return tl.load(w_ptr + col_off[None, None, :] + k.to(tl.int64) * K_STRIDE,
                       mask=(k < K) & col_ok[None, None, :], other=0.0)

    @triton.jit
    def load_w(w_ptr, col_off, col_ok, K_STRIDE: tl.constexpr, K: tl.constexpr, KS: tl.constexpr,
               KC1: tl.constexpr, KC2: tl.constexpr, KC3: tl.constexpr, KC4: tl.constexpr):
        """All pieces of an on-chip W^T slice (:func:`load_w_piece`); absent pieces repeat the first."""
        w1 = load_w_piece(w_ptr, col_off, col_ok, K_STRIDE, K, KS, KC1, 0)
        w2 = w1
        w3 = w1
        w4 = w1
        if KC2 > 0:
            w2 = load_w_piece(w_ptr, col_off, col_ok, K_STRIDE, K, KS, KC2, KC1)
        if KC3 > 0:
            w3 = load_w_piece(w_ptr, col_off, col_ok, K_STRIDE, K, KS, KC3, KC1 + KC2)
        if KC4 > 0:
            w4 = load_w_piece(w_ptr, col_off, col_ok, K_STRIDE, K, KS, KC4, KC1 + KC2 + KC3)
        return w1, w2, w3, w4

    @triton.jit
    def _a_piece(a_ptr, row_off, row_ok, a2_ptr, K: tl.constexpr, KS: tl.constexpr, KC: tl.constexpr,
                 OFF: tl.constexpr, ADD2: tl.constexpr, OP: tl.constexpr, ACC: tl.constexpr):
        """Piece [KS, BB, KC] of the A operand from global rows (``.cg``: exchanged data lives in
        L2, never a stale L1 line); ``ADD2``: plus the same piece of ``a2_ptr`` (summed in ACC)."""
        k = KS * OFF + tl.arange(0, KS)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]  # [KS, 1, KC]
        off = row_off[None, :, None] + k
        msk = row_ok[None, :, None] & (k < K)
        a = tl.load(a_ptr + off, mask=msk, other=0.0, cache_modifier=".cg")
        if ADD2:
            a = a.to(ACC) + tl.load(a2_ptr + off, mask=msk, other=0.0).to(ACC)
        return a.to(OP)

    @triton.jit
    def gemm(a_ptr, row_off, row_ok, a2_ptr, w1, w2, w3, w4, K: tl.constexpr, KS: tl.constexpr,
             KC1: tl.constexpr, KC2: tl.constexpr, KC3: tl.constexpr, KC4: tl.constexpr,
             ADD2: tl.constexpr, OP: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
        """[BB, N] = A[BB, K] @ W^T[K, N] with A read from global rows ``a_ptr + row_off`` (int32
        row offsets, ``row_ok`` mask) and W^T given as its on-chip pieces ``w1..w4`` (see
        ``Split``).  One split-K accumulator [KS, BB, N] for all pieces, one reduction at the end."""
        acc = mma(_a_piece(a_ptr, row_off, row_ok, a2_ptr, K, KS, KC1, 0, ADD2, OP, ACC), w1, None, ACC, PRECISION, UPCAST)
        if KC2 > 0:
            acc = mma(_a_piece(a_ptr, row_off, row_ok, a2_ptr, K, KS, KC2, KC1, ADD2, OP, ACC), w2, acc, ACC, PRECISION, UPCAST)
        if KC3 > 0:
            acc = mma(_a_piece(a_ptr, row_off, row_ok, a2_ptr, K, KS, KC3, KC1 + KC2, ADD2, OP, ACC), w3, acc, ACC,
                      PRECISION, UPCAST)
        if KC4 > 0:
            acc = mma(_a_piece(a_ptr, row_off, row_ok, a2_ptr, K, KS, KC4, KC1 + KC2 + KC3, ADD2, OP, ACC), w4, acc, ACC,
                      PRECISION, UPCAST)
        return tl.sum(acc, axis=0)

    @triton.jit
    def gemm_regs(a, w1, BB: tl.constexpr, KS: tl.constexpr, KC: tl.constexpr, ACC: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """[BB, N] = a[BB, KS * KC] (registers) @ W^T piece w1 [KS, KC, N]: split-K over KS."""
        a3 = tl.permute(tl.reshape(a, [BB, KS, KC]), (1, 0, 2))
        return tl.sum(mma(a3, w1, None, ACC, PRECISION, UPCAST), axis=0)

    @triton.jit
    def split4(x, BB: tl.constexpr, BU: tl.constexpr):
        """[BB, 4 * BU] with columns u * 4 + g -> the four [BB, BU] gate tiles g = 0, 1, 2, 3."""
        x = tl.reshape(x, [BB, BU, 2, 2])
        even, odd = tl.split(x)  # g = 0 | 2 and g = 1 | 3 (last dim: g // 2)
        g0, g2 = tl.split(even)
        g1, g3 = tl.split(odd)
        return g0, g1, g2, g3

    @triton.jit
    def spread(x):
        """x [BB, BN] unchanged in value, laid out over all threads of the program.

        The split-K reduction leaves its result replicated in every warp; cell math done in that
        layout runs once per warp (8x the instructions at 8 warps, plus a layout conversion of
        every other operand, every step).  An identity ``tl.gather`` along the columns takes its
        output layout from the index tensor, a plain blocked layout: one conversion per step
        (tools/triton_aot.py: LSTM backward H=768 bf16 loop 856 -> 520 SASS instructions/warp)."""
        BB: tl.constexpr = x.shape[0]
        BN: tl.constexpr = x.shape[1]
        idx = tl.zeros([BB, BN], dtype=tl.int32) + tl.arange(0, BN)[None, :]
        return tl.gather(x, idx, 1)

    @triton.jit
    def barrier_arrive(sync_ptr, N_PROGS):
        """First half of the grid barrier among the ``N_PROGS`` programs sharing ``sync_ptr``.

        A CTA barrier (every warp's stores so far are issued), then one acq_rel add on the counter:
        the release publishes this program's stores (bar.sync makes them cumulative), the returned
        count lets the last arriver skip polling.  Stores issued after the arrive are not waited
        for by it (the non-critical outputs of a step).  Returns the count after this arrive."""
        tl.debug_barrier()
        cur = N_PROGS * 0
        if N_PROGS > 1:
            cur = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") + 1
        return cur

    @triton.jit
    def barrier_wait(sync_ptr, cur, target, err_ptr, N_PROGS, MAX_SPINS: tl.constexpr):
        """Second half: spin until the counter reaches ``target = (k + 1) * N_PROGS`` for the k-th
        barrier (0-based; the caller tracks k, the counter is never reset).

        Every value the loop tests comes from a scalar atomic, which Triton runs on one thread and
        broadcasts through shared memory: all warps leave the loop in the same iteration (a
        per-thread load could let warps leave at different iterations and mismatch the CTA
        barriers: a hang).  Polls are acquire loads (see the others' stores).  Bounded: after
        ``MAX_SPINS`` polls, or when another program already reported a timeout, it sets
        ``*err_ptr = 1`` and traps on a GPU (the launch fails at the next sync, also inside a CUDA
        graph) or returns under the interpreter (the launcher raises).  Loads of exchanged data
        after the barrier use ``.cg`` (L2, not a stale L1 line)."""
        if N_PROGS > 1:
            spins = 0
            failed = 0  # polled every 1024 spins, not per barrier (an extra L2 round trip per step)
            while (cur < target) & (spins < MAX_SPINS) & (failed == 0):
                cur = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
                spins += 1
                if spins % 1024 == 0:
                    failed = tl.atomic_add(err_ptr, 0, sem="relaxed", scope="gpu")
            if cur < target:
                tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
                if TRAP_ON_TIMEOUT:
                    # Persistent launches are cooperative, so only a bug can get here.
                    tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()

    @triton.jit
    def grid_barrier(sync_ptr, target, err_ptr, N_PROGS, MAX_SPINS: tl.constexpr):
        """:func:`barrier_arrive` then :func:`barrier_wait` (nothing in between).  With
        ``N_PROGS == 1`` it is only a CTA barrier."""
        cur = barrier_arrive(sync_ptr, N_PROGS)
        barrier_wait(sync_ptr, cur, target, err_ptr, N_PROGS, MAX_SPINS)
