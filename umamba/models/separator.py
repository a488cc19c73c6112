"""The encoder -> masks -> decoder computation shared by training, inference and cost measurement."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def separate(encoder, masknet, decoder, mix: torch.Tensor) -> torch.Tensor:
    """Mixture [B, T] -> estimates [B, T, n_src], cropped or zero-padded to T samples.

    As in SpeechBrain's separation recipes: the masks multiply the encoder output and each
    masked representation is decoded separately.

    Example
    -------
    >>> from speechbrain.lobes.models.dual_path import Decoder, Encoder
    >>> from umamba.models import UMambaMaskNet
    >>> enc = Encoder(kernel_size=16, out_channels=16)
    >>> dec = Decoder(in_channels=16, out_channels=1, kernel_size=16, stride=8, bias=False)
    >>> net = UMambaMaskNet(16, 8, 16, num_blocks=1, d_state=4, backend="torch")
    >>> separate(enc, net, dec, torch.randn(1, 1001)).shape
    torch.Size([1, 1001, 2])
    """
    mix_w = encoder(mix)  # [B, N, L]
    masks = masknet(mix_w)  # [n_src, B, N, L]
    sep_h = mix_w.unsqueeze(0) * masks
    est = torch.stack([decoder(h) for h in sep_h], dim=-1)
    if est.dim() == 2:  # SpeechBrain's Decoder squeezes a batch of one to [T']
        est = est.unsqueeze(0)
    length = mix.shape[-1]
    if est.shape[1] < length:
        est = F.pad(est, (0, 0, 0, length - est.shape[1]))
    return est[:, :length]


class Separator(nn.Module):
    """The triplet as one module: [B, T] -> [B, T, n_src] (see :func:`separate`).

    Example
    -------
    >>> from speechbrain.lobes.models.dual_path import Decoder, Encoder
    >>> from umamba.models import UMambaMaskNet
    >>> sep = Separator(Encoder(kernel_size=16, out_channels=16),
    ...                 UMambaMaskNet(16, 8, 16, num_blocks=1, d_state=4, backend="torch"),
    ...                 Decoder(in_channels=16, out_channels=1, kernel_size=16, stride=8, bias=False))
    >>> sep(torch.randn(2, 1000)).shape
    torch.Size([2, 1000, 2])
    """

    def __init__(self, encoder, masknet, decoder):
        super().__init__()
        self.encoder, self.masknet, self.decoder = encoder, masknet, decoder

    def forward(self, mix):
        return separate(self.encoder, self.masknet, self.decoder, mix)
