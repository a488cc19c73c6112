"""U-Mamba-Net masknet: shapes, gradients, a real overfit, and its cost against the paper's budget."""

import pytest
import torch
import torch.nn as nn
from speechbrain.lobes.models.dual_path import Decoder, Encoder
from speechbrain.nnet.losses import get_si_snr_with_pitwrapper

from umamba.complexity import count_macs, load_separator
from umamba.models import Separator
from umamba.models import UBlock, UMambaMaskNet
from umamba.models.separator import _decodes_as_matmul


def tiny_masknet(**kwargs):
    args = dict(in_channels=32, out_channels=16, hidden_channels=32, num_blocks=2, upsampling_depth=3,
                d_state=4, backend="torch")
    args.update(kwargs)
    return UMambaMaskNet(**args)


@pytest.mark.parametrize("length", [1, 2, 5, 37, 128, 129])
@pytest.mark.parametrize("num_spks", [2, 3])
def test_mask_shapes_for_any_length(length, num_spks):
    net = tiny_masknet(num_spks=num_spks)
    masks = net(torch.randn(2, 32, length))
    assert masks.shape == (num_spks, 2, 32, length)
    assert (masks >= 0).all()  # relu masks


@pytest.mark.parametrize("upsampling", ["nearest", "linear", "transposed"])
def test_ublock_levels_and_residual(upsampling):
    block = UBlock(channels=8, hidden=16, depth=4, upsampling=upsampling)
    x = torch.randn(1, 8, 51)
    assert block(x).shape == x.shape
    # Zeroing the output projection leaves exactly the residual path.
    nn.init.zeros_(block.proj_out[-1].weight)
    nn.init.zeros_(block.proj_out[-1].bias)
    torch.testing.assert_close(block(x), x)


def test_softmax_masks_sum_to_one_over_sources():
    masks = tiny_masknet(num_spks=3, mask_activation="softmax")(torch.randn(1, 32, 20))
    torch.testing.assert_close(masks.sum(0), torch.ones(1, 32, 20))


def test_without_mamba_has_no_mamba_parameters():
    with_mamba, without = tiny_masknet(), tiny_masknet(use_mamba=False)
    names = [n for n, _ in without.named_parameters()]
    assert not any("mamba" in n for n in names)
    assert sum(p.numel() for p in with_mamba.parameters()) > sum(p.numel() for p in without.parameters())


def test_gradient_reaches_every_parameter():
    net = tiny_masknet(upsampling="transposed", bidirectional=True)
    net(torch.randn(2, 32, 40)).pow(2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"


def _two_tone_mixture(sample_rate, seconds=0.5):
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    s1 = sum(torch.sin(2 * torch.pi * 140 * k * t) / k for k in range(1, 6)) * (1 + torch.sin(2 * torch.pi * 3 * t))
    s2 = sum(torch.sin(2 * torch.pi * 230 * k * t + k) / k for k in range(1, 6)) * (1 + torch.cos(2 * torch.pi * 5 * t))
    sources = torch.stack([s1, s2], dim=-1)[None] * 0.1  # [1, T, 2]
    return sources.sum(-1), sources


@pytest.mark.parametrize("sample_rate", [8000, 16000])
def test_overfits_one_mixture(sample_rate):
    """A small U-Mamba-Net learns to separate one mixture: SI-SNR rises by a clear margin."""
    torch.manual_seed(0)
    mix, sources = _two_tone_mixture(sample_rate, seconds=0.25)
    sep = Separator(
        Encoder(kernel_size=16, out_channels=32),
        tiny_masknet(),
        Decoder(in_channels=32, out_channels=1, kernel_size=16, stride=8, bias=False),
    )
    opt = torch.optim.Adam(sep.parameters(), lr=3e-3)

    def si_snr():
        return -get_si_snr_with_pitwrapper(sources, sep(mix)).mean()

    with torch.no_grad():
        before = si_snr().item()
    for _ in range(60):
        opt.zero_grad()
        (-si_snr()).backward()
        opt.step()
    with torch.no_grad():
        after = si_snr().item()
    assert after > before + 8.0, f"SI-SNR {before:.1f} -> {after:.1f} dB"


def test_count_macs_against_hand_formula():
    conv = nn.Conv1d(4, 6, kernel_size=3, groups=2)
    x = torch.randn(2, 4, 10)  # output length 8
    assert count_macs(conv, x) == 2 * 6 * 8 * (4 // 2) * 3
    tconv = nn.ConvTranspose1d(6, 1, kernel_size=5, stride=2)
    assert count_macs(tconv, torch.randn(1, 6, 7)) == 6 * 7 * 1 * 5
    conv2d = nn.Conv2d(4, 6, kernel_size=(1, 3))
    assert count_macs(conv2d, torch.randn(1, 4, 2, 10)) == 6 * 2 * 8 * 4 * 3
    lstm = nn.LSTM(3, 5, batch_first=True, bidirectional=True)
    assert count_macs(lstm, torch.randn(2, 7, 3)) == 2 * 7 * 2 * 4 * 5 * (3 + 5)


def test_default_model_fits_the_paper_budget():
    """The reconstruction: about 2-2.5 M parameters and at most 2.5 GMAC per second of 8 kHz audio."""
    separator, sample_rate = load_separator("hparams/umamba.yaml", {"scan_backend": "torch"})
    assert sample_rate == 8000
    params = sum(p.numel() for p in separator.parameters())
    assert 2.0e6 <= params <= 2.5e6, params
    macs = count_macs(separator, torch.randn(1, sample_rate))
    assert 1.5e9 <= macs <= 2.5e9, macs
    # The Mamba layers are counted, the scan included: without them the model costs clearly less.
    separator_nomamba, _ = load_separator("hparams/umamba.yaml", {"use_mamba": False})
    assert count_macs(separator_nomamba, torch.randn(1, sample_rate)) < 0.7 * macs


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_decoder_as_matmul_equals_the_transposed_conv(batch, bias):
    """separate() decodes all sources with one matmul + overlap-add: same values and gradients."""
    torch.manual_seed(0)
    encoder = Encoder(kernel_size=16, out_channels=32)
    decoder = Decoder(in_channels=32, out_channels=1, kernel_size=16, stride=8, bias=bias)
    if bias:
        nn.init.normal_(decoder.bias)
    sep = Separator(encoder, tiny_masknet(num_spks=3), decoder)
    mix = torch.randn(batch, 803)

    def run():
        sep.zero_grad()
        est = sep(mix)
        est.pow(2).sum().backward()
        return est.detach(), [p.grad.clone() for p in sep.parameters()]

    assert _decodes_as_matmul(decoder)
    fast, fast_grads = run()
    handle = decoder.register_forward_hook(lambda *args: None)  # a hooked decoder is called per source
    try:
        assert not _decodes_as_matmul(decoder)
        reference, reference_grads = run()
    finally:
        handle.remove()
    assert fast.shape == reference.shape == (batch, 803, 3)
    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
    for got, want in zip(fast_grads, reference_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "softmax", "linear"])
def test_mask_activations_in_place_at_inference_are_the_same(activation):
    """Without gradients the masks are activated in place: same values as with autograd."""
    torch.manual_seed(0)
    net = tiny_masknet(num_spks=3, mask_activation=activation).eval()
    x = torch.randn(2, 32, 21)
    with_grad = net(x)
    with torch.no_grad():
        without = net(x)
    assert without.shape == (3, 2, 32, 21)
    assert torch.allclose(without, with_grad.detach(), atol=1e-5)
    if activation == "softmax":
        assert torch.allclose(without.sum(0), torch.ones(2, 32, 21), atol=1e-5)


def test_separate_at_inference_equals_the_autograd_path():
    """No-grad separation (in-place masking, fused CPU kernels) gives what the training path gives."""
    torch.manual_seed(0)
    sep = Separator(Encoder(kernel_size=16, out_channels=32), tiny_masknet(),
                    Decoder(in_channels=32, out_channels=1, kernel_size=16, stride=8, bias=False)).eval()
    mix = torch.randn(2, 1203)
    reference = sep(mix).detach()
    with torch.no_grad():
        fast = sep(mix)
    assert torch.allclose(fast, reference, atol=1e-5 * reference.abs().max())


def test_masks_that_share_memory_are_not_overwritten():
    """A masknet may return an expanded mask (one tensor for all sources): it is left as it is."""
    from umamba.models.separator import _owns_storage, separate

    class SameMask(nn.Module):
        def forward(self, x):
            self.mask = torch.full_like(x[:1], 0.5)
            return self.mask.expand(2, *x.shape)

    encoder = Encoder(kernel_size=16, out_channels=32)
    decoder = Decoder(in_channels=32, out_channels=1, kernel_size=16, stride=8, bias=False)
    masknet = SameMask()
    with torch.no_grad():
        est = separate(encoder, masknet, decoder, torch.randn(1, 400))
    assert (masknet.mask == 0.5).all()  # the mask the masknet kept is unchanged
    assert not _owns_storage(masknet.forward(torch.zeros(1, 32, 5)))
    assert torch.allclose(est[..., 0], est[..., 1])
    assert _owns_storage(torch.zeros(2, 3).t()) and not _owns_storage(torch.zeros(4)[:2])


def test_bottleneck_gln_folded_into_the_conv_at_inference():
    """The input gLN folded into the 1x1 conv (inference) equals gLN then conv, batch by batch."""
    from umamba.fast_paths import module_path

    torch.manual_seed(0)
    net = tiny_masknet().eval()
    with torch.no_grad():
        net.bottleneck[0].weight.normal_()
        net.bottleneck[0].bias.normal_()
    x = torch.relu(torch.randn(3, 32, 57)) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]  # per-item scales
    exact = net.bottleneck.double()(x.double()).detach()
    net.float()
    with torch.no_grad():
        folded = net._bottleneck(x)
        with module_path():
            modules = net._bottleneck(x)
    assert folded.shape == (3, 16, 57)
    torch_error = (modules.double() - exact).abs().max()
    assert (folded.double() - exact).abs().max() <= 4 * torch_error + 1e-7 * exact.abs().max()
    calls = []
    handle = net.bottleneck[1].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        net._bottleneck(x)
    handle.remove()
    assert calls == [1]  # a hooked conv is called as a module
