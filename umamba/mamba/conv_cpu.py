"""The Mamba block's causal depthwise convolution and SiLU in one CPU pass (numba), for inference.

``silu(conv1d(x)[..., :L])`` with ``conv1d`` a depthwise ``nn.Conv1d`` of kernel ``K`` and
padding ``K - 1``, as :class:`umamba.mamba.Mamba` computes it. PyTorch takes a oneDNN path
for this shape that needs 2.7 ms for (1, 256, 8000) on 2 threads, plus 0.5 ms for the SiLU; this
kernel reads each channel row once and writes it once (all of ``d_conv = 4`` taps in one pass):
0.7 ms. It is used where no gradient is needed; training keeps the PyTorch modules (and their
autograd).

Authors
 * U-Mamba-Net contributors
"""

import torch
import torch.nn as nn

from umamba import fast_paths
from umamba.mamba.scan_cpu import _array, _exp, _jit, _use_torch_threads, numba, prange

__all__ = ["applies", "causal_conv1d_silu"]


@_jit
def _causal_conv_silu_kernel(x, weight, bias, out):
    """out[b, d, t] = silu(bias[d] + sum_k weight[d, k] * x[b, d, t - (K - 1) + k]), zeros before t = 0.

    One row (b, d) per task, through 1-D views with non-negative indices only, so that every
    loop over time vectorises (no negative-index wrap-around to handle).
    """
    batch, dim, length = x.shape
    kernel = weight.shape[1]
    one = x.dtype.type(1)
    for task in prange(batch * dim):
        b, d = task // dim, task % dim
        x_row, out_row = x[b, d], out[b, d]
        bias_d, w_now = bias[d], weight[d, kernel - 1]
        if kernel == 4 and length > 3:  # Mamba's d_conv: the four taps in one pass
            w0, w1, w2 = weight[d, 0], weight[d, 1], weight[d, 2]
            x0, x1, x2, x3 = x_row[: length - 3], x_row[1 : length - 2], x_row[2 : length - 1], x_row[3:]
            dst = out_row[3:]
            for t in range(length - 3):
                dst[t] = bias_d + w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w_now * x3[t]
            out_row[0] = bias_d + w_now * x_row[0]
            out_row[1] = bias_d + w2 * x_row[0] + w_now * x_row[1]
            out_row[2] = bias_d + w1 * x_row[0] + w2 * x_row[1] + w_now * x_row[2]
        else:
            for t in range(length):  # the tap on the present frame
                out_row[t] = bias_d + w_now * x_row[t]
            for shift in range(1, min(kernel, length)):  # the taps `shift` frames back
                w = weight[d, kernel - 1 - shift]
                src, dst = x_row[: length - shift], out_row[shift:]
                for t in range(length - shift):
                    dst[t] += w * src[t]
        for t in range(length):
            a = out_row[t]
            out_row[t] = a / (one + _exp(-a))


def applies(conv1d: nn.Conv1d, x: torch.Tensor) -> bool:
    """True where :func:`causal_conv1d_silu` can stand in for ``silu(conv1d(x)[..., :L])``.

    numba imports, :func:`umamba.fast_paths.may_stand_in` allows it (CPU float32 inference, no
    hooks on ``conv1d``: MAC counters and profilers see the module called), and ``conv1d`` is
    depthwise, stride 1, padding ``K - 1``.

    Example
    -------
    >>> conv = nn.Conv1d(8, 8, 4, groups=8, padding=3)
    >>> with torch.no_grad():
    ...     applies(conv, torch.randn(1, 8, 5)) == (numba is not None)
    True
    >>> applies(conv, torch.randn(1, 8, 5))  # the weights need a gradient
    False
    """
    return (
        numba is not None
        and fast_paths.may_stand_in(x, [conv1d])
        and conv1d.groups == conv1d.in_channels == conv1d.out_channels
        and conv1d.stride == (1,)
        and conv1d.dilation == (1,)
        and conv1d.padding == (conv1d.kernel_size[0] - 1,)
    )


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu`` of the causal depthwise convolution of ``x`` (b, d, l) with ``weight`` (d, 1, k).

    Example
    -------
    >>> import torch.nn.functional as F
    >>> x, w, b = torch.randn(2, 8, 50), torch.randn(8, 1, 4), torch.randn(8)
    >>> reference = F.silu(F.conv1d(x, w, b, padding=3, groups=8)[..., :50])
    >>> torch.allclose(causal_conv1d_silu(x, w, b), reference, atol=1e-5)
    True
    """
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=x.dtype)
    out = torch.empty(x.shape, dtype=x.dtype)
    _use_torch_threads()
    _causal_conv_silu_kernel(_array(x), _array(weight[:, 0, :]), _array(bias), out.numpy())
    return out
