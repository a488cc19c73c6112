"""LayerNorm over the channels of channel-first activations, in one CPU pass (numba), for inference.

:class:`umamba.models.umamba_net.MambaLayer` normalises each frame of a [B, F, L] tensor over
its F channels. PyTorch's ``nn.LayerNorm`` wants the channels last, so the module path
transposes, normalises, and hands a transposed (non-contiguous) view to the next 1x1
convolution, which copies it again: about 0.9 ms per layer for (1, 128, 7998) on 2 threads,
timed inside the model. This kernel reads each tile of ``TILE`` frames once (all channels, in
cache), and writes the normalised tile once, channel-first and contiguous.

The statistics are those of ``nn.LayerNorm`` (biased variance, ``eps`` inside the square
root), computed in two passes over the cached tile: the mean, summed as deviations from the
frame's first channel, then the squared deviations from the mean. No large sum is ever formed,
so a large mean costs no precision.

Authors
 * U-Mamba-Net contributors
"""

import numpy as np
import torch
import torch.nn as nn

from umamba import fast_paths
from umamba.mamba.scan_cpu import _array, _jit, _use_torch_threads, numba, prange

__all__ = ["TILE", "applies", "layer_norm_channels"]

TILE = 64
"""Frames per tile: F x TILE values (32 KiB for F = 128 in float32) stay in cache for the three passes."""


@_jit
def _layer_norm_kernel(x, weight, bias, eps, out):
    """out[b, :, t] = (x[b, :, t] - mean) / sqrt(var + eps) * weight + bias, per frame (b, t)."""
    batch, channels, length = x.shape
    n_tiles = (length + TILE - 1) // TILE
    inv_c = 1.0 / channels
    for task in prange(batch * n_tiles):
        b, t0 = task // n_tiles, (task % n_tiles) * TILE
        steps = min(TILE, length - t0)
        total = np.zeros(TILE, dtype=np.float64)  # sums in float64: no rounding worth the name
        mean = np.zeros(TILE, dtype=x.dtype)
        scale = np.zeros(TILE, dtype=x.dtype)
        first = x[b, 0, t0 : t0 + steps]
        for c in range(1, channels):  # pass 1: the mean of each frame, summed around its first value
            row = x[b, c, t0 : t0 + steps]
            for t in range(steps):
                total[t] += row[t] - first[t]
        for t in range(steps):
            mean[t] = first[t] + total[t] * inv_c
            total[t] = 0.0
        for c in range(channels):  # pass 2: the squared deviations
            row = x[b, c, t0 : t0 + steps]
            for t in range(steps):
                dev = np.float64(row[t] - mean[t])
                total[t] += dev * dev
        for t in range(steps):
            scale[t] = 1.0 / np.sqrt(total[t] * inv_c + eps)
        for c in range(channels):  # pass 3: normalise, scale and shift
            row, dst = x[b, c, t0 : t0 + steps], out[b, c, t0 : t0 + steps]
            w, h = weight[c], bias[c]
            for t in range(steps):
                dst[t] = (row[t] - mean[t]) * scale[t] * w + h


def applies(norm: nn.LayerNorm, x: torch.Tensor) -> bool:
    """True where :func:`layer_norm_channels` may stand in for ``norm`` over the channels of ``x``.

    numba imports, :func:`umamba.fast_paths.may_stand_in` allows it (CPU float32 inference, no
    hooks on ``norm``), ``x`` is [B, C, L] and ``norm`` normalises C values with an affine map.

    Example
    -------
    >>> norm = nn.LayerNorm(8)
    >>> with torch.no_grad():
    ...     applies(norm, torch.randn(1, 8, 5)) == (numba is not None)
    True
    >>> applies(norm, torch.randn(1, 8, 5))  # the weights need a gradient
    False
    """
    return (
        numba is not None
        and x.dim() == 3
        and fast_paths.may_stand_in(x, [norm])
        and norm.normalized_shape == (x.shape[1],)
        and norm.weight is not None
        and norm.bias is not None
    )


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``nn.LayerNorm`` over dimension 1 of ``x`` [B, C, L]: a new contiguous [B, C, L] tensor.

    Example
    -------
    >>> import torch.nn.functional as F
    >>> x, w, b = torch.randn(2, 8, 50), torch.randn(8), torch.randn(8)
    >>> reference = F.layer_norm(x.transpose(1, 2), (8,), w, b, 1e-5).transpose(1, 2)
    >>> torch.allclose(layer_norm_channels(x, w, b, 1e-5), reference, atol=1e-5)
    True
    """
    out = torch.empty(x.shape, dtype=x.dtype)
    array = _array(x)
    _use_torch_threads()
    _layer_norm_kernel(array, _array(weight), _array(bias), array.dtype.type(eps), out.numpy())
    return out
