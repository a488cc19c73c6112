"""U-Mamba-Net masknet: U-Net blocks that each end in a Mamba "feature filter".

The paper (Dang et al., APSIPA ASC 2024, arXiv 2412.18217) publishes no code. This module is a
reconstruction that fits every published fact (see README, "Model"): SuDoRM-RF's improved
U-ConvBlock with a pre-norm residual Mamba layer after each block.

It is a SpeechBrain masknet: input the encoder output [B, N, L], output one mask per source
[n_src, B, N, L], so it plugs into the encoder/masknet/decoder triplet of SpeechBrain's
separation recipes next to ``Dual_Path_Model`` (SepFormer, DPRNN).

Shapes (B batch, N encoder filters, F feature width, H U-Net width, L frames)::

    [B, N, L] --gLN + 1x1 conv--> [B, F, L]
      R x ( UBlock: [B, F, L] -> [B, F, L]   (residual U-Net, H channels inside, L, L/2, L/4, ...)
            MambaLayer: [B, F, L] -> [B, F, L]   (x + Mamba(LayerNorm(x)), over time) )
    --PReLU + 1x1 conv--> [B, n_src * N, L] --activation--> [n_src, B, N, L]
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from umamba import fast_paths
from umamba.mamba import Mamba
from umamba.models import layer_norm_cpu


def global_layer_norm(channels: int) -> nn.GroupNorm:
    """Global layer norm (gLN, Conv-TasNet): statistics over channels and time, affine per channel."""
    return nn.GroupNorm(1, channels, eps=1e-8)


class UBlock(nn.Module):
    """SuDoRM-RF "improved" U-ConvBlock: a residual 1-D U-Net with additive skips.

    ``depth`` depthwise convolutions (the first with stride 1, the others stride 2) go down;
    each level is up-sampled by 2 and added to the level above it; a 1x1 convolution returns
    to ``channels`` and the input is added back.

    Arguments
    ---------
    channels : int
        Input/output width ``F``.
    hidden : int
        Width inside the U-Net ``H``.
    depth : int
        Number of down-sampling levels (the first at stride 1), ``L`` in the paper.
    kernel_size : int
        Kernel of the depthwise convolutions.
    upsampling : str
        "nearest", "linear" or "transposed" (a learned depthwise transposed convolution).

    CPU float32 inference with nearest up-sampling runs everything between the two 1x1
    convolutions in fused numba kernels (:mod:`umamba.models.ublock_cpu`), unless numba is
    missing, :func:`umamba.fast_paths.module_path` is in force or a sub-module has a
    forward hook; the results are the same up to float32 rounding. Otherwise, and whenever a
    gradient is needed, the modules run.

    Example
    -------
    >>> block = UBlock(channels=8, hidden=16, depth=3)
    >>> block(torch.randn(2, 8, 13)).shape
    torch.Size([2, 8, 13])
    """

    def __init__(self, channels=128, hidden=512, depth=4, kernel_size=5, upsampling="nearest"):
        super().__init__()
        if upsampling not in ("nearest", "linear", "transposed"):
            raise ValueError(f"upsampling must be nearest, linear or transposed, got {upsampling!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.upsampling = upsampling
        self.proj_in = nn.Sequential(nn.Conv1d(channels, hidden, 1), global_layer_norm(hidden), nn.PReLU())
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(
                    hidden,
                    hidden,
                    kernel_size,
                    stride=1 if level == 0 else 2,
                    padding=kernel_size // 2,
                    groups=hidden,
                ),
                global_layer_norm(hidden),
            )
            for level in range(depth)
        )
        if upsampling == "transposed":
            self.up = nn.ModuleList(
                nn.ConvTranspose1d(hidden, hidden, 4, stride=2, padding=1, groups=hidden)
                for _ in range(depth - 1)
            )
        self.proj_out = nn.Sequential(global_layer_norm(hidden), nn.PReLU(), nn.Conv1d(hidden, channels, 1))

    def _upsample(self, x, level, length):
        """Double the time resolution of ``x`` and crop it to ``length`` frames."""
        if self.upsampling == "transposed":
            x = self.up[level](x)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode=self.upsampling)
        return x[..., :length]

    def _fused_cpu(self, x) -> bool:
        """Whether :meth:`forward` may run :mod:`umamba.models.ublock_cpu`'s numba kernels on ``x``:
        CPU float32 inference with nearest up-sampling, outside tracing and compilation, with no
        hooks on the modules that it bypasses (MAC counters and profilers see them called)."""
        bypassed = [m for m in self.modules() if m is not self]
        if self.upsampling != "nearest" or not fast_paths.may_stand_in(x, bypassed):
            return False
        # numba is imported on the first CPU inference
        from umamba.models import ublock_cpu

        return ublock_cpu.is_enabled()

    def forward(self, x):
        """[B, F, L] -> [B, F, L]."""
        if self._fused_cpu(x):
            from umamba.models.ublock_cpu import ublock_inner

            # no hooks on proj_out[2] (checked above): its output can take the residual in place
            return self.proj_out[2](ublock_inner(self, self.proj_in[0](x))).add_(x)
        levels = [self.down[0](self.proj_in(x))]  # [B, H, L]
        for conv in self.down[1:]:
            levels.append(conv(levels[-1]))  # [B, H, ceil(L / 2^k)]
        out = levels.pop()
        while levels:
            skip = levels.pop()
            out = skip + self._upsample(out, len(levels), skip.shape[-1])
        return x + self.proj_out(out)


class MambaLayer(nn.Module):
    """Pre-norm residual Mamba over time on channel-first features: ``x + Mamba(LayerNorm(x))``.

    CPU float32 inference normalises channel-first in one pass (:mod:`umamba.models.layer_norm_cpu`)
    and adds the residual in place, unless :func:`umamba.fast_paths.module_path` is in force or
    the modules have hooks.

    Arguments
    ---------
    channels : int
        Feature width ``F`` (Mamba's ``d_model``).
    **mamba_kwargs
        Passed to :class:`umamba.mamba.Mamba` (d_state, d_conv, expand, bidirectional, backend).

    Example
    -------
    >>> layer = MambaLayer(8, d_state=4, backend="torch")
    >>> layer(torch.randn(2, 8, 11)).shape
    torch.Size([2, 8, 11])
    """

    def __init__(self, channels, **mamba_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(d_model=channels, **mamba_kwargs)

    def forward(self, x):
        """[B, F, L] -> [B, F, L]."""
        if layer_norm_cpu.applies(self.norm, x):  # CPU inference: one pass, channel-first
            h = layer_norm_cpu.layer_norm_channels(x, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            h = self.norm(x.transpose(1, 2)).transpose(1, 2)  # LayerNorm over F for each frame
        out = self.mamba(h, channels_first=True)
        if fast_paths.may_stand_in(out, [self.mamba]):  # inference, nobody hooked on out: add in place
            return out.add_(x)
        return x + out


MASK_ACTIVATIONS = {  # on [B, n_src, N, L]; in place when no gradient is needed
    "relu": lambda m, inplace: F.relu(m, inplace=inplace),
    "sigmoid": lambda m, inplace: m.sigmoid_() if inplace else m.sigmoid(),
    "softmax": lambda m, inplace: torch.softmax(m, dim=1),  # over sources
    "linear": lambda m, inplace: m,
}


class UMambaMaskNet(nn.Module):
    """U-Mamba-Net mask estimator for SpeechBrain's encoder/masknet/decoder triplet.

    Arguments
    ---------
    in_channels : int
        Encoder filters ``N`` (channels of the encoder output).
    out_channels : int
        Feature width ``F`` of the U-Mamba blocks (the paper's F; 128 by default).
    hidden_channels : int
        Width ``H`` inside each U-Net.
    num_blocks : int
        Number of U-Mamba blocks ``R``.
    upsampling_depth : int
        Levels of each U-Net (``L``; the first at stride 1).
    kernel_size : int
        Kernel of the U-Net's depthwise convolutions.
    upsampling : str
        "nearest", "linear" or "transposed".
    num_spks : int
        Number of sources ``n_src`` (one mask each).
    use_mamba : bool
        False removes every Mamba layer: the model is then SuDoRM-RF (the ablation baseline).
    d_state, d_conv, expand, bidirectional, backend
        Mamba settings, see :class:`umamba.mamba.Mamba`.
    mask_activation : str
        "relu", "sigmoid", "softmax" (over sources) or "linear".

    Example
    -------
    >>> net = UMambaMaskNet(in_channels=16, out_channels=8, hidden_channels=16, num_blocks=2,
    ...                     upsampling_depth=3, d_state=4, backend="torch")
    >>> net(torch.randn(3, 16, 21)).shape
    torch.Size([2, 3, 16, 21])
    """

    def __init__(
        self,
        in_channels=512,
        out_channels=128,
        hidden_channels=512,
        num_blocks=8,
        upsampling_depth=4,
        kernel_size=5,
        upsampling="nearest",
        num_spks=2,
        use_mamba=True,
        d_state=16,
        d_conv=4,
        expand=2,
        bidirectional=False,
        backend="auto",
        mask_activation="relu",
    ):
        super().__init__()
        if mask_activation not in MASK_ACTIVATIONS:
            raise ValueError(f"mask_activation must be one of {sorted(MASK_ACTIVATIONS)}, got {mask_activation!r}")
        self.in_channels = in_channels
        self.num_spks = num_spks
        self.mask_activation = mask_activation
        self.bottleneck = nn.Sequential(global_layer_norm(in_channels), nn.Conv1d(in_channels, out_channels, 1))
        layers = []
        for _ in range(num_blocks):
            layers.append(UBlock(out_channels, hidden_channels, upsampling_depth, kernel_size, upsampling))
            if use_mamba:
                layers.append(
                    MambaLayer(
                        out_channels,
                        d_state=d_state,
                        d_conv=d_conv,
                        expand=expand,
                        bidirectional=bidirectional,
                        backend=backend,
                    )
                )
        self.blocks = nn.Sequential(*layers)
        self.mask_head = nn.Sequential(nn.PReLU(), nn.Conv1d(out_channels, num_spks * in_channels, 1))

    def _bottleneck(self, x):
        """gLN + 1x1 convolution: [B, N, L] -> [B, F, L].

        At CPU float32 inference the gLN, a per-channel affine map once its statistics are known,
        is folded into the convolution's weights and bias (in float64): one pass over ``x`` for
        the statistics, and none to write and read back the normalised [B, N, L] tensor.
        """
        norm, conv = self.bottleneck
        if not fast_paths.may_stand_in(x, [self.bottleneck, norm, conv]):
            return self.bottleneck(x)
        from umamba.models import ublock_cpu  # numba is imported on the first CPU inference

        if not ublock_cpu.is_enabled():
            return self.bottleneck(x)
        x = x.contiguous()
        stats = ublock_cpu.channel_stats(x.numpy())
        scale, shift = ublock_cpu.group_norm_affine(stats, x.shape[-1], norm.weight, norm.bias, norm.eps, np.float64)
        weight = conv.weight[:, :, 0].double()  # [F, N]
        bias = torch.zeros(weight.shape[0], dtype=torch.float64) if conv.bias is None else conv.bias.double()
        out = []
        for b in range(x.shape[0]):  # conv(x * scale + shift) = (weight * scale) x + (bias + weight @ shift)
            folded = (weight * torch.from_numpy(scale[b])).to(x.dtype).unsqueeze(-1)
            out.append(F.conv1d(x[b : b + 1], folded, (bias + weight @ torch.from_numpy(shift[b])).to(x.dtype)))
        return out[0] if len(out) == 1 else torch.cat(out)

    def forward(self, x):
        """[B, N, L] encoder output -> [n_src, B, N, L] masks."""
        batch, _, length = x.shape
        h = self.blocks(self._bottleneck(x))  # [B, F, L]
        masks = self.mask_head(h).view(batch, self.num_spks, self.in_channels, length)
        inplace = not torch.is_grad_enabled()  # inference: no copy of the n_src x [B, N, L] masks
        return MASK_ACTIVATIONS[self.mask_activation](masks, inplace).transpose(0, 1)
