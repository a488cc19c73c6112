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
  memory contiguously, and is transposed into (step, lane) tiles for the recurrence, and the
  recurrence's output back; a transpose moves LANES x LANES tiles with vector shuffles.
- The forward pass does only its own share of that work: delta' and delta' * u over a segment
  of ``SEGMENT`` chunks per channel at a time (long contiguous runs; the per-chunk loops cost
  more in set-up than in work), the recurrence chunk by chunk, then the output and its gate
  over the segment. No derivatives: the backward recomputes what it needs from the inputs.
- Inference can hand the kernel the Mamba block's low-rank step sizes (batch, r, L) and their
  (dim, r) projection (``delta_proj``): the loader projects a segment of each channel, r
  multiply-adds over the segment in L1 cache, instead of a 1x1 convolution writing the
  (batch, dim, L) delta for the kernel to read back. The backward needs the full delta, so this
  path is forward only.
- float32 uses a vectorisable ``exp`` (Cephes polynomial) and ``log1p`` on [0, 1] (softplus's
  ``log1p(exp(-|x|))``: one polynomial, no division), both within 2 ulp, instead of the scalar
  libm calls, which would stop vectorisation; float64 (for ``gradcheck``) keeps
  libm. Results that are not normal floats saturate: ``exp`` gives exactly 0 below
  ``exp(-87.34)`` and inf above ``exp(88.38)``; NaNs propagate. The kernels use fast-math
  contraction and reassociation but never assume finite values. ``exp`` scales by ``2**k``
  with an integer add to the exponent bits and replaces out-of-range results at the end, with
  no clamping; in softplus and sigmoid (``exp(-|x|)``) it skips the overflow check.
- The forward recurrence, about two thirds of the forward's time, is bound by the throughput
  of its vector arithmetic, so its decay ``exp(delta' * A)`` is computed as ``2 ** (delta' * A')``
  with ``A' = A * log2(e)`` (set once per channel block): the range reduction is then one exact
  subtraction instead of three operations, and a degree-5 polynomial keeps it within 2 ulp. An
  argument below -126 counts as -126 (one ``max``, where a result of exactly 0 would need a
  compare and a select): the decay is then 2**-126 instead of 0, 1e-38 of the state it
  multiplies, below float32's rounding of the sum. When softplus is on and every ``A`` is
  negative and finite (the kernel checks each channel block's ``A``; the usual Mamba case), ``delta' * A'`` is <= 0,
  and NaN only where delta' is NaN, which makes the state NaN anyway through ``delta' * u``: the
  decay then skips its checks for overflow and NaN, four instructions in a loop of about twenty.
- Bounded memory for the backward pass (checkpointing): the forward stores the state at the
  start of every chunk, (batch, ceil(dim / LANES), ceil(L / CHUNK), d_state, LANES): a quarter
  of the size of ``u`` for ``d_state = 16``, only when a gradient is needed. The backward walks
  the chunks in reverse, recomputes one chunk's decays and states from its checkpoint into a
  (d_state, CHUNK, 2, LANES) buffer (128 KiB, in L2 cache) and runs the adjoint recurrence
  through it. Storing every state would cost ``d_state`` times the size of ``u``; recomputing
  costs one more ``exp`` per element, and keeps the backward at about three times the forward.
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
"""Chunks that the forward pass loads, and the backward pass reads and writes, in one go, in time order."""

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


def _exp_nonpositive(x):
    """:func:`_exp` for ``x <= 0`` (or NaN): the float32 polynomial skips the check for overflow,
    and gives garbage above ``exp(88.38)`` instead of inf."""
    return math.exp(x)


def _decay(x):
    """``2 ** x``, the forward recurrence's decay: vectorisable polynomial for float32, libm for float64."""
    return math.exp2(x)


def _decay_negative(x):
    """:func:`_decay` for ``x <= 0``, where a NaN ``x`` need not propagate: no check for overflow or NaN."""
    return math.exp2(x)


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
    _ROUND = _F32(1.5 * 2**23)  # x + _ROUND rounds x to an integer, for |x| < 2**22
    # 2**f = 1 + f * q(f) on [-1/2, 1/2], q of degree 5 fitted for the relative error (2e-9).
    _EXP2_Q = tuple(_F32(c) for c in (0.0013264714507386088, 0.009671513922512531, 0.05550733953714371,
                                       0.24022242426872253, 0.6931470036506653))
    # 2**k * 2**f is a normal float for x in [-126, 127.5): k = round(x) in [-126, 127].
    _EXP2_MIN, _EXP2_END = _F32(-126.0), _F32(127.5)
    # log1p(x) = x * p(x) on [0, 1], p of degree 9 with p(0) = 1, fitted for the relative error
    # (5e-9; 1.5 ulp in float32 with the rounding): no division and no range reduction.
    _LOG1P_P = tuple(_F32(c) for c in (-0.0032436884939670563, 0.019849948585033417, -0.056956697255373,
                                        0.10603368282318115, -0.15305423736572266, 0.19675880670547485,
                                        -0.24954122304916382, 0.3332996070384979, -0.4999990165233612))

    @intrinsic
    def _times_pow2_f32(typingctx, x, t):
        """``x * 2.0 ** k`` for float32 ``x`` and ``t = k + _ROUND``, an integer ``k`` whose product
        with ``x`` is a normal float: ``k``, the low bits of ``t``, added to the exponent bits of ``x``
        (the bits of _ROUND shifted left by 23 are 0). Integer operations only, never a poison value."""

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            shift = builder.shl(builder.bitcast(args[1], i32), ir.Constant(i32, 23))
            return builder.bitcast(builder.add(builder.bitcast(args[0], i32), shift), ir.FloatType())

        return types.float32(types.float32, types.float32), codegen

    def _exp_f32(overflow):
        """The float32 ``exp``; ``overflow``: check for arguments above _EXP_MAX (inf)."""
        p0, p1, p2, p3, p4, p5 = _EXP_P

        def exp_f32(x):
            # k = round(x / ln(2)): adding _ROUND leaves no fraction bits (as long as |k| < 2**22)
            t = x * _LOG2E + _ROUND
            k = t - _ROUND
            r = (x - k * _LN2_HI) - k * _LN2_LO
            p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
            # 2**k * exp(r) is normal on [_EXP_MIN, _EXP_MAX] (at _EXP_MIN, k = -126 and r > 0).
            # Outside, and for inf and NaN, it is garbage and replaced: no clamping needed.
            e = _times_pow2_f32(p * (r * r) + r + _F32(1.0), t)
            if x < _EXP_MIN:
                e = _F32(0.0)
            if overflow and x > _EXP_MAX:
                e = _F32(np.inf)
            if x != x:
                e = x
            return e

        return exp_f32

    def _decay_f32(checked):
        """The float32 ``2 ** x``. Arguments below -126 count as -126: 2**-126 (1e-38) instead of 0,
        lost in the rounding of the state it multiplies, with one ``max`` instead of a compare and
        a select. ``checked``: inf from _EXP2_END up and NaN for NaN, otherwise garbage."""
        q0, q1, q2, q3, q4 = _EXP2_Q

        def decay_f32(x):
            xc = max(x, _EXP2_MIN)
            t = xc + _ROUND  # k = round(xc) in the low bits of t
            f = xc - (t - _ROUND)  # exact, in [-1/2, 1/2]: one op where exp's reduction takes three
            q = (((q0 * f + q1) * f + q2) * f + q3) * f + q4
            e = _times_pow2_f32(q * f + _F32(1.0), t)
            if checked:
                if x >= _EXP2_END:
                    e = _F32(np.inf)
                if x != x:
                    e = x
            return e

        return decay_f32

    def _log1p_unit_f32():
        """The float32 ``log1p`` on [0, 1]."""
        q0, q1, q2, q3, q4, q5, q6, q7, q8 = _LOG1P_P

        def log1p_unit_f32(x):
            p = (((((((q0 * x + q1) * x + q2) * x + q3) * x + q4) * x + q5) * x + q6) * x + q7) * x + q8
            return (p * x + _F32(1.0)) * x

        return log1p_unit_f32

    def _overload_float32(function, libm, float32_impl):
        """Compiles the kernels' calls of ``function``: ``float32_impl`` for a float32 argument,
        ``libm`` (the C library's function, exact to float64) otherwise."""

        @overload(function, jit_options=_HELPER_OPTIONS)
        def _choose(x):
            return float32_impl if x == types.float32 else (lambda x: libm(x))

    _overload_float32(_exp, math.exp, _exp_f32(True))
    _overload_float32(_exp_nonpositive, math.exp, _exp_f32(False))
    _overload_float32(_decay, math.exp2, _decay_f32(True))
    _overload_float32(_decay_negative, math.exp2, _decay_f32(False))
    _overload_float32(_log1p_unit, math.log1p, _log1p_unit_f32())

    @intrinsic
    def _transpose_tile(typingctx, src, src_at, src_stride, dst, dst_at, dst_stride):
        """Copies a LANES x LANES tile transposed between two C-contiguous arrays of one dtype, at flat
        element offsets: ``dst[dst_at + i * dst_stride + v] = src[src_at + v * src_stride + i]``.
        No bounds checks. Sixteen vector loads, four rounds of two-vector shuffles (round ``k``
        swaps bit ``k`` of the row and column indices) and sixteen vector stores, where a scalar
        copy takes 256 loads and stores."""
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype
                and src.layout == dst.layout == "C"):
            return None

        def codegen(context, builder, signature, args):
            src, src_at, src_stride, dst, dst_at, dst_stride = args
            elem = context.get_value_type(signature.args[0].dtype)
            vec, align = ir.VectorType(elem, LANES), context.get_abi_sizeof(elem)
            i64, mask = ir.IntType(64), ir.VectorType(ir.IntType(32), LANES)

            def pointers(array_type, array, at, stride):
                data = context.make_array(array_type)(context, builder, value=array).data
                for i in range(LANES):
                    offset = builder.add(at, builder.mul(stride, ir.Constant(i64, i)))
                    yield builder.bitcast(builder.gep(data, [offset], inbounds=True), vec.as_pointer())

            rows = [builder.load(p, align=align) for p in pointers(signature.args[0], src, src_at, src_stride)]
            for k in range(LANES.bit_length() - 1):
                bit = 1 << k
                low = ir.Constant(mask, [c if not c & bit else LANES + (c ^ bit) for c in range(LANES)])
                high = ir.Constant(mask, [c | bit if not c & bit else LANES + c for c in range(LANES)])
                for i in range(LANES):
                    if not i & bit:
                        rows[i], rows[i | bit] = (builder.shuffle_vector(rows[i], rows[i | bit], low),
                                                  builder.shuffle_vector(rows[i], rows[i | bit], high))
            for row, p in zip(rows, pointers(signature.args[3], dst, dst_at, dst_stride)):
                builder.store(row, p, align=align)
            return context.get_dummy_value()

        return types.none(src, types.intp, types.intp, dst, types.intp, types.intp), codegen

    def _jit(function, parallel=True):
        """A kernel (parallel unless told), cached on disk (next to this file, or in the user's cache
        directory when the package is read-only); compiled on every run where neither is writable."""
        try:
            return numba.njit(parallel=parallel, cache=True, **_KERNEL_OPTIONS)(function)
        except RuntimeError as error:
            if "no locator available" not in str(error):
                raise
            return numba.njit(parallel=parallel, **_KERNEL_OPTIONS)(function)

    def _jit_serial(function):
        """:func:`_jit` for a kernel with no parallel loop (numba warns about ``parallel=True`` there)."""
        return _jit(function, parallel=False)

    def _jit_inline(function):
        """A helper that numba inlines into the kernels."""
        return numba.njit(inline="always", **_KERNEL_OPTIONS)(function)

else:

    def _jit(function, parallel=True):
        return function

    _jit_inline = _jit_serial = _jit


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
# The forward's own buffers: rows (_N_F_ROWS, LANES, SEGMENT * CHUNK), a segment per channel;
# cols (CHUNK, _N_F_COLS, LANES).
_F_DT, _F_DTU, _F_Y = range(3)
_N_F_ROWS = 3
_F_C_DT, _F_C_DTU, _F_C_Y = range(3)
_N_F_COLS = 3
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
                e = _exp_nonpositive(-abs(x))
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
                s = _sigmoid(z_j, _exp_nonpositive(-abs(z_j)), one)
                rows[k, _GATE, v, j] = z_j * s
                rows[k, _DGATE, v, j] = s * (one + z_j * (one - s))
            else:
                rows[k, _GATE, v, j] = one
                rows[k, _DGATE, v, j] = zero


@_jit_inline
def _load_steps(u, delta, proj, project, bias, softplus, b, d0, l0, rows):
    """The forward's share of :func:`_load_chunk`, over a segment of up to ``rows.shape[2]`` steps
    from ``l0``: ``rows[_F_DT, v]`` = delta', ``rows[_F_DTU, v]`` = delta' * u.

    With ``project``, ``delta`` is low-rank, (batch, r, L), and the channel's delta is first
    projected into ``rows[_F_DT, v]``, with the bias: ``proj[d] @ delta[b, :, l0:l0 + steps] + bias[d]``
    (``proj`` (dim, r)), four ranks at a time (then one at a time for the rest), each group a pass
    of multiply-adds over the whole segment in L1 cache.
    """
    zero = u.dtype.type(0)
    steps = min(rows.shape[2], u.shape[2] - l0)
    for v in range(min(LANES, u.shape[1] - d0)):
        d = d0 + v
        bias_d = bias[d]
        if project:
            # bias + the ranks, four per pass over the segment where there are four left
            rank = proj.shape[1]
            if rank >= 4:
                w_0, w_1, w_2, w_3 = proj[d, 0], proj[d, 1], proj[d, 2], proj[d, 3]
                for j in range(steps):
                    rows[_F_DT, v, j] = (bias_d + w_0 * delta[b, 0, l0 + j] + w_1 * delta[b, 1, l0 + j]
                                         + w_2 * delta[b, 2, l0 + j] + w_3 * delta[b, 3, l0 + j])
                r = 4
            else:
                w_0 = proj[d, 0]
                for j in range(steps):
                    rows[_F_DT, v, j] = bias_d + w_0 * delta[b, 0, l0 + j]
                r = 1
            while r + 4 <= rank:
                w_0, w_1, w_2, w_3 = proj[d, r], proj[d, r + 1], proj[d, r + 2], proj[d, r + 3]
                for j in range(steps):
                    rows[_F_DT, v, j] += (w_0 * delta[b, r, l0 + j] + w_1 * delta[b, r + 1, l0 + j]
                                          + w_2 * delta[b, r + 2, l0 + j] + w_3 * delta[b, r + 3, l0 + j])
                r += 4
            while r < rank:
                w_r = proj[d, r]
                for j in range(steps):
                    rows[_F_DT, v, j] += w_r * delta[b, r, l0 + j]
                r += 1
            for j in range(steps):
                x = rows[_F_DT, v, j]
                dt = max(x, zero) + _log1p_unit(_exp_nonpositive(-abs(x))) if softplus else x
                rows[_F_DT, v, j] = dt
                rows[_F_DTU, v, j] = dt * u[b, d, l0 + j]
        else:
            for j in range(steps):
                x = delta[b, d, l0 + j] + bias_d
                dt = max(x, zero) + _log1p_unit(_exp_nonpositive(-abs(x))) if softplus else x
                rows[_F_DT, v, j] = dt
                rows[_F_DTU, v, j] = dt * u[b, d, l0 + j]


@_jit_inline
def _tiles_to_cols(rows, at, stride, cols, col, steps):
    """``cols[:steps, col, :]`` = the (LANES, steps) block of ``rows`` at flat offset ``at`` with
    row stride ``stride``, transposed, in whole tiles of LANES steps (``steps`` rounded up: the
    buffers always hold whole tiles)."""
    for j0 in range(0, steps, LANES):
        _transpose_tile(rows, at + j0, stride, cols, (j0 * cols.shape[1] + col) * LANES, cols.shape[1] * LANES)


@_jit_inline
def _cols_to_tiles(cols, col, rows, at, stride, steps):
    """The inverse of :func:`_tiles_to_cols`."""
    for j0 in range(0, steps, LANES):
        _transpose_tile(cols, (j0 * cols.shape[1] + col) * LANES, cols.shape[1] * LANES, rows, at + j0, stride)


@_jit_inline
def _rows_to_cols(rows, k, row, cols, col, steps):
    """``cols[:steps, col] = rows[k, row, :, :steps].T`` (whole tiles, as :func:`_tiles_to_cols`)."""
    _tiles_to_cols(rows, (k * _N_ROWS + row) * LANES * CHUNK, CHUNK, cols, col, steps)


@_jit_inline
def _cols_to_rows(cols, col, rows, k, row, steps):
    """``rows[k, row, :, :steps] = cols[:steps, col].T`` (whole tiles, as :func:`_tiles_to_cols`)."""
    _cols_to_tiles(cols, col, rows, (k * _N_ROWS + row) * LANES * CHUNK, CHUNK, steps)


@_jit_inline
def _new_state(A, d0):
    """Zero state of a channel block, with ``A[d0:d0 + LANES].T`` in slot _A (zero past the last channel)."""
    state = np.zeros((A.shape[1], _N_STATE, LANES), dtype=A.dtype)
    for n in range(A.shape[1]):
        for v in range(min(LANES, A.shape[0] - d0)):
            state[n, _A, v] = A[d0 + v, n]
    return state


@_jit_inline
def _scan_steps(B, C, b, l0, steps, cols, state, negative):
    """The forward recurrence over ``steps`` steps from ``l0``: updates the h slot of ``state``
    and writes y into ``cols[:, _F_C_Y]``; ``negative``: every delta' * A is <= 0, and NaN only
    where delta' is NaN (softplus on, A negative and finite): the decay skips its checks.
    The A slot holds ``A * log2(e)``: decay = exp(delta' * A) = 2 ** (delta' * A * log2(e))."""
    zero = cols.dtype.type(0)
    for j in range(steps):
        for v in range(LANES):
            cols[j, _F_C_Y, v] = zero
        for n in range(state.shape[0]):
            b_n, c_n = B[b, n, l0 + j], C[b, n, l0 + j]
            for v in range(LANES):
                x = cols[j, _F_C_DT, v] * state[n, _A, v]
                a_v = _decay_negative(x) if negative else _decay(x)
                h_v = a_v * state[n, _H, v] + cols[j, _F_C_DTU, v] * b_n
                state[n, _H, v] = h_v
                cols[j, _F_C_Y, v] += c_n * h_v


@_jit
def _forward_kernel(u, delta, proj, project, A, B, C, D, z, bias, softplus, has_z, unchecked, out, states):
    """Writes the scan into ``out``, and each chunk's initial state into ``states`` unless its chunk axis is empty.

    Shapes: u, z, out (batch, dim, L); delta (batch, dim, L), or (batch, r, L) with ``project``,
    which projects it by ``proj`` (dim, r >= 1; unread otherwise); A (dim, N); B, C (batch, N, L);
    D, bias (dim,); states (batch, n_blocks, n_chunks or 0, N, LANES) with
    n_blocks = ceil(dim / LANES). Lanes past the last channel compute zeros. ``unchecked``: a
    channel block whose ``A * log2(e)`` are all negative and finite, with softplus on, may use the
    decay without checks (see :func:`_scan_steps`); False forces the checked decay everywhere.
    """
    batch, dim, length = u.shape
    d_state = A.shape[1]
    n_blocks = (dim + LANES - 1) // LANES
    save = states.shape[2] > 0
    one = u.dtype.type(1)
    log2e = u.dtype.type(1.4426950408889634)
    for task in prange(batch * n_blocks):
        b, blk = task // n_blocks, task % n_blocks
        d0 = blk * LANES
        span = SEGMENT * CHUNK
        rows = np.zeros((_N_F_ROWS, LANES, span), dtype=u.dtype)
        cols = np.zeros((CHUNK, _N_F_COLS, LANES), dtype=u.dtype)
        state = _new_state(A, d0)
        negative = unchecked and softplus
        for n in range(d_state):
            for v in range(LANES):
                a = state[n, _A, v] * log2e
                state[n, _A, v] = a
                if v < dim - d0 and not (a < 0 and a > -np.inf):  # also False for NaN
                    negative = False
        for s in range((length + span - 1) // span):
            # A select, not max(): numba compiles max() as an opaque call, so LLVM would not learn
            # that the indices below are >= 0 and would keep the wrap-around checks (gathers).
            l_seg = (s if s > 0 else 0) * span
            seg_steps = min(span, length - l_seg)
            _load_steps(u, delta, proj, project, bias, softplus, b, d0, l_seg, rows)
            for k in range((seg_steps + CHUNK - 1) // CHUNK):
                j_chunk = k * CHUNK
                l0 = l_seg + j_chunk
                steps = min(CHUNK, length - l0)
                if save:
                    for n in range(d_state):
                        for v in range(LANES):
                            states[b, blk, l0 // CHUNK, n, v] = state[n, _H, v]
                _tiles_to_cols(rows, _F_DT * LANES * span + j_chunk, span, cols, _F_C_DT, steps)
                _tiles_to_cols(rows, _F_DTU * LANES * span + j_chunk, span, cols, _F_C_DTU, steps)
                if negative:
                    _scan_steps(B, C, b, l0, steps, cols, state, True)
                else:
                    _scan_steps(B, C, b, l0, steps, cols, state, False)
                _cols_to_tiles(cols, _F_C_Y, rows, _F_Y * LANES * span + j_chunk, span, steps)
            # out = (y + D u) * silu(z), a segment of each channel at a time
            for v in range(min(LANES, dim - d0)):
                d = d0 + v
                D_d = D[d]
                for j in range(seg_steps):
                    y_j = rows[_F_Y, v, j] + D_d * u[b, d, l_seg + j]
                    if has_z:
                        z_j = z[b, d, l_seg + j]
                        y_j *= z_j * _sigmoid(z_j, _exp_nonpositive(-abs(z_j)), one)
                    out[b, d, l_seg + j] = y_j


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
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.numpy()


_ZEROS = {}
"""(shape, numpy dtype) -> zeros that stand in for an absent D, bias or delta_proj; never written."""


def _zeros(shape: tuple, dtype: torch.dtype) -> np.ndarray:
    """Zeros of ``shape`` in ``dtype`` for an absent argument, made once and then reused."""
    key = (shape, dtype)
    zeros = _ZEROS.get(key)
    if zeros is None:
        if len(_ZEROS) >= 64:  # many distinct shapes: start over rather than grow without bound
            _ZEROS.clear()
        zeros = _ZEROS[key] = np.zeros(shape, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return zeros


def _use_torch_threads() -> int:
    """Runs numba on as many threads as torch (never more than numba started), and returns that number."""
    wanted = torch.get_num_threads()
    threads = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    if torch.get_num_threads() != wanted:  # starting numba's OpenMP pool can resize torch's
        torch.set_num_threads(wanted)
    return threads


def _forward(u, delta, delta_proj, A, B, C, D, z, delta_bias, delta_softplus, save_states):
    """Runs :func:`_forward_kernel`; arguments checked and in one dtype. Returns the output and
    the chunk states, (batch, n_blocks, ceil(L / CHUNK), d_state, LANES), or None unless ``save_states``."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    n_blocks = -(-dim // LANES)
    if save_states:
        states = u.new_empty(batch, n_blocks, -(-length // CHUNK), d_state, LANES)
        states_array = states.numpy()
    else:
        states, states_array = None, _zeros((batch, n_blocks, 0, d_state, LANES), u.dtype)
    out = u.new_empty(u.shape)
    project = delta_proj is not None
    _use_torch_threads()
    _forward_kernel(
        _array(u), _array(delta), _array(delta_proj) if project else _zeros((dim, 1), u.dtype), project,
        _array(A), _array(B), _array(C), _zeros((dim,), u.dtype) if D is None else _array(D),
        _array(u if z is None else z), _zeros((dim,), u.dtype) if delta_bias is None else _array(delta_bias),
        bool(delta_softplus), z is not None, True, out.numpy(), states_array,
    )
    return out, states


class _SelectiveScan(torch.autograd.Function):
    """Autograd wrapper of the kernels; arguments already checked and in one dtype."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states):
        out, states = _forward(u, delta, None, A, B, C, D, z, delta_bias, delta_softplus, save_states)
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


_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_proj")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_proj=None):
    """Raises a ValueError naming the argument whose device, dtype or shape does not fit (a
    TypeError for an argument that is not a tensor)."""
    for name, tensor in zip(_NAMES, (u, delta, A, B, C, D, z, delta_bias, delta_proj)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"selective_scan_cpu: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_cpu:
            raise ValueError(f"selective_scan_cpu: {name} is on {tensor.device}; this backend needs CPU tensors")
        if not tensor.is_floating_point():
            raise ValueError(f"selective_scan_cpu: {name} must be real floating point, got {tensor.dtype}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan_cpu: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan_cpu: A must be (dim, d_state) with dim = {dim}, got shape {tuple(A.shape)}")
    d_state = A.shape[1]
    if delta_proj is not None and (delta_proj.dim() != 2 or delta_proj.shape[0] != dim or delta_proj.shape[1] < 1):
        raise ValueError(
            f"selective_scan_cpu: delta_proj must be (dim, rank) with dim = {dim} and rank >= 1, "
            f"got shape {tuple(delta_proj.shape)}"
        )
    rank = dim if delta_proj is None else delta_proj.shape[1]
    for name, tensor, shape in (
        ("delta", delta, (batch, rank, length)), ("B", B, (batch, d_state, length)),
        ("C", C, (batch, d_state, length)), ("D", D, (dim,)), ("z", z, (batch, dim, length)),
        ("delta_bias", delta_bias, (dim,)),
    ):
        if tensor is not None and tensor.shape != shape:
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
    delta_proj: torch.Tensor = None,
) -> torch.Tensor:
    """Selective scan on CPU tensors with numba kernels; differentiable in every tensor argument.

    Computes the same function as ``mamba_ssm``'s ``selective_scan_fn`` (module docstring) in
    float64 when ``u`` is float64 and in float32 otherwise. Memory: the output, plus (when a
    gradient is needed) the state every ``CHUNK`` steps, a quarter of ``u`` for d_state = 16.

    For inference, ``delta`` may come low-rank, as a Mamba block makes it, with the projection
    that expands it (``dt_proj.weight``): the kernel projects each channel's step sizes while it
    loads them, ``delta[b, d, t] = sum_k delta_proj[d, k] * delta_low[b, k, t]``, instead of a
    separate 1x1 convolution writing a (batch, dim, L) tensor for the scan to read back. That
    path has no backward: it raises when a gradient is needed.

    Arguments
    ---------
    u : torch.Tensor
        Input, (batch, dim, L).
    delta : torch.Tensor
        Step sizes before bias and softplus, (batch, dim, L); (batch, rank, L) with ``delta_proj``.
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
    delta_proj : torch.Tensor, optional
        (dim, rank): ``delta`` is low-rank and the step sizes are ``delta_proj @ delta`` (per
        batch element). Only where no gradient is needed (grad mode off, or no argument
        requires one); a RuntimeError otherwise.

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

    Low-rank step sizes, projected inside the kernel (inference only):

    >>> W = torch.randn(4, 2); delta_low = torch.randn(2, 2, 10)
    >>> with torch.no_grad():
    ...     y_low = selective_scan_cpu(u, delta_low, A, B, C, delta_proj=W, delta_softplus=True)
    ...     y_full = selective_scan_cpu(u, W @ delta_low, A, B, C, delta_softplus=True)
    >>> torch.allclose(y_low, y_full, atol=1e-5)
    True
    """
    if not is_available():
        raise RuntimeError("selective_scan_cpu needs numba; install it or use the 'torch' scan backend")
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    tensors = [
        t if t is None or t.dtype == dtype else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj)
    ]
    # Checkpoints only when autograd will call the backward (forward() itself runs without grad).
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    u_c, delta_c, A_c, B_c, C_c, D_c, z_c, bias_c, proj_c = tensors  # in the compute dtype
    if delta_proj is None:
        out = _SelectiveScan.apply(u_c, delta_c, A_c, B_c, C_c, D_c, z_c, bias_c, bool(delta_softplus), save_states)
        return out.to(u.dtype)
    if save_states:
        raise RuntimeError(
            "selective_scan_cpu: delta_proj has no backward; a gradient is needed here, so project "
            "delta first (delta_proj @ delta) and pass it without delta_proj, or run under torch.no_grad()"
        )
    out, _ = _forward(u_c, delta_c, proj_c, A_c, B_c, C_c, D_c, z_c, bias_c, delta_softplus, False)
    return out if u.dtype == dtype else out.to(u.dtype)
