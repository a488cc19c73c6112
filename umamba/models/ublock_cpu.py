"""Fused CPU inference path of :class:`umamba.models.umamba_net.UBlock`: numba kernels.

Everything between the U-block's two 1x1 convolutions (which PyTorch runs as matrix products,
near the CPU's peak) is memory-bound element-wise work: global layer norms (gLN,
``GroupNorm(1, C)``), PReLUs, depthwise convolutions and nearest up-sampling with additive
skips. PyTorch runs each as its own pass over the [B, H, L] activations, and its depthwise
convolution is slow at this shape. Here each pass does several of them, one channel row at a
time (in cache), in parallel over batch x channels:

- :func:`channel_stats`: per-channel mean and sum of squared deviations.
- :func:`affine_prelu_`: a per-channel affine map (a gLN once its statistics are known), then a
  PReLU, in place; optionally the statistics of the result.
- :func:`depthwise_conv`: a depthwise convolution (any kernel size, stride and zero padding)
  of ``prelu(x * scale + shift)``, so that the gLN (and PReLU) of its input costs no pass of its
  own, and the statistics of its output, which its gLN needs.
- :func:`upsample_add_`: ``skip * scale + shift + up2(coarse * scale' + shift')`` in place into
  ``skip`` (nearest up-sampling by 2, cropped to ``skip``), and the statistics of the result.
- :func:`ublock_inner`: the composition for a ``UBlock``: from the output of its first 1x1
  convolution to the input of its last one. It reads or writes the full-length activations in
  five passes (statistics; first convolution, in place; second convolution; up-sampled sum;
  last gLN and PReLU), where PyTorch's modules make about a dozen, and allocates only the
  shorter levels.

Statistics
----------
A gLN normalises each batch element by the mean and variance over all its channels and frames.
The kernels compute, for each (batch element, channel) row, the mean and the sum of squared
deviations from it (``M2``), in float64: tiles of ``TILE`` frames are summed in the input's
dtype around their own mean (two passes over a tile in L1 cache) and merged in float64 with
Chan's parallel formula; :func:`group_norm_affine` merges the channels the same way. No sum of
squares is ever subtracted from a squared sum, so a large mean costs no precision. Within
:func:`ublock_inner`, each kernel also merges the statistics of its result into the gLN's
affine map, serially after its parallel loop, rather than in a call of its own: a call and a
wake-up of the threads cost more than this [B, C] work.

Authors
 * U-Mamba-Net contributors
"""

import numpy as np
import torch

from umamba import fast_paths
from umamba.mamba.scan_cpu import (
    _array,
    _jit,
    _jit_inline,
    _jit_serial,
    _use_torch_threads,
    numba,
    prange,
)

__all__ = [
    "TILE",
    "affine_prelu_",
    "channel_stats",
    "depthwise_conv",
    "group_norm_affine",
    "is_enabled",
    "ublock_inner",
    "upsample_add_",
]

TILE = 2048
"""Frames per tile: the unit of the convolution and of the statistics (8 KiB of float32, in L1 cache)."""

PHASE_MARGIN = 4
"""Zero columns past the padded input in the convolution's phase buffer: room for the taps past
the last of a group of five, which read it with weight zero."""


def is_enabled() -> bool:
    """True when numba imports and :func:`umamba.fast_paths.module_path` is not in force:
    ``UBlock`` may use this path.

    Example
    -------
    >>> isinstance(is_enabled(), bool)
    True
    """
    return numba is not None and fast_paths.enabled()


# The kernels index 1-D views of rows and tiles from 0: numba wraps negative indices around,
# which stops vectorisation wherever LLVM cannot prove an index non-negative.


@_jit_inline
def _merge_tile_stats(tile, m, before, stats, b, c):
    """Merge ``tile[:m]``, preceded by ``before`` frames of its row, into ``stats[b, c] = (mean, M2)``.

    The tile's sums are in the dtype of ``tile``, of its values minus its first one (exact for
    values within a factor 2 of it, so that a large common offset loses no digits) and then
    around the tile's mean; the merge (Chan et al.) is in float64.
    """
    origin = tile[0]
    s = tile.dtype.type(0)
    for t in range(m):
        s += tile[t] - origin
    mean_shifted = s * tile.dtype.type(1.0 / m)
    q = tile.dtype.type(0)
    for t in range(m):
        d = (tile[t] - origin) - mean_shifted
        q += d * d
    mean_tile = np.float64(origin) + np.float64(s) / m
    if before == 0:
        stats[b, c, 0] = mean_tile
        stats[b, c, 1] = np.float64(q)
    else:
        delta = mean_tile - stats[b, c, 0]
        weight = m / (before + m)
        stats[b, c, 0] += delta * weight
        stats[b, c, 1] += np.float64(q) + delta * delta * before * weight


@_jit_inline
def _affine_prelu(value, s, h, a):
    v = value * s + h
    return v if v > 0 else a * v


@_jit
def _stats_kernel(x, stats, gamma, beta, eps, norm_scale, norm_shift, with_norm):
    batch, channels, length = x.shape
    for row in prange(batch * channels):
        b, c = row // channels, row % channels
        x_row = x[b, c]
        for t0 in range(0, length, TILE):
            _merge_tile_stats(x_row[t0:], min(TILE, length - t0), t0, stats, b, c)
    if with_norm:  # the gLN of the result, from its statistics
        _gn_affine(stats, length, gamma, beta, eps, norm_scale, norm_shift)


@_jit
def _affine_prelu_kernel(x, scale, shift, alpha, stats, with_stats, gamma, beta, eps, norm_scale, norm_shift, with_norm):
    batch, channels, length = x.shape
    for row in prange(batch * channels):
        b, c = row // channels, row % channels
        s, h, a = scale[b, c], shift[b, c], alpha[c]
        x_row = x[b, c]
        for t0 in range(0, length, TILE):
            tile = x_row[t0:]
            m = min(TILE, length - t0)
            for t in range(m):
                tile[t] = _affine_prelu(tile[t], s, h, a)
            if with_stats:
                _merge_tile_stats(tile, m, t0, stats, b, c)
    if with_norm:  # the gLN of the result, from its statistics
        _gn_affine(stats, length, gamma, beta, eps, norm_scale, norm_shift)


@_jit_inline
def _tap(weight, phases, zeros, c, j, t0, stride):
    """Weight and input run of tap ``j`` for the tile at ``t0``: ``padded[(t0 + t) * stride + j] = run[t]``;
    zero and zeros past the last tap."""
    if j < weight.shape[1]:
        return weight[c, j], phases[j % stride, t0 + j // stride:]
    return zeros[0], zeros


@_jit_inline
def _weight(weight, c, j):
    """Tap ``j`` of channel ``c``; zero past the last."""
    return weight[c, j] if j < weight.shape[1] else weight.dtype.type(0)


@_jit_inline
def _conv_row(x, scale, shift, alpha, weight, bias, stride, padding, out, stats, b, c, phases, zeros):
    """Row ``[b, c]`` of :func:`_depthwise_conv_kernel`, with its buffers: ``phases`` (stride, n_phase),
    ``PHASE_MARGIN`` columns longer than the padded row, and ``zeros`` (TILE)."""
    length, out_length, n_phase = x.shape[2], out.shape[2], phases.shape[1]
    s, h, a, bias_c = scale[b, c], shift[b, c], alpha[c], bias[c]
    x_row, out_row = x[b, c], out[b, c]
    # The mapped, zero-padded input row, split into its stride phases: phases[r, i] =
    # padded[i * stride + r], so that each tap reads a contiguous run. Filled before out_row is
    # written: out may be x (stride 1).
    for q in range(padding):
        phases[q % stride, q // stride] = 0
    for q in range(padding + length, stride * n_phase):
        phases[q % stride, q // stride] = 0
    if stride == 1:
        dst = phases[0, padding:]
        for t in range(length):
            dst[t] = _affine_prelu(x_row[t], s, h, a)
    elif stride == 2:
        even = phases[padding % 2, padding // 2:]  # x_row[2 i] lands at padded[2 i + padding]
        odd = phases[(padding + 1) % 2, (padding + 1) // 2:]
        for i in range(length // 2):
            even[i] = _affine_prelu(x_row[2 * i], s, h, a)
            odd[i] = _affine_prelu(x_row[2 * i + 1], s, h, a)
        if length % 2:
            even[length // 2] = _affine_prelu(x_row[length - 1], s, h, a)
    else:
        for t in range(length):
            q = t + padding
            phases[q % stride, q // stride] = _affine_prelu(x_row[t], s, h, a)
    for t0 in range(0, out_length, TILE):
        m = min(TILE, out_length - t0)
        tile = out_row[t0:]
        # Five taps per pass over the tile (kernel size 5 in one), accumulated in registers. At
        # strides 1 and 2 they read one or two phase runs at constant offsets (taps past the last
        # have weight zero and read the zeros of the margin); otherwise a run per tap.
        for j in range(0, weight.shape[1], 5):
            if stride <= 2:
                w0, w1, w2 = _weight(weight, c, j), _weight(weight, c, j + 1), _weight(weight, c, j + 2)
                w3, w4 = _weight(weight, c, j + 3), _weight(weight, c, j + 4)
                if stride == 1:
                    r = phases[0, t0 + j:]
                    if j == 0:
                        for t in range(m):
                            tile[t] = bias_c + w0 * r[t] + w1 * r[t + 1] + w2 * r[t + 2] + w3 * r[t + 3] + w4 * r[t + 4]
                    else:
                        for t in range(m):
                            tile[t] += w0 * r[t] + w1 * r[t + 1] + w2 * r[t + 2] + w3 * r[t + 3] + w4 * r[t + 4]
                else:  # tap j + k reads padded[2 (t0 + t) + j + k] = phases[(j + k) % 2, t0 + t + (j + k) // 2]
                    p = phases[j % 2, t0 + j // 2:]
                    q = phases[1 - j % 2, t0 + j // 2 + j % 2:]
                    if j == 0:
                        for t in range(m):
                            tile[t] = bias_c + w0 * p[t] + w1 * q[t] + w2 * p[t + 1] + w3 * q[t + 1] + w4 * p[t + 2]
                    else:
                        for t in range(m):
                            tile[t] += w0 * p[t] + w1 * q[t] + w2 * p[t + 1] + w3 * q[t + 1] + w4 * p[t + 2]
                continue
            w0, r0 = _tap(weight, phases, zeros, c, j, t0, stride)
            w1, r1 = _tap(weight, phases, zeros, c, j + 1, t0, stride)
            w2, r2 = _tap(weight, phases, zeros, c, j + 2, t0, stride)
            w3, r3 = _tap(weight, phases, zeros, c, j + 3, t0, stride)
            w4, r4 = _tap(weight, phases, zeros, c, j + 4, t0, stride)
            if j == 0:
                for t in range(m):
                    tile[t] = bias_c + w0 * r0[t] + w1 * r1[t] + w2 * r2[t] + w3 * r3[t] + w4 * r4[t]
            else:
                for t in range(m):
                    tile[t] += w0 * r0[t] + w1 * r1[t] + w2 * r2[t] + w3 * r3[t] + w4 * r4[t]
        _merge_tile_stats(tile, m, t0, stats, b, c)


@_jit
def _depthwise_conv_kernel(x, scale, shift, alpha, weight, bias, stride, padding, out, stats, tasks, gamma, beta, eps, norm_scale, norm_shift, with_norm):
    batch, channels, length = x.shape
    n_phase = (length + 2 * padding + stride - 1) // stride + PHASE_MARGIN
    rows = batch * channels
    for task in prange(tasks):  # one task per thread, which allocates its buffers once
        phases = np.empty((stride, n_phase), dtype=x.dtype)
        zeros = np.zeros(TILE, dtype=x.dtype)
        for row in range(task * rows // tasks, (task + 1) * rows // tasks):
            _conv_row(x, scale, shift, alpha, weight, bias, stride, padding, out, stats,
                      row // channels, row % channels, phases, zeros)
    if with_norm:  # the gLN of the result, from its statistics
        _gn_affine(stats, out.shape[2], gamma, beta, eps, norm_scale, norm_shift)


@_jit
def _upsample_add_kernel(skip, skip_scale, skip_shift, coarse, coarse_scale, coarse_shift, stats, gamma, beta, eps, norm_scale, norm_shift, with_norm):
    batch, channels, length = skip.shape
    for row in prange(batch * channels):
        b, c = row // channels, row % channels
        s, h = skip_scale[b, c], skip_shift[b, c]
        cs, ch = coarse_scale[b, c], coarse_shift[b, c]
        skip_row, coarse_row = skip[b, c], coarse[b, c]
        for t0 in range(0, length, TILE):  # TILE is even: tiles start at even frames
            m = min(TILE, length - t0)
            tile, coarse_tile = skip_row[t0:], coarse_row[t0 // 2:]
            for i in range(m // 2):
                v = coarse_tile[i] * cs + ch
                tile[2 * i] = tile[2 * i] * s + h + v
                tile[2 * i + 1] = tile[2 * i + 1] * s + h + v
            if m % 2:
                tile[m - 1] = tile[m - 1] * s + h + coarse_tile[m // 2] * cs + ch
            _merge_tile_stats(tile, m, t0, stats, b, c)
    if with_norm:  # the gLN of the result, from its statistics
        _gn_affine(stats, length, gamma, beta, eps, norm_scale, norm_shift)


@_jit_inline
def _gn_affine(stats, length, gamma, beta, eps, scale, shift):
    """``scale, shift`` [B, C] of ``GroupNorm(1, C)`` from ``stats`` (see :func:`group_norm_affine`),
    serially: a few thousand operations, less than waking the threads."""
    batch, channels = stats.shape[0], stats.shape[1]
    for b in range(batch):
        mean = 0.0
        for c in range(channels):
            mean += stats[b, c, 0]
        mean /= channels
        m2 = 0.0
        for c in range(channels):
            d = stats[b, c, 0] - mean
            m2 += stats[b, c, 1] + length * d * d
        inv_std = 1.0 / np.sqrt(m2 / (channels * length) + eps)
        for c in range(channels):
            g = np.float64(gamma[c]) * inv_std
            scale[b, c] = g
            shift[b, c] = np.float64(beta[c]) - mean * g


@_jit_serial
def _group_norm_affine_kernel(stats, length, gamma, beta, eps, scale, shift):
    _gn_affine(stats, length, gamma, beta, eps, scale, shift)


def _new_stats(batch: int, channels: int) -> np.ndarray:
    return np.empty((batch, channels, 2), dtype=np.float64)


def _per_channel(value, channels: int, dtype, default=1.0) -> np.ndarray:
    """``value`` (None for ``default``, a scalar, or a tensor/array of 1 or ``channels`` values) as ``channels`` values.

    ``channels`` contiguous values of ``dtype`` (a parameter of the module's dtype) come back as
    they are, without a copy: the kernels only read them.
    """
    if value is None:
        return np.full(channels, default, dtype=dtype)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    value = np.asarray(value, dtype=dtype)
    if value.shape == (channels,) and value.flags.c_contiguous:
        return value
    if value.size == 1:
        return np.full(channels, value.reshape(-1)[0], dtype=dtype)
    return np.array(np.broadcast_to(value.reshape(-1), (channels,)))


_NO_NORM = {}


def _no_norm(dtype):
    """The arguments of a kernel's gLN tail when it computes none: ``(gamma, beta, eps, scale, shift, False)``."""
    dtype = np.dtype(dtype)
    if dtype not in _NO_NORM:
        values, rows = np.empty(0, dtype), np.empty((0, 0), dtype)
        _NO_NORM[dtype] = (values, values, 0.0, rows, rows, False)
    return _NO_NORM[dtype]


def _norm_args(norm, batch: int, channels: int, dtype):
    """The arguments of a kernel's gLN tail for an ``nn.GroupNorm(1, C)`` module: ``(gamma, beta,
    eps, scale, shift, True)``, where the kernel writes the [B, C] ``scale`` and ``shift``."""
    return (
        _per_channel(norm.weight, channels, dtype), _per_channel(norm.bias, channels, dtype, 0.0), float(norm.eps),
        np.empty((batch, channels), dtype=dtype), np.empty((batch, channels), dtype=dtype), True,
    )


def _identity(batch: int, channels: int, dtype):
    return np.ones((batch, channels), dtype=dtype), np.zeros((batch, channels), dtype=dtype)


def channel_stats(x: np.ndarray) -> np.ndarray:
    """Per-row statistics of a contiguous [B, C, L] array: ``[B, C, 2]`` float64 (mean, sum of squared deviations).

    Example
    -------
    >>> x = np.arange(12, dtype=np.float32).reshape(1, 2, 6)
    >>> channel_stats(x)[0]
    array([[ 2.5, 17.5],
           [ 8.5, 17.5]])
    """
    _use_torch_threads()
    stats = _new_stats(*x.shape[:2])
    _stats_kernel(x, stats, *_no_norm(x.dtype))
    return stats


def group_norm_affine(stats: np.ndarray, length: int, gamma, beta, eps: float, dtype=np.float32):
    """The per-row ``(scale, shift)``, each [B, C], of ``GroupNorm(1, C)`` from :func:`channel_stats`.

    ``GroupNorm(1, C)(x)[b, c] == x[b, c] * scale[b, c] + shift[b, c]``: the statistics are merged
    over channels in float64, the biased variance as PyTorch. ``gamma`` and ``beta`` are C values
    (tensors or arrays), or None for ones and zeros (``affine=False``).

    Example
    -------
    >>> x = np.arange(12, dtype=np.float32).reshape(1, 2, 6)
    >>> scale, shift = group_norm_affine(channel_stats(x), 6, np.ones(2), np.zeros(2), 0.0)
    >>> np.round(x * scale[..., None] + shift[..., None], 2)[0, 0]
    array([-1.59, -1.3 , -1.01, -0.72, -0.43, -0.14], dtype=float32)
    """
    batch, channels = stats.shape[:2]
    scale, shift = np.empty((batch, channels), dtype=dtype), np.empty((batch, channels), dtype=dtype)
    _group_norm_affine_kernel(
        stats, length, _per_channel(gamma, channels, np.float64), _per_channel(beta, channels, np.float64, 0.0),
        float(eps), scale, shift,
    )
    return scale, shift


def affine_prelu_(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, alpha=None, with_stats: bool = False):
    """``x = prelu(x * scale[..., None] + shift[..., None], alpha)`` in place on a contiguous [B, C, L] array.

    ``alpha`` is the PReLU weight: None (no PReLU), a scalar, or 1 or C values. Returns the
    statistics of the result (as :func:`channel_stats`) when ``with_stats``, else None.

    Example
    -------
    >>> x = np.array([[[-2.0, 1.0]]], dtype=np.float32)
    >>> _ = affine_prelu_(x, np.full((1, 1), 2, np.float32), np.zeros((1, 1), np.float32), alpha=0.25)
    >>> x
    array([[[-1.,  2.]]], dtype=float32)
    """
    _use_torch_threads()
    batch, channels = x.shape[:2]
    stats = _new_stats(batch, channels)
    _affine_prelu_kernel(x, scale, shift, _per_channel(alpha, channels, x.dtype), stats, with_stats, *_no_norm(x.dtype))
    return stats if with_stats else None


def depthwise_conv(x, weight, bias, stride=1, padding=0, scale=None, shift=None, alpha=None, out=None):
    """Depthwise ``conv1d(prelu(x * scale + shift, alpha))`` of a contiguous [B, C, L] array, and its statistics.

    Arguments
    ---------
    x : np.ndarray
        [B, C, L], C-contiguous, float32 or float64.
    weight : np.ndarray
        [C, K] (or [C, 1, K], as ``nn.Conv1d(C, C, K, groups=C).weight``).
    bias : np.ndarray or None
        [C]; None for none.
    stride, padding : int
        As ``nn.Conv1d`` (zero padding of the mapped input).
    scale, shift : np.ndarray or None
        [B, C] affine map of the input (a gLN); None for none.
    alpha : None, float or np.ndarray
        PReLU weight applied after the affine map (1 or C values); None for none.
    out : np.ndarray or None
        [B, C, L_out] output; may be ``x`` itself when ``L_out == L``.

    Returns
    -------
    out, stats
        The convolution's output and its statistics (as :func:`channel_stats`).

    Example
    -------
    >>> x = np.array([[[1, 2, 3, 4, 5]]], dtype=np.float32)
    >>> out, _ = depthwise_conv(x, np.array([[1, 0, -1]], np.float32), np.zeros(1, np.float32), 2, 1)
    >>> out
    array([[[-2., -2.,  4.]]], dtype=float32)
    """
    threads = _use_torch_threads()
    batch, channels, length = x.shape
    weight = np.ascontiguousarray(weight.reshape(channels, -1), dtype=x.dtype)
    out_length = (length + 2 * padding - weight.shape[1]) // stride + 1
    if out is None:
        out = np.empty((batch, channels, out_length), dtype=x.dtype)
    if out.shape != (batch, channels, out_length) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {(batch, channels, out_length)} array, got {out.shape}")
    if scale is None:
        scale, shift = _identity(batch, channels, x.dtype)
    stats = _new_stats(batch, channels)
    _depthwise_conv_kernel(
        x, scale, shift, _per_channel(alpha, channels, x.dtype), weight,
        _per_channel(bias, channels, x.dtype, 0.0), stride, padding, out, stats, max(1, min(threads, batch * channels)),
        *_no_norm(x.dtype),
    )
    return out, stats


def upsample_add_(skip, coarse, skip_affine=None, coarse_affine=None):
    """``skip = skip * s + h + up2(coarse * s' + h')[..., :L]`` in place, with nearest up-sampling by 2.

    ``skip`` is [B, C, L] and ``coarse`` [B, C, ceil(L / 2)], both C-contiguous; the affine maps
    ``(scale, shift)`` are [B, C] each, or None for the identity. Returns the statistics of the
    result (as :func:`channel_stats`).

    Example
    -------
    >>> skip = np.zeros((1, 1, 5), np.float32)
    >>> _ = upsample_add_(skip, np.array([[[1, 2, 3]]], np.float32))
    >>> skip
    array([[[1., 1., 2., 2., 3.]]], dtype=float32)
    """
    _use_torch_threads()
    batch, channels, length = skip.shape
    if coarse.shape != (batch, channels, (length + 1) // 2):
        raise ValueError(f"coarse must be {(batch, channels, (length + 1) // 2)}, got {coarse.shape}")
    skip_affine = skip_affine or _identity(batch, channels, skip.dtype)
    coarse_affine = coarse_affine or _identity(batch, channels, skip.dtype)
    stats = _new_stats(batch, channels)
    _upsample_add_kernel(skip, *skip_affine, coarse, *coarse_affine, stats, *_no_norm(skip.dtype))
    return stats


def ublock_inner(block, a: torch.Tensor) -> torch.Tensor:
    """A ``UBlock`` from the output of its first 1x1 convolution to the input of its last one.

    ``block.proj_out[2](ublock_inner(block, block.proj_in[0](x)))`` is ``block(x) - x``, for a
    block with ``upsampling="nearest"``. ``a`` ([B, H, L], float32 or float64) is
    overwritten and returned (when contiguous): its full-length array holds the first level,
    then the sum of all levels. Inference only: nothing is recorded for autograd.

    Example
    -------
    >>> from umamba.fast_paths import module_path
    >>> from umamba.models import UBlock
    >>> block = UBlock(channels=4, hidden=8, depth=3)
    >>> x = torch.randn(2, 4, 11)
    >>> with torch.no_grad():
    ...     fused = block.proj_out[2](ublock_inner(block, block.proj_in[0](x)))
    ...     with module_path():
    ...         reference = block(x) - x
    >>> torch.allclose(fused, reference, atol=1e-5)
    True
    """
    if block.upsampling != "nearest":
        raise ValueError(f"the fused path needs nearest up-sampling, got {block.upsampling!r}")
    # The kernels are called directly, with every parameter as it is (no copy when of the input's
    # dtype); each computes the gLN affine map of its result after its parallel loop, on the main
    # thread, so that the [B, C] work costs no call or thread wake-up of its own.
    with torch.no_grad():
        a = a.contiguous()
        x = _array(a)
        batch, channels, length = x.shape
        dtype = x.dtype
        threads = _use_torch_threads()
        tasks = max(1, min(threads, batch * channels))
        ones = np.ones(channels, dtype=dtype)
        # proj_in's gLN and PReLU, applied while the first depthwise convolution reads its input.
        norm = _norm_args(block.proj_in[1], batch, channels, dtype)
        stats = _new_stats(batch, channels)
        _stats_kernel(x, stats, *norm)
        affine, alpha = norm[3:5], _per_channel(block.proj_in[2].weight, channels, dtype)
        levels, affines = [], []
        for conv, gln in block.down:
            stride, padding = conv.stride[0], conv.padding[0]
            weight = np.ascontiguousarray(_array(conv.weight).reshape(channels, -1), dtype=dtype)
            out_length = (x.shape[2] + 2 * padding - weight.shape[1]) // stride + 1
            # the first level overwrites a
            out = x if not levels and out_length == x.shape[2] and stride == 1 else None
            if out is None:
                out = np.empty((batch, channels, out_length), dtype=dtype)
            norm = _norm_args(gln, batch, channels, dtype)
            stats = _new_stats(batch, channels)
            _depthwise_conv_kernel(
                x, *affine, alpha, weight, _per_channel(conv.bias, channels, dtype, 0.0), stride, padding, out, stats,
                tasks, *norm,
            )
            x, affine, alpha = out, norm[3:5], ones
            levels.append(x)
            affines.append(affine)
        # Up: each level (its gLN applied on the fly) plus the up-sampled sum of the ones below it;
        # the last sum's kernel computes proj_out's gLN.
        out_norm = _norm_args(block.proj_out[0], batch, channels, dtype)
        coarse, coarse_affine = levels.pop(), affines.pop()
        identity = _identity(batch, channels, dtype) if levels else None
        while levels:
            skip = levels.pop()
            if coarse.shape[2] != (skip.shape[2] + 1) // 2:
                raise ValueError(f"level of {coarse.shape[2]} frames below one of {skip.shape[2]}")
            stats = _new_stats(batch, channels)
            _upsample_add_kernel(
                skip, *affines.pop(), coarse, *(coarse_affine or identity), stats,
                *(out_norm if not levels else _no_norm(dtype)),
            )
            coarse, coarse_affine = skip, None
        if coarse_affine is not None:  # depth 1: the level's gLN is still to be applied
            _affine_prelu_kernel(coarse, *coarse_affine, ones, stats, True, *out_norm)
        # proj_out's gLN and PReLU, in place.
        _affine_prelu_kernel(
            coarse, *out_norm[3:5], _per_channel(block.proj_out[1].weight, channels, dtype), stats, False,
            *_no_norm(dtype),
        )
        return torch.from_numpy(coarse)
