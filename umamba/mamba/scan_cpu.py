"""Selective scan on the CPU: numba kernels for the forward and the backward pass.

Same function and arguments as ``mamba_ssm``'s ``selective_scan_fn`` (see ``umamba.mamba.scan``)::

    delta' = softplus(delta + delta_bias)  (or delta + delta_bias without softplus)
    h_t[d, n] = exp(delta'_t[d] * A[d, n]) * h_{t-1}[d, n] + delta'_t[d] * B_t[n] * u_t[d],   h_{-1} = 0
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]
    out       = y * silu(z)  (when z is given)

Design
------
- Vectorised across channels: a parallel task takes a block of ``LANES`` (16) channels of one
  batch element, one channel per vector lane, and walks time sequentially; the state is a
  (d_state, LANES) array, updated one state index at a time with a full vector per update, so
  that no horizontal sums are needed in the forward pass and any ``d_state`` vectorises.
- Time is cut into chunks of ``CHUNK`` (64) steps. The per-step work that does not depend on
  the state (softplus, silu and their derivatives) runs over a whole chunk per channel, reading
  memory contiguously, and is transposed into (step, lane) tiles for the recurrence.
- float32 uses a vectorisable ``exp`` and ``log1p`` (Cephes polynomials, within 2 ulp) instead
  of the scalar libm calls, which would stop vectorisation; float64 (for ``gradcheck``) keeps
  libm. Results that are not normal floats saturate: ``exp`` gives exactly 0 below
  ``exp(-87.34)`` and inf above ``exp(88.38)``; NaNs propagate. The kernels use fast-math
  contraction and reassociation but never assume finite values.
- Bounded memory for the backward pass (checkpointing): the forward stores the state at the
  start of every chunk, (batch, ceil(dim / LANES), ceil(L / CHUNK), d_state, LANES): a quarter
  of the size of ``u`` for ``d_state = 16``, only when a gradient is needed. The backward walks
  the chunks in reverse, recomputes one chunk's decays and states from its checkpoint into a
  (d_state, CHUNK, 2, LANES) buffer (128 KiB, in L2 cache) and runs the adjoint recurrence
  through it. Storing every state would cost ``d_state`` times the size of ``u``; recomputing
  costs one more ``exp`` per element, and keeps the backward at about 2.5 times the forward.
  The (batch, dim, L) inputs and gradients are read and written ``SEGMENT`` chunks at a time in
  time order: the hardware prefetchers do not follow a walk backwards chunk by chunk.
- ``dB`` and ``dC`` are sums over channels. The blocks of a batch element are split into as
  many contiguous groups as there are threads, and each (batch element, group) task adds into
  its own (d_state, L) accumulator; the caller sums them. No two tasks write to the same
  memory, and for a given thread count the result is deterministic.
- Threads: numba runs on ``torch.get_num_threads()`` threads (at most ``NUMBA_NUM_THREADS``),
  set at every call, with numba's default threading layer.

Authors
 * U-Mamba-Net contributors
"""

import math

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic, overload
except ImportError:  # the dispatcher falls back to the pure PyTorch scan
    numba = None
    prange = range

__all__ = ["CHUNK", "is_available", "selective_scan_cpu"]

CHUNK = 64
"""Time steps per chunk: the backward's checkpoint interval and the unit of vectorised work."""

LANES = 16
"""Channels computed together, one per vector lane (one AVX-512 vector of float32)."""

SEGMENT = 8
"""Chunks that the backward pass reads and writes in one go, in time order."""

# Kernels: contraction (FMA) and reassociation (vectorised sums); no "nnan"/"ninf", so that
# comparisons with NaN and inf keep their meaning. The numpy error model: a division by zero
# gives inf instead of raising, so that loops with divisions have no exits and vectorise.
_KERNEL_OPTIONS = {"fastmath": {"contract", "reassoc", "nsz", "arcp"}, "error_model": "numpy"}
# exp and log1p: no reassociation, which would undo the two-part ln(2) of the range reduction;
# always inlined, so that the loops calling them vectorise.
_HELPER_OPTIONS = {"fastmath": {"contract"}, "error_model": "numpy", "forceinline": True}


def is_available() -> bool:
    """True when numba imports, so that :func:`selective_scan_cpu` can run.

    Example
    -------
    >>> isinstance(is_available(), bool)
    True
    """
    return numba is not None


def _exp(x):
    """``exp`` in the kernels: vectorisable polynomial for float32, libm for float64."""
    return math.exp(x)


def _log1p_unit(x):
    """``log1p`` on [0, 1] in the kernels: vectorisable polynomial for float32, libm for float64."""
    return math.log1p(x)


if numba is not None:
    _F32 = np.float32
    # Cephes expf: exp(x) = 2**k * exp(r), |r| <= ln(2) / 2, ln(2) split in two for an exact r.
    _LOG2E, _LN2_HI, _LN2_LO = _F32(1.4426950408889634), _F32(0.693359375), _F32(-2.12194440e-4)
    _EXP_P = tuple(_F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                      4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
    # Below: under the smallest normal float32 (gives 0). Above: 2**k would need k = 128 (gives inf).
    _EXP_MIN, _EXP_MAX = _F32(-87.33654), _F32(88.37626)
    # Cephes logf on [sqrt(1/2), sqrt(2)].
    _LOG_P = tuple(_F32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1,
                                      -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                                      2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
    _SQRT2 = _F32(1.4142135623730951)

    @intrinsic
    def _pow2_f32(typingctx, k):
        """``2.0 ** k`` for an integral float32 ``k`` in [-126, 127], from its exponent bits."""

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            bits = builder.shl(
                builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127)), ir.Constant(i32, 23)
            )
            return builder.bitcast(bits, ir.FloatType())

        return types.float32(types.float32), codegen

    @overload(_exp, jit_options=_HELPER_OPTIONS)
    def _exp_overload(x):
        if x != types.float32:
            return lambda x: math.exp(x)
        p0, p1, p2, p3, p4, p5 = _EXP_P

        def exp_f32(x):
            xc = min(max(x, _EXP_MIN), _EXP_MAX)
            k = np.floor(xc * _LOG2E + _F32(0.5))
            r = (xc - k * _LN2_HI) - k * _LN2_LO
            p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
            e = (p * (r * r) + r + _F32(1.0)) * _pow2_f32(k)
            if x < _EXP_MIN:
                e = _F32(0.0)
            if x > _EXP_MAX:
                e = _F32(np.inf)
            if x != x:
                e = x
            return e

        return exp_f32

    @overload(_log1p_unit, jit_options=_HELPER_OPTIONS)
    def _log1p_unit_overload(x):
        if x != types.float32:
            return lambda x: math.log1p(x)
        q0, q1, q2, q3, q4, q5, q6, q7, q8 = _LOG_P

        def log1p_unit_f32(x):
            w = _F32(1.0) + x
            # log(w) = e * ln(2) + log(m), m in [sqrt(1/2), sqrt(2)]
            big = w > _SQRT2
            m = w * _F32(0.5) if big else w
            e = _F32(1.0) if big else _F32(0.0)
            f = m - _F32(1.0)
            f2 = f * f
            p = ((((((((q0 * f + q1) * f + q2) * f + q3) * f + q4) * f + q5) * f + q6) * f + q7) * f + q8)
            log_w = f + (p * f * f2 - _F32(0.5) * f2 + e * _LN2_LO) + e * _LN2_HI
            # log1p(x) = log(w) * x / (w - 1) corrects the rounding of 1 + x (Goldberg).
            return x if w == _F32(1.0) else log_w * (x / (w - _F32(1.0)))

        return log1p_unit_f32

    def _jit(function):
        """A parallel kernel, cached on disk (next to this file, or in the user's cache directory
        when the package is read-only); compiled on every run where neither is writable."""
        try:
            return numba.njit(parallel=True, cache=True, **_KERNEL_OPTIONS)(function)
        except RuntimeError as error:
            if "no locator available" not in str(error):
                raise
            return numba.njit(parallel=True, **_KERNEL_OPTIONS)(function)

    def _jit_inline(function):
        """A helper that numba inlines into the kernels."""
        return numba.njit(inline="always", **_KERNEL_OPTIONS)(function)

else:

    def _jit(function):
        return function

    _jit_inline = _jit


# Slots of the per-task scratch arrays. Numba does not tell LLVM that two local arrays never
# overlap, so the vectoriser adds a run-time check per pair of arrays that a loop writes and
# reads, and gives up past 8. Each hot loop therefore touches at most three arrays, whose slots
# sit at constant distances (every dimension but the first is a constant). The kernels index
# arrays element by element and take no views inside loops: a view costs two atomic reference
# count updates, which also stop the loop from being vectorised.
# rows (chunks, _N_ROWS, LANES, CHUNK): per channel along time, for one or SEGMENT chunks.
_U, _DT, _DTU, _SIG, _GATE, _DGATE, _DY, _GB, _GA = range(9)
_N_ROWS = 9
# cols (CHUNK, _N_COLS, LANES): per step across channels.
_C_DT, _C_DTU, _C_Y, _C_DY, _C_GB, _C_GA = range(6)
_N_COLS = 6
# state (d_state, _N_STATE, LANES): h, dL/dh carried backwards, A, dA of the chunk, dA in total.
_H, _G, _A, _DA, _DA_SUM = range(5)
_N_STATE = 5


@_jit_inline
def _sigmoid(x, e, one):
    """``sigmoid(x)`` from ``e = exp(-|x|)`` without overflow; ``one`` is 1 in the dtype of ``x``."""
    r = one / (one + e)
    return r if x >= 0 else e * r


@_jit_inline
def _load_chunk(u, delta, z, bias, softplus, has_z, b, d0, l0, rows, k):
    """Fills ``rows[k]``'s slots _U, _DT (delta'), _DTU (delta' * u), _SIG (d delta' / d delta),
    _GATE (silu(z), or 1) and _DGATE (silu'(z), or 0) for the chunk at ``l0`` of channels ``d0:``."""
    zero, one = u.dtype.type(0), u.dtype.type(1)
    steps = min(CHUNK, u.shape[2] - l0)
    for v in range(min(LANES, u.shape[1] - d0)):
        d = d0 + v
        bias_d = bias[d]
        for j in range(steps):
            x = delta[b, d, l0 + j] + bias_d
            if softplus:
                # softplus(x) = max(x, 0) + log1p(exp(-|x|)); its derivative is sigmoid(x)
                e = _exp(-abs(x))
                dt = max(x, zero) + _log1p_unit(e)
                rows[k, _SIG, v, j] = _sigmoid(x, e, one)
            else:
                dt = x
                rows[k, _SIG, v, j] = one
            u_j = u[b, d, l0 + j]
            rows[k, _U, v, j] = u_j
            rows[k, _DT, v, j] = dt
            rows[k, _DTU, v, j] = dt * u_j
        for j in range(steps):
            if has_z:
                z_j = z[b, d, l0 + j]
                s = _sigmoid(z_j, _exp(-abs(z_j)), one)
                rows[k, _GATE, v, j] = z_j * s
                rows[k, _DGATE, v, j] = s * (one + z_j * (one - s))
            else:
                rows[k, _GATE, v, j] = one
                rows[k, _DGATE, v, j] = zero


@_jit_inline
def _rows_to_cols(rows, k, row, cols, col, steps):
    """``cols[:steps, col] = rows[k, row, :, :steps].T``."""
    for j in range(steps):
        for v in range(LANES):
            cols[j, col, v] = rows[k, row, v, j]


@_jit_inline
def _cols_to_rows(cols, col, rows, k, row, steps):
    """``rows[k, row, :, :steps] = cols[:steps, col].T``."""
    for v in range(LANES):
        for j in range(steps):
            rows[k, row, v, j] = cols[j, col, v]


@_jit_inline
def _new_state(A, d0):
    """Zero state of a channel block, with ``A[d0:d0 + LANES].T`` in slot _A (zero past the last channel)."""
    state = np.zeros((A.shape[1], _N_STATE, LANES), dtype=A.dtype)
    for n in range(A.shape[1]):
        for v in range(min(LANES, A.shape[0] - d0)):
            state[n, _A, v] = A[d0 + v, n]
    return state


@_jit
def _forward_kernel(u, delta, A, B, C, D, z, bias, softplus, has_z, out, states):
    """Writes the scan into ``out``, and each chunk's initial state into ``states`` unless its chunk axis is empty.

    Shapes: u, delta, z, out (batch, dim, L); A (dim, N); B, C (batch, N, L); D, bias (dim,);
    states (batch, n_blocks, n_chunks or 0, N, LANES) with n_blocks = ceil(dim / LANES).
    Lanes past the last channel compute zeros.
    """
    batch, dim, length = u.shape
    d_state = A.shape[1]
    n_blocks = (dim + LANES - 1) // LANES
    n_chunks = (length + CHUNK - 1) // CHUNK
    save = states.shape[2] > 0
    zero = u.dtype.type(0)
    for task in prange(batch * n_blocks):
        b, blk = task // n_blocks, task % n_blocks
        d0 = blk * LANES
        rows = np.zeros((1, _N_ROWS, LANES, CHUNK), dtype=u.dtype)
        cols = np.zeros((CHUNK, _N_COLS, LANES), dtype=u.dtype)
        state = _new_state(A, d0)
        for c in range(n_chunks):
            l0 = c * CHUNK
            steps = min(CHUNK, length - l0)
            if save:
                for n in range(d_state):
                    for v in range(LANES):
                        states[b, blk, c, n, v] = state[n, _H, v]
            _load_chunk(u, delta, z, bias, softplus, has_z, b, d0, l0, rows, 0)
            _rows_to_cols(rows, 0, _DT, cols, _C_DT, steps)
            _rows_to_cols(rows, 0, _DTU, cols, _C_DTU, steps)
            for j in range(steps):
                for v in range(LANES):
                    cols[j, _C_Y, v] = zero
                for n in range(d_state):
                    b_n, c_n = B[b, n, l0 + j], C[b, n, l0 + j]
                    for v in range(LANES):
                        h_v = _exp(cols[j, _C_DT, v] * state[n, _A, v]) * state[n, _H, v] + cols[j, _C_DTU, v] * b_n
                        state[n, _H, v] = h_v
                        cols[j, _C_Y, v] += c_n * h_v
            _cols_to_rows(cols, _C_Y, rows, 0, _DY, steps)
            for v in range(min(LANES, dim - d0)):
                D_d = D[d0 + v]
                for j in range(steps):
                    out[b, d0 + v, l0 + j] = (rows[0, _DY, v, j] + D_d * rows[0, _U, v, j]) * rows[0, _GATE, v, j]


@_jit
def _backward_kernel(u, delta, A, B, C, D, z, bias, softplus, has_z, states, dout,
                     du, ddelta, dz, dA, dD, dbias, dB, dC):
    """Gradients of the scan, from the chunk states that :func:`_forward_kernel` saved.

    Writes du, ddelta, dz (batch, dim, L; dz only with ``has_z``); dA (batch, dim, N); dD, dbias
    (batch, dim); and adds into dB, dC (batch, n_groups, N, L), one zeroed accumulator per group
    of channel blocks. The caller sums the batch and group axes.

    Time runs backwards one chunk at a time, but the (batch, dim, L) arrays are read and written
    a SEGMENT of chunks at a time in time order: the hardware prefetchers follow long ascending
    runs, not 256-byte steps backwards.
    """
    batch, dim, length = u.shape
    d_state = A.shape[1]
    n_blocks = (dim + LANES - 1) // LANES
    n_chunks = (length + CHUNK - 1) // CHUNK
    n_segments = (n_chunks + SEGMENT - 1) // SEGMENT
    n_groups = dB.shape[1]
    zero = u.dtype.type(0)
    for task in prange(batch * n_groups):
        b, group = task // n_groups, task % n_groups
        rows = np.zeros((SEGMENT, _N_ROWS, LANES, CHUNK), dtype=u.dtype)
        cols = np.zeros((CHUNK, _N_COLS, LANES), dtype=u.dtype)
        trace = np.zeros((d_state, CHUNK, 2, LANES), dtype=u.dtype)  # decay_t, h_{t-1}
        for blk in range(group * n_blocks // n_groups, (group + 1) * n_blocks // n_groups):
            d0 = blk * LANES
            n_lanes = min(LANES, dim - d0)
            state = _new_state(A, d0)
            rows[:] = zero
            for v in range(n_lanes):
                dD[b, d0 + v] = zero
                dbias[b, d0 + v] = zero
            for s in range(n_segments - 1, -1, -1):
                # max(): s >= 0, and LLVM can then drop the negative-index handling of numba.
                c0 = max(s, 0) * SEGMENT
                n_seg_chunks = min(SEGMENT, n_chunks - c0)
                for k in range(n_seg_chunks):
                    l0 = (c0 + k) * CHUNK
                    _load_chunk(u, delta, z, bias, softplus, has_z, b, d0, l0, rows, k)
                    for v in range(n_lanes):
                        for j in range(min(CHUNK, length - l0)):
                            rows[k, _DY, v, j] = dout[b, d0 + v, l0 + j]
                for k in range(n_seg_chunks - 1, -1, -1):
                    c = c0 + k
                    l0 = c * CHUNK
                    steps = min(CHUNK, length - l0)
                    _rows_to_cols(rows, k, _DT, cols, _C_DT, steps)
                    _rows_to_cols(rows, k, _DTU, cols, _C_DTU, steps)
                    # Recompute the chunk from its checkpoint, keeping each decay and h_{t-1}.
                    for n in range(d_state):
                        for v in range(LANES):
                            state[n, _H, v] = states[b, blk, c, n, v]
                    for j in range(steps):
                        for v in range(LANES):
                            cols[j, _C_Y, v] = zero
                        for n in range(d_state):
                            b_n, c_n = B[b, n, l0 + j], C[b, n, l0 + j]
                            for v in range(LANES):
                                a_v = _exp(cols[j, _C_DT, v] * state[n, _A, v])
                                h_v = state[n, _H, v]
                                trace[n, j, 0, v] = a_v
                                trace[n, j, 1, v] = h_v
                                h_v = a_v * h_v + cols[j, _C_DTU, v] * b_n
                                state[n, _H, v] = h_v
                                cols[j, _C_Y, v] += c_n * h_v
                    # Output gate, out = (y + D u) * silu(z): _DY turns from dL/dout into dL/dy,
                    # _DGATE into dL/dz (y sits in _GB for now).
                    _cols_to_rows(cols, _C_Y, rows, k, _GB, steps)
                    for v in range(n_lanes):
                        D_d = D[d0 + v]
                        for j in range(steps):
                            dout_j = rows[k, _DY, v, j]
                            y_j = rows[k, _GB, v, j] + D_d * rows[k, _U, v, j]
                            rows[k, _DGATE, v, j] = dout_j * y_j * rows[k, _DGATE, v, j]
                            rows[k, _DY, v, j] = dout_j * rows[k, _GATE, v, j]
                    _rows_to_cols(rows, k, _DY, cols, _C_DY, steps)
                    # Adjoint recurrence backwards in time; _G holds decay_{t+1} * dL/dh_{t+1} on entry.
                    for n in range(d_state):
                        for v in range(LANES):
                            state[n, _DA, v] = zero
                    for j in range(steps - 1, -1, -1):
                        for v in range(LANES):
                            cols[j, _C_GB, v] = zero
                            cols[j, _C_GA, v] = zero
                        for n in range(d_state):
                            b_n, c_n = B[b, n, l0 + j], C[b, n, l0 + j]
                            s_B = zero
                            s_C = zero
                            for v in range(LANES):
                                a_v, hp_v = trace[n, j, 0, v], trace[n, j, 1, v]
                                dy_v, dtu_v = cols[j, _C_DY, v], cols[j, _C_DTU, v]
                                g_v = dy_v * c_n + state[n, _G, v]  # dL/dh_t
                                s_C += dy_v * (a_v * hp_v + dtu_v * b_n)
                                s_B += g_v * dtu_v
                                cols[j, _C_GB, v] += g_v * b_n
                                q_v = g_v * hp_v * a_v  # dL/d decay_t * decay_t
                                cols[j, _C_GA, v] += q_v * state[n, _A, v]
                                state[n, _DA, v] += q_v * cols[j, _C_DT, v]
                                state[n, _G, v] = g_v * a_v
                            dB[b, group, n, l0 + j] += s_B
                            dC[b, group, n, l0 + j] += s_C
                    for n in range(d_state):
                        for v in range(LANES):
                            state[n, _DA_SUM, v] += state[n, _DA, v]
                    # _GB and _GA (sums over the state of dL/dx * B and of dL/d decay * decay * A)
                    # turn into dL/du and dL/ddelta.
                    _cols_to_rows(cols, _C_GB, rows, k, _GB, steps)
                    _cols_to_rows(cols, _C_GA, rows, k, _GA, steps)
                    for v in range(n_lanes):
                        d = d0 + v
                        D_d = D[d]
                        dD_chunk = zero
                        dbias_chunk = zero
                        for j in range(steps):
                            g_B, u_j, dy_j = rows[k, _GB, v, j], rows[k, _U, v, j], rows[k, _DY, v, j]
                            ddelta_j = (rows[k, _GA, v, j] + g_B * u_j) * rows[k, _SIG, v, j]
                            rows[k, _GB, v, j] = g_B * rows[k, _DT, v, j] + dy_j * D_d
                            rows[k, _GA, v, j] = ddelta_j
                            dD_chunk += dy_j * u_j
                            dbias_chunk += ddelta_j
                        dD[b, d] += dD_chunk
                        dbias[b, d] += dbias_chunk
                for k in range(n_seg_chunks):
                    l0 = (c0 + k) * CHUNK
                    for v in range(n_lanes):
                        for j in range(min(CHUNK, length - l0)):
                            du[b, d0 + v, l0 + j] = rows[k, _GB, v, j]
                            ddelta[b, d0 + v, l0 + j] = rows[k, _GA, v, j]
                            if has_z:
                                dz[b, d0 + v, l0 + j] = rows[k, _DGATE, v, j]
            for n in range(d_state):
                for v in range(n_lanes):
                    dA[b, d0 + v, n] = state[n, _DA_SUM, v]


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view of a CPU tensor (a copy only when it is not contiguous)."""
    return tensor.detach().contiguous().numpy()


def _use_torch_threads() -> int:
    """Runs numba on as many threads as torch (never more than numba started), and returns that number."""
    wanted = torch.get_num_threads()
    threads = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    if torch.get_num_threads() != wanted:  # starting numba's OpenMP pool can resize torch's
        torch.set_num_threads(wanted)
    return threads


class _SelectiveScan(torch.autograd.Function):
    """Autograd wrapper of the kernels; arguments already checked and in one dtype."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states):
        batch, dim, length = u.shape
        d_state = A.shape[1]
        zeros = torch.zeros(dim, dtype=u.dtype)
        n_blocks = -(-dim // LANES)
        n_saved = -(-length // CHUNK) if save_states else 0
        states = u.new_empty(batch, n_blocks, n_saved, d_state, LANES)
        out = u.new_empty(u.shape)
        _use_torch_threads()
        _forward_kernel(
            _array(u), _array(delta), _array(A), _array(B), _array(C),
            _array(zeros if D is None else D), _array(u if z is None else z),
            _array(zeros if delta_bias is None else delta_bias), bool(delta_softplus), z is not None,
            out.numpy(), states.numpy(),
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus = bool(delta_softplus)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        d_state = A.shape[1]
        zeros = torch.zeros(dim, dtype=u.dtype)
        n_groups = min(_use_torch_threads(), -(-dim // LANES))
        du, ddelta = u.new_empty(u.shape), u.new_empty(u.shape)
        dz = u.new_empty(u.shape if z is not None else (0, 0, 0))
        dA = u.new_empty(batch, dim, d_state)
        dD, dbias = u.new_empty(batch, dim), u.new_empty(batch, dim)
        dB, dC = u.new_zeros(batch, n_groups, d_state, length), u.new_zeros(batch, n_groups, d_state, length)
        _backward_kernel(
            _array(u), _array(delta), _array(A), _array(B), _array(C),
            _array(zeros if D is None else D), _array(u if z is None else z),
            _array(zeros if delta_bias is None else delta_bias), ctx.delta_softplus, z is not None,
            states.numpy(), _array(dout),
            du.numpy(), ddelta.numpy(), dz.numpy(), dA.numpy(), dD.numpy(), dbias.numpy(), dB.numpy(), dC.numpy(),
        )
        return (
            du, ddelta, dA.sum(0), dB.sum(1), dC.sum(1),
            None if D is None else dD.sum(0),
            None if z is None else dz,
            None if delta_bias is None else dbias.sum(0),
            None,
            None,
        )


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Raises a ValueError naming the argument whose device, dtype or shape does not fit."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"selective_scan_cpu: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"selective_scan_cpu: {name} is on {tensor.device}; this backend needs CPU tensors")
        if not tensor.is_floating_point():
            raise ValueError(f"selective_scan_cpu: {name} must be real floating point, got {tensor.dtype}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan_cpu: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan_cpu: A must be (dim, d_state) with dim = {dim}, got shape {tuple(A.shape)}")
    d_state = A.shape[1]
    expected = {
        "delta": (batch, dim, length), "B": (batch, d_state, length), "C": (batch, d_state, length),
        "D": (dim,), "z": (batch, dim, length), "delta_bias": (dim,),
    }
    for name, shape in expected.items():
        tensor = named[name]
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan_cpu: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor = None,
    z: torch.Tensor = None,
    delta_bias: torch.Tensor = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan on CPU tensors with numba kernels; differentiable in every tensor argument.

    Computes the same function as ``mamba_ssm``'s ``selective_scan_fn`` (module docstring) in
    float64 when ``u`` is float64 and in float32 otherwise. Memory: the output, plus (when a
    gradient is needed) the state every ``CHUNK`` steps, a quarter of ``u`` for d_state = 16.

    Arguments
    ---------
    u : torch.Tensor
        Input, (batch, dim, L).
    delta : torch.Tensor
        Step sizes before bias and softplus, (batch, dim, L).
    A : torch.Tensor
        State matrix (diagonal, real, normally negative), (dim, d_state).
    B : torch.Tensor
        Input projection per step, (batch, d_state, L).
    C : torch.Tensor
        Output projection per step, (batch, d_state, L).
    D : torch.Tensor, optional
        Skip connection, (dim,).
    z : torch.Tensor, optional
        Gate, (batch, dim, L): the output is multiplied by ``silu(z)``.
    delta_bias : torch.Tensor, optional
        Added to ``delta``, (dim,).
    delta_softplus : bool
        Apply softplus to ``delta + delta_bias``.

    Returns
    -------
    torch.Tensor
        (batch, dim, L), in the dtype of ``u``.

    Example
    -------
    >>> u = torch.randn(2, 4, 10, requires_grad=True); delta = torch.rand(2, 4, 10)
    >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 10); C = torch.randn(2, 3, 10)
    >>> y = selective_scan_cpu(u, delta, A, B, C, D=torch.ones(4), delta_softplus=True)
    >>> y.shape
    torch.Size([2, 4, 10])
    >>> y.sum().backward(); u.grad.shape
    torch.Size([2, 4, 10])
    """
    if not is_available():
        raise RuntimeError("selective_scan_cpu needs numba; install it or use the 'torch' scan backend")
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    tensors = [None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)]
    # Checkpoints only when autograd will call the backward (forward() itself runs without grad).
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _SelectiveScan.apply(*tensors, bool(delta_softplus), save_states).to(u.dtype)
