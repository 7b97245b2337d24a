"""Shared pieces of the Triton recurrence kernels (LSTM in ``lstm.py``, GRU in ``gru.py``).

Everything a cell module needs besides its own math lives here, once:

* environment: :func:`interpret_mode`, :func:`unavailable_reason`, :func:`device_info`
* dtypes: :func:`acc_dtype`, :func:`tl_dtype`, :func:`dot_precision` (TF32 only when
  ``torch.backends.cudnn.rnn.fp32_precision`` is "tf32", the flag that governs nn.LSTM/nn.GRU)
* the variant-selection rule :func:`select_variant` and the size limit :func:`max_hidden_size` /
  :func:`unsupported_reason` (both derive from the same budget, so they cannot disagree)
* ``@triton.jit`` helpers: :func:`sigmoid`, :func:`tanh`, :func:`grid_barrier`
* launch bookkeeping: :data:`LAUNCHES` (tests prove a kernel ran) and :func:`check_error_flag`
* a test hook :func:`force_variant` to pin the variant (single / stepwise / persistent, units per
  program) so the split logic is exercised at tiny sizes under the interpreter.

Execution variants (one rule for LSTM and GRU, ``gates_per_unit`` = 4 / 3)
-------------------------------------------------------------------------
A program owns ``block_u`` hidden units (all gates of each unit together) of ``block_b`` batch
rows and keeps the matching rows of W_hh on chip, loaded once before the time loop.

``single``      one program per batch tile owns every unit (``n_unit_progs == 1``): the whole
                sequence in one launch, no grid barrier (h_{t-1} goes through a per-program
                global ping-pong buffer with a CTA barrier, L1/L2 resident).
``persistent``  units split over ``n_unit_progs`` programs per batch tile; one launch covers the
                whole sequence, programs exchange h every step through global memory (L2) and a
                grid barrier on atomics (:func:`grid_barrier`).  The grid never exceeds the
                co-resident limit (1 program per SM), so the barrier cannot deadlock; a bounded
                spin turns a would-be hang into an error flag -> RuntimeError in the launcher.
``stepwise``    same kernel and grid as ``persistent`` but launched once per step (the kernel
                boundary is the barrier).  Used under TRITON_INTERPRET=1, where programs run one
                after another and a multi-program spin barrier would deadlock; also a safe
                fallback.  Tests use it to check the hidden-slice logic with > 1 program.

Selection rule (:func:`select_variant`)
---------------------------------------
1. ``block_k = pow2(P)`` (K of the recurrent GEMM), ``block_h = pow2(H)``, ``block_b = 16`` (the
   smallest ``tl.dot`` tile).  All tiles are powers of 2 >= 16, masked to H / P / B.
2. ``single`` when one program can own every unit: W_hh slice ``gates * pow2(H) * pow2(P) * elt
   <= SINGLE_BUDGET`` (64 KiB, beyond that the single program spills) and its shared memory fits.
3. Else split: ``block_u`` = smallest power of two >= 16 with ``cdiv(H, block_u) <= SMs``,
   doubled while the grid for all batch tiles exceeds the SMs and a bigger slice still fits.
   ``persistent`` on a GPU, ``stepwise`` under the interpreter.  ``block_b`` doubles (to 64, for
   16-bit dtypes only: fp32-IEEE / fp64 GEMMs run on FMA units and spill with bigger tiles) while
   the grid is too big and shared memory allows; rows beyond one co-resident grid run as
   further launches over batch chunks (batch rows never interact).
4. ``num_warps`` keeps the weight slice at ~64 registers per thread (4..16); GEMMs with long K
   run split-K over warps (``ksplit``: a batched ``tl.dot`` + sum) so no thread holds all of K.
5. Nothing fits -> unsupported (:func:`supports`, the limit below).

Limits (:func:`supports`): a program's recurrent weights (forward: W_hh slice
[gates * block_u, pow2(P)], backward: W_hh^T slice [gates * pow2(H), block_p], plus the W_hr
slices when projecting) must fit ``ONCHIP_WEIGHT_BUDGET`` = 128 KiB and the modelled shared
memory (:func:`onchip_bytes`: weights + one staged GEMM operand) must fit the device (sm_80:
163 KiB, sm_90: 227 KiB); the grid (1 program per SM) must fit the SMs.

    dtype          elt  largest H (no projection)   units/program   programs at the limit
    bf16 / fp16    2 B  1024                         16              64
    fp32           4 B   512                         16              32
    fp64           8 B   256                         16              16
    (same on A100 / sm_80 and H100 / sm_90: the 128 KiB weight budget binds first; with a
    projection the W_hr slice counts too, e.g. bf16 H=512 P=256 runs, H=1024 P=512 does not.)

At the bf16 limit: 4 gates * 16 units * 1024 * 2 B = 128 KiB of W_hh per program in shared memory
(Triton stages ``tl.dot`` operands there) + a 32 KiB staged h tile = 160 KiB, checked per variant
by ``tools/triton_aot.py`` (registers, spills, shared memory for sm_80 and sm_90).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
from typing import Optional

import torch

try:  # the package must import without triton
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as _e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"triton does not import ({_e})"

# ------------------------------------------------------------------------------------ constants
ONCHIP_WEIGHT_BUDGET = 128 * 1024  # bytes of recurrent weights one program keeps on chip
MIN_TILE = 16  # tl.dot needs every dimension >= 16
MAX_BLOCK_B = 64
MAX_SPIN = 1 << 22  # bounded spin of the grid barrier (~ seconds): then error flag, no hang
NOMINAL_SMS = 132  # H100 SXM: used for limits/selection when no CUDA device is present
ERR_BARRIER_TIMEOUT = 1

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
    sms: int  # co-resident programs at 1 program per SM
    smem_bytes: int  # opt-in shared memory per block
    capability: tuple


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or 0
    return DeviceInfo(p.multi_processor_count, int(smem), (p.major, p.minor))


def device_info(device) -> DeviceInfo:
    """SM count etc. of ``device``; a nominal H100 for the interpreter / no device."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available() and not interpret_mode():
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    return DeviceInfo(NOMINAL_SMS, 227 * 1024, (9, 0))


# --------------------------------------------------------------------------------------- dtypes
_ELT = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
SUPPORTED_DTYPES = tuple(_ELT)


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


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------ variant selection
@dataclasses.dataclass(frozen=True)
class Variant:
    """How one recurrence launch is organised (see the module docstring)."""

    mode: str  # "single" | "persistent" | "stepwise"
    block_b: int  # batch rows per program (pow2 >= 16)
    block_u: int  # hidden units per program, all gates of each (pow2 >= 16)
    block_k: int  # pow2(P): K of the forward recurrent GEMM
    block_h: int  # pow2(H)
    block_p: int  # slice of P per program for the second phase (projection fwd / dh in bwd)
    n_unit_progs: int  # programs sharing one batch tile (barrier participants)
    n_batch_tiles: int  # batch tiles per launch (grid = (n_batch_tiles, n_unit_progs))
    num_warps: int
    num_stages: int = 1
    ksplit_k: int = 1  # K chunks of the GEMMs over P (batched tl.dot, one chunk per warp)
    ksplit_h: int = 1  # K chunks of the GEMMs over H (projection fwd, dh in bwd)

    @property
    def grid_size(self) -> int:
        return self.n_batch_tiles * self.n_unit_progs

    @property
    def batch_per_launch(self) -> int:
        return self.n_batch_tiles * self.block_b


_FORCED: list = []


@contextlib.contextmanager
def force_variant(mode: Optional[str] = None, block_u: Optional[int] = None, block_b: Optional[int] = None):
    """Test hook: pin the variant mode and/or units per program (pow2 >= 16) inside the block."""
    _FORCED.append((mode, block_u, block_b))
    try:
        yield
    finally:
        _FORCED.pop()


def weight_bytes_per_program(gates_per_unit: int, block_u: int, block_k: int, elt: int) -> int:
    """Bytes of the W_hh slice [gates * block_u, block_k] one program keeps on chip."""
    return gates_per_unit * block_u * block_k * elt


def _num_warps(nbytes: int) -> int:
    # keep the weight slice at <= ~64 32-bit registers per thread
    return min(16, max(4, next_pow2(cdiv(nbytes, 64 * 4 * 32))))


def onchip_bytes(
    gates_per_unit: int, block_b: int, block_u: int, block_k: int, block_h: int, block_p: int, elt: int, proj: bool
) -> int:
    """Shared memory one program needs (model of what Triton allocates, checked by triton_aot).

    Forward: W_hh slice [gates * block_u, block_k] (+ W_hr slice [block_p, block_h]) + the staged
    GEMM operand h_{t-1} [block_b, max K].  Backward: W_hh^T slice [gates * block_h, block_p]
    (+ W_hr slice [block_k, block_u]) + one staged dgates operand [block_b, block_h] (+ the fp32
    dh_tot [block_b, block_k] when projecting).  Forward and backward are separate kernels: max.
    """
    stage = block_b * max(block_k, block_h) * elt
    fwd = gates_per_unit * block_u * block_k * elt + (block_h * block_p * elt if proj else 0) + stage
    bwd = gates_per_unit * block_h * block_p * elt + stage
    if proj:
        bwd += block_k * block_u * elt + block_b * block_k * 4
    return max(fwd, bwd)


def _weights(gates_per_unit, block_u, block_k, block_h, block_p, elt, proj) -> int:
    """Largest recurrent-weight slice one program holds (forward or backward kernel)."""
    fwd = gates_per_unit * block_u * block_k * elt + (block_h * block_p * elt if proj else 0)
    bwd = gates_per_unit * block_h * block_p * elt + (block_k * block_u * elt if proj else 0)
    return max(fwd, bwd)


def _split_fits(gates_per_unit: int, H: int, P: int, elt: int, info: DeviceInfo, block_u: int, block_b: int) -> bool:
    n_u = cdiv(H, block_u)
    if n_u > info.sms:
        return False
    bk, bh = next_pow2(P, MIN_TILE), next_pow2(H, MIN_TILE)
    bp = next_pow2(cdiv(P, n_u), MIN_TILE)
    proj = P != H
    return (
        _weights(gates_per_unit, block_u, bk, bh, bp, elt, proj) <= ONCHIP_WEIGHT_BUDGET
        and onchip_bytes(gates_per_unit, block_b, block_u, bk, bh, bp, elt, proj) <= info.smem_bytes
    )


def _min_block_u(H: int, sms: int) -> int:
    """Smallest units-per-program (pow2 >= 16) whose grid for one batch tile fits the SMs."""
    bu = MIN_TILE
    while cdiv(H, bu) > sms:
        bu *= 2
    return bu


def supports(gates_per_unit: int, H: int, P: int, dtype: torch.dtype, info: DeviceInfo) -> bool:
    """Whether some variant runs hidden size H with h size P (P == H: no projection)."""
    return _split_fits(gates_per_unit, H, P, elt_size(dtype), info, _min_block_u(H, info.sms), MIN_TILE)


def max_hidden_size(gates_per_unit: int, dtype: torch.dtype, device=None, proj_size: int = 0,
                    info: Optional[DeviceInfo] = None) -> int:
    """Largest H the kernels support for ``dtype`` on ``device`` (with ``proj_size``, if any)."""
    info = info or device_info(device)
    best, h = 0, 1
    while h <= 1 << 15:  # costs change at powers of 2: test each power, then the SM bound
        P = proj_size if proj_size else h
        if not supports(gates_per_unit, h, P, dtype, info):
            break
        best = h
        h *= 2
    return best


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
    limit = max_hidden_size(gates_per_unit, dtype, device, info=info)
    if proj_size and hidden_size <= limit:
        plimit = max((p for p in range(1, hidden_size) if supports(gates_per_unit, hidden_size, p, dtype, info)), default=0)
        return (
            f"proj_size={proj_size} with hidden_size={hidden_size} exceeds the on-chip limit for {dtype} "
            f"(largest supported proj_size for this hidden_size: {plimit}; largest hidden size {limit})"
        )
    return (
        f"hidden_size={hidden_size} exceeds the largest supported hidden size {limit} for {dtype} "
        f"(W_hh slice per program must fit {ONCHIP_WEIGHT_BUDGET // 1024} KiB on chip, "
        f"{info.smem_bytes // 1024} KiB shared memory)"
    )


SINGLE_BUDGET = 64 * 1024  # one program owning every unit: above this, split (spills otherwise)


def select_variant(
    gates_per_unit: int, H: int, P: int, B: int, dtype: torch.dtype, device=None,
    info: Optional[DeviceInfo] = None, interpret: Optional[bool] = None,
) -> Variant:
    """THE variant-selection rule (module docstring).  Raises ValueError above the limit.

    ``info`` / ``interpret`` override the device and the interpreter check (AOT compilation).
    """
    elt = elt_size(dtype)
    info = info or device_info(device)
    interpret = interpret_mode() if interpret is None else interpret
    proj = P != H
    block_k = next_pow2(P, MIN_TILE)
    block_h = next_pow2(H, MIN_TILE)
    forced_mode, forced_u, forced_b = _FORCED[-1] if _FORCED else (None, None, None)
    if not supports(gates_per_unit, H, P, dtype, info):
        raise ValueError(
            "fusedrnn triton: " + (unsupported_reason(gates_per_unit, H, P if proj else 0, dtype, "cuda" if not interpret_mode() else "cpu", device)
                                   or f"hidden size {H} / proj {P} not supported")
        )
    block_b = forced_b or MIN_TILE

    def fits(bu, bb):
        return _split_fits(gates_per_unit, H, P, elt, info, bu, bb)

    single_p = block_k  # one program: its P slice is all of P
    single_ok = (
        _weights(gates_per_unit, block_h, block_k, block_h, single_p, elt, proj) <= SINGLE_BUDGET
        and onchip_bytes(gates_per_unit, block_b, block_h, block_k, block_h, single_p, elt, proj) <= info.smem_bytes
    )
    if forced_u is not None:
        block_u = max(MIN_TILE, next_pow2(forced_u))
    elif single_ok:
        block_u = block_h
    else:
        # smallest slice (W_hh spread over the most SMs) whose grid fits; grow while the grid
        # for all batch tiles would not be co-resident and a bigger slice still fits on chip
        block_u = _min_block_u(H, info.sms)
        while block_u < block_h and cdiv(H, block_u) * cdiv(B, block_b) > info.sms and fits(block_u * 2, block_b):
            block_u *= 2
    n_u = cdiv(H, block_u)
    if n_u == 1:
        mode = "single"
    else:
        mode = "stepwise" if interpret else "persistent"
    if forced_mode is not None:
        mode = forced_mode
        if mode == "single" and n_u != 1:
            raise ValueError("force_variant(mode='single') needs block_u >= H")
    # P slice for the second phase: cover P (fwd projection) and P columns of dh (bwd)
    block_p = next_pow2(cdiv(P, n_u), MIN_TILE)
    n_b_total = cdiv(B, block_b)
    if mode == "persistent":
        while (
            forced_b is None and n_b_total * n_u > info.sms and block_b < MAX_BLOCK_B
            and elt <= 2  # fp32 (non-TF32) / fp64 GEMMs run on FMA units: bigger tiles spill badly
            and onchip_bytes(gates_per_unit, block_b * 2, block_u, block_k, block_h, block_p, elt, proj) <= info.smem_bytes
        ):
            block_b *= 2
            n_b_total = cdiv(B, block_b)
        n_batch_tiles = max(1, min(n_b_total, info.sms // n_u))  # more rows: launches over batch chunks
    else:
        n_batch_tiles = n_b_total
    nbytes = _weights(gates_per_unit, block_u, block_k, block_h, block_p, elt, proj)
    num_warps = _num_warps(nbytes)
    return Variant(
        ksplit_k=ksplit(block_k, num_warps),
        ksplit_h=ksplit(block_h, num_warps),
        mode=mode,
        block_b=block_b,
        block_u=block_u,
        block_k=block_k,
        block_h=block_h,
        block_p=block_p,
        n_unit_progs=n_u,
        n_batch_tiles=n_batch_tiles,
        num_warps=num_warps,
    )


def ksplit(block: int, num_warps: int) -> int:
    """K chunks for a [M, block] x [block, N] GEMM with small M, N: ``tl.dot`` does not split K
    over warps, so a [16, 1024] x [1024, 16] dot leaves each thread the whole K (spills).  The
    kernels run a batched dot over ``ksplit`` chunks (the batch dim spreads over warps) and sum."""
    return max(1, min(num_warps, block // MIN_TILE))


# ------------------------------------------------------------------------------ AOT compilation
AOT_TARGETS = {80: DeviceInfo(108, 163 * 1024, (8, 0)), 90: DeviceInfo(132, 227 * 1024, (9, 0))}


def aot_spec(name: str, fn, ptr_types: dict, constexprs: dict, num_warps: int, num_stages: int = 1) -> dict:
    """One kernel variant for ``tools/triton_aot.py``.

    ``ptr_types``: pointer argument -> triton type ("bf16", "fp32", "i64", ...); ``constexprs``:
    every constexpr argument; every other argument is a runtime ``i32``.
    """
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in ptr_types:
            sig[a] = "*" + ptr_types[a]
        else:
            sig[a] = "i32"
    return dict(name=name, fn=fn, signature=sig, constexprs=dict(constexprs), num_warps=num_warps, num_stages=num_stages)


TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


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


# --------------------------------------------------------------------------------- jit helpers
if triton is not None:
    # On a GPU a timed-out grid barrier traps (see grid_barrier); under the interpreter it only
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
    def kidx_a(BLOCK_K: tl.constexpr, KSPLIT: tl.constexpr):
        """K index [KSPLIT, 1, BLOCK_K // KSPLIT] of a split-K A operand (rows in dim 1)."""
        BKS: tl.constexpr = BLOCK_K // KSPLIT
        return tl.arange(0, KSPLIT)[:, None, None] * BKS + tl.arange(0, BKS)[None, None, :]

    @triton.jit
    def kidx_b(BLOCK_K: tl.constexpr, KSPLIT: tl.constexpr):
        """K index [KSPLIT, BLOCK_K // KSPLIT, 1] of a split-K B operand (columns in dim 2)."""
        BKS: tl.constexpr = BLOCK_K // KSPLIT
        return tl.arange(0, KSPLIT)[:, None, None] * BKS + tl.arange(0, BKS)[None, :, None]

    @triton.jit
    def mma_splitk(a3, b3, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """sum_s a3[s] @ b3[s]: [S, M, Ks] x [S, Ks, N] -> [M, N] (split-K over warps)."""
        return tl.sum(mma(a3, b3, None, ACC, PRECISION, UPCAST), axis=0)

    @triton.jit
    def grid_barrier(sync_ptr, target, err_ptr, N_PROGS, MAX_SPINS: tl.constexpr):
        """Barrier among the ``N_PROGS`` programs sharing ``sync_ptr`` (an int32 counter).

        Every call of every participant adds 1; the k-th barrier (0-based) is passed once the
        counter reaches ``target = (k + 1) * N_PROGS`` (the caller tracks k, the counter is never
        reset).  Release on arrive (publishes this program's global stores), acquire while
        spinning (sees the others').  Loads of exchanged data after the barrier should use
        ``cache_modifier=".cg"`` (L2, not a stale L1 line).  Bounded: after ``MAX_SPINS`` polls,
        or when another program already reported a timeout, it sets ``*err_ptr = 1`` and returns
        (the launcher raises).  With ``N_PROGS == 1`` it is only a CTA barrier.
        """
        tl.debug_barrier()  # all threads' stores of this program are issued before the arrive
        if N_PROGS > 1:
            tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
            cur = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
            spins = 0
            failed = 0  # polled every 1024 spins, not per barrier (an extra L2 round trip per step)
            # Every value the loop condition reads comes from a scalar atomic, which Triton runs
            # on one thread and broadcasts through shared memory: all warps see the same value and
            # leave the loop in the same iteration (a per-thread load of the flag could let warps
            # leave at different iterations and mismatch the CTA barriers below: a hang).
            while (cur < target) & (spins < MAX_SPINS) & (failed == 0):
                cur = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
                spins += 1
                if spins % 1024 == 0:
                    failed = tl.atomic_add(err_ptr, 0, sem="relaxed", scope="gpu")
            if cur < target:
                tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
                if TRAP_ON_TIMEOUT:
                    # Device-side abort: the launch fails with a CUDA error at the next sync, also
                    # inside a CUDA graph, and no host sync is spent on the hot path to find out.
                    # Persistent launches are cooperative, so only a bug can get here.
                    tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()
