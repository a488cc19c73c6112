"""The fused CPU U-block (numba kernels) against PyTorch: each kernel, the whole block, and when it runs.

The first run compiles the kernels (float32 and float64): some seconds; numba caches them in
``umamba/models/__pycache__`` for later runs.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ublock_cpu = pytest.importorskip("umamba.models.ublock_cpu")
if ublock_cpu.numba is None:
    pytest.skip("numba is not installed", allow_module_level=True)

from umamba.complexity import count_macs  # noqa: E402
from umamba.fast_paths import module_path  # noqa: E402
from umamba.models import UBlock  # noqa: E402
from umamba.models.ublock_cpu import (  # noqa: E402
    TILE,
    affine_prelu_,
    channel_stats,
    depthwise_conv,
    group_norm_affine,
    upsample_add_,
)


def assert_close(actual, expected, rtol=1e-4, atol=1e-5):
    """Elementwise close, with ``atol`` relative to the scale of ``expected``."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * max(scale, 1e-30))


def reference_stats(x):
    """Per-row (mean, sum of squared deviations) in float64."""
    x = torch.as_tensor(x).double()
    mean = x.mean(-1)
    return torch.stack([mean, ((x - mean[..., None]) ** 2).sum(-1)], dim=-1)


def random_affine(batch, channels, dtype=np.float32, generator=None):
    rng = np.random.default_rng(0 if generator is None else generator)
    return (rng.uniform(0.5, 2.0, (batch, channels)).astype(dtype), rng.normal(0, 1, (batch, channels)).astype(dtype))


def torch_affine_prelu(x, scale, shift, alpha):
    y = torch.as_tensor(x) * torch.as_tensor(scale)[..., None] + torch.as_tensor(shift)[..., None]
    return torch.where(y > 0, y, torch.as_tensor(alpha, dtype=y.dtype).reshape(-1, 1) * y)


# --- kernels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 2, 7, TILE - 1, TILE, TILE + 1, 2 * TILE + 300])
def test_channel_stats(dtype, length):
    x = np.random.default_rng(length).normal(3.0, 2.0, (2, 5, length)).astype(dtype)
    assert_close(channel_stats(x), reference_stats(x), rtol=1e-5, atol=1e-6)


def test_group_norm_keeps_precision_with_a_large_mean():
    """A mean 1e4 times the standard deviation: a float32 sum of squares would lose every digit."""
    length = 3 * TILE - 5
    x = np.random.default_rng(0).normal(0, 1, (2, 6, length)) + 1e4
    gamma, beta = np.linspace(0.5, 2, 6), np.linspace(-1, 1, 6)
    x32 = x.astype(np.float32)
    expected = F.group_norm(torch.from_numpy(x32).double(), 1, torch.from_numpy(gamma), torch.from_numpy(beta), 1e-8)
    assert_close(channel_stats(x32), reference_stats(x32), rtol=1e-6, atol=0)
    scale, shift = group_norm_affine(channel_stats(x32), length, gamma, beta, 1e-8)
    affine_prelu_(x32, scale, shift)
    # x * scale + shift rounds to float32 near 2e4, within 2e-3; the statistics lose no more.
    torch.testing.assert_close(torch.from_numpy(x32).double(), expected, rtol=0, atol=4e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", ["none", "scalar", "per_channel"])
@pytest.mark.parametrize("length", [1, 3, TILE + 600])
def test_group_norm_prelu_in_place(dtype, alpha, length):
    channels = 7
    rng = np.random.default_rng(length)
    x = rng.normal(0.5, 3.0, (3, channels, length)).astype(dtype)
    gamma, beta = rng.normal(1, 0.5, channels), rng.normal(0, 1, channels)
    weight = {"none": None, "scalar": 0.3, "per_channel": rng.normal(0, 1, channels)}[alpha]
    expected = F.group_norm(torch.from_numpy(x).double(), 1, torch.from_numpy(gamma), torch.from_numpy(beta), 1e-8)
    if weight is not None:
        expected = F.prelu(expected, torch.as_tensor(weight, dtype=torch.float64).reshape(-1))
    scale, shift = group_norm_affine(channel_stats(x), length, gamma, beta, 1e-8, dtype=dtype)
    stats = affine_prelu_(x, scale, shift, weight, with_stats=True)
    assert x.dtype == dtype
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert_close(x, expected, rtol=tol, atol=tol)
    assert_close(stats, reference_stats(expected), rtol=tol, atol=tol)
    assert affine_prelu_(x, scale, shift) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 2, 3, 8, 2 * TILE + 7])
def test_depthwise_conv(dtype, kernel_size, stride, length):
    channels, padding = 5, kernel_size // 2
    rng = np.random.default_rng(kernel_size * 100 + length)
    x = rng.normal(0, 1, (2, channels, length)).astype(dtype)
    weight = rng.normal(0, 1, (channels, 1, kernel_size)).astype(dtype)
    bias = rng.normal(0, 1, channels).astype(dtype)
    scale, shift = random_affine(2, channels, dtype, kernel_size)
    alpha = rng.normal(0, 1, channels).astype(dtype)
    mapped = torch_affine_prelu(x, scale, shift, alpha)
    expected = F.conv1d(mapped, torch.from_numpy(weight), torch.from_numpy(bias), stride, padding, groups=channels)
    out, stats = depthwise_conv(x, weight, bias, stride, padding, scale, shift, alpha)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert out.shape == tuple(expected.shape)
    assert_close(out, expected, rtol=tol, atol=tol)
    assert_close(stats, reference_stats(expected), rtol=tol, atol=tol)


@pytest.mark.parametrize("length", [1, 6, TILE + 1])
def test_depthwise_conv_without_padding_and_in_place(length):
    x = np.random.default_rng(length).normal(0, 1, (1, 3, length + 4)).astype(np.float32)
    weight, bias = np.full((3, 5), 0.2, np.float32), np.arange(3, dtype=np.float32)
    expected = F.conv1d(torch.from_numpy(x), torch.from_numpy(weight)[:, None], torch.from_numpy(bias), groups=3)
    out, _ = depthwise_conv(x, weight, bias)  # no affine map, no padding
    assert_close(out, expected)
    same = x.copy()
    out, _ = depthwise_conv(same, weight, bias, padding=2, out=same)  # stride 1, "same" length: in place
    assert out is same
    assert_close(same, F.conv1d(torch.from_numpy(x), torch.from_numpy(weight)[:, None], torch.from_numpy(bias),
                                padding=2, groups=3))
    with pytest.raises(ValueError, match="out must be"):
        depthwise_conv(x, weight, bias, out=np.empty_like(x))


def test_defaults_without_affine_parameters_or_bias():
    x = np.random.default_rng(0).normal(2, 3, (2, 4, 30)).astype(np.float32)
    scale, shift = group_norm_affine(channel_stats(x), 30, None, None, 1e-5)  # GroupNorm(affine=False)
    expected = F.group_norm(torch.from_numpy(x), 1, eps=1e-5)
    assert_close(torch_affine_prelu(x, scale, shift, 1.0), expected)
    weight = np.random.default_rng(1).normal(0, 1, (4, 3)).astype(np.float32)
    out, _ = depthwise_conv(x, weight, None, 2, 1)
    assert_close(out, F.conv1d(torch.from_numpy(x), torch.from_numpy(weight)[:, None], None, 2, 1, groups=4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 2, 3, 7, TILE, TILE + 1, 2 * TILE + 1])
@pytest.mark.parametrize("affines", [False, True])
def test_upsample_add(dtype, length, affines):
    rng = np.random.default_rng(length)
    skip = rng.normal(0, 1, (2, 4, length)).astype(dtype)
    coarse = rng.normal(0, 1, (2, 4, (length + 1) // 2)).astype(dtype)
    skip_affine = random_affine(2, 4, dtype, 1) if affines else None
    coarse_affine = random_affine(2, 4, dtype, 2) if affines else None
    ones = np.ones(4, dtype)
    s, c = torch.from_numpy(skip), torch.from_numpy(coarse)
    if affines:
        s, c = torch_affine_prelu(skip, *skip_affine, ones), torch_affine_prelu(coarse, *coarse_affine, ones)
    expected = s + F.interpolate(c, scale_factor=2.0, mode="nearest")[..., :length]
    stats = upsample_add_(skip, coarse, skip_affine, coarse_affine)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert_close(skip, expected, rtol=tol, atol=tol)
    assert_close(stats, reference_stats(expected), rtol=tol * 10, atol=tol * 10)
    with pytest.raises(ValueError, match="coarse must be"):
        upsample_add_(skip, np.zeros((2, 4, length + 2), dtype))


# --- the U-block --------------------------------------------------------------------------------


def randomised_block(channels, hidden, depth, kernel_size, per_channel_prelu, seed=0):
    """A UBlock whose every parameter is random: non-trivial gLN gains and biases, PReLU slopes, conv biases."""
    torch.manual_seed(seed)
    block = UBlock(channels, hidden, depth, kernel_size)
    if per_channel_prelu:
        block.proj_in[2] = nn.PReLU(hidden)
        block.proj_out[1] = nn.PReLU(hidden)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(-0.5, 0.8)
            elif isinstance(module, nn.Conv1d):
                module.bias.normal_(0.0, 0.5)
    return block.eval()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused path."""
    calls = []
    inner = ublock_cpu.ublock_inner

    def counting(block, a):
        calls.append(a.shape)
        return inner(block, a)

    monkeypatch.setattr(ublock_cpu, "ublock_inner", counting)
    return calls


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 1001])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_block_matches_modules(batch, length, depth, kernel_size, fused_calls):
    per_channel = (length + depth) % 2 == 0  # both PReLU kinds, over the grid
    block = randomised_block(6, 20, depth, kernel_size, per_channel, seed=length * 10 + depth)
    x = torch.randn(batch, 6, length) * 2 + 0.5
    with torch.no_grad():
        with module_path():
            expected = block(x)
        assert not fused_calls
        actual = block(x)
    assert fused_calls == [(batch, 20, length)]
    assert_close(actual - x, expected - x)


def test_fused_block_default_size():
    block = randomised_block(128, 512, 4, 5, per_channel_prelu=False)
    x = torch.randn(1, 128, 2 * TILE + 1)  # several tiles at the first two levels
    with torch.inference_mode():
        actual = block(x)
        with module_path():
            expected = block(x)
    assert_close(actual - x, expected - x)


def test_module_path_when_a_gradient_is_needed(fused_calls):
    block = randomised_block(4, 12, 3, 5, per_channel_prelu=True)
    x = torch.randn(2, 4, 9, requires_grad=True)
    block(x).sum().backward()  # parameters and input need gradients
    assert x.grad is not None and block.down[1][0].weight.grad is not None
    block.requires_grad_(False)
    assert block(x).grad_fn is not None  # the input still needs one
    assert not fused_calls
    block(x.detach())  # nothing needs a gradient
    with torch.no_grad():
        block(x)
    assert len(fused_calls) == 2


def test_module_path_for_other_inputs_and_blocks(fused_calls):
    with torch.no_grad():
        UBlock(4, 12, 3, upsampling="linear")(torch.randn(1, 4, 9))
        UBlock(4, 12, 3).double()(torch.randn(1, 4, 9, dtype=torch.float64))
    assert not fused_calls


def test_module_path_switch(fused_calls):
    block = UBlock(4, 12, 3).eval()
    x = torch.randn(1, 4, 9)
    assert ublock_cpu.is_enabled()
    with torch.no_grad():
        with module_path():
            with module_path():
                block(x)
            assert not ublock_cpu.is_enabled()
            block(x)
        assert not fused_calls
        assert ublock_cpu.is_enabled()
        block(x)
    assert len(fused_calls) == 1


def test_module_path_when_a_bypassed_module_has_a_hook(fused_calls):
    block = UBlock(4, 12, 3).eval()
    seen = []
    handle = block.down[2][1].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        block(torch.randn(1, 4, 9))
        assert seen == [(1, 12, 3)] and not fused_calls
        handle.remove()
        block.register_forward_hook(lambda module, args, output: seen.append(output.shape))  # the block's own
        block(torch.randn(1, 4, 9))
    assert len(fused_calls) == 1 and seen[-1] == (1, 4, 9)


def test_count_macs_sees_every_convolution_of_the_block(fused_calls):
    channels, hidden, depth, kernel_size, length = 4, 12, 3, 5, 21
    block = UBlock(channels, hidden, depth, kernel_size).eval()
    levels = [21, 11, 6]  # stride 1, then 2
    expected = 2 * length * channels * hidden + sum(hidden * n * kernel_size for n in levels)
    assert count_macs(block, torch.randn(1, channels, length)) == expected
    assert not fused_calls


# --- the whole inner part in float64, large level means, modules without parameters -------------


def fused_inner(block, x):
    """``block(x) - x`` through :func:`ublock_cpu.ublock_inner` (any dtype)."""
    with torch.no_grad():
        return block.proj_out[2](ublock_cpu.ublock_inner(block, block.proj_in[0](x)))


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [1, 5, 33, 129, 257, 999, 2 * TILE + 3])
def test_fused_inner_is_exact_in_float64(length, depth, kernel_size):
    """In float64 the fused kernels leave only rounding: every border, odd length and level count."""
    block = randomised_block(3, 10, depth, kernel_size, per_channel_prelu=length % 2 == 0, seed=length + depth).double()
    x = torch.randn(2, 3, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length)) * 2 + 0.5
    with torch.no_grad(), module_path():
        expected = block(x) - x
    assert_close(fused_inner(block, x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.parametrize("length", [7, 1001])
def test_fused_inner_with_large_level_means(length, depth):
    """Convolutions that give the levels a large mean (positive weights, large biases): each
    gLN takes it out again, as ``x * scale + shift``."""
    block = randomised_block(4, 12, depth, 5, per_channel_prelu=True, seed=depth)
    with torch.no_grad():
        for conv, _ in block.down:
            conv.weight.uniform_(0.1, 0.3)
            conv.bias.uniform_(20.0, 40.0)
    x = torch.randn(1, 4, length, generator=torch.Generator().manual_seed(length))
    with torch.no_grad(), module_path():
        expected = block.double()(x.double()) - x.double()
    block.float()
    assert_close(fused_inner(block, x), expected, rtol=1e-3, atol=1e-4)
    assert_close(fused_inner(block.double(), x.double()), expected, rtol=1e-9, atol=1e-10)


def test_fused_inner_without_affine_norms_or_biases():
    torch.manual_seed(3)
    block = UBlock(4, 12, 3, 5).eval()
    for index, (conv, _) in enumerate(block.down):
        block.down[index][1] = nn.GroupNorm(1, 12, eps=1e-8, affine=False)
        conv.bias = None
    x = torch.randn(2, 4, 301)
    with torch.no_grad(), module_path():
        expected = block(x) - x
    assert_close(fused_inner(block, x), expected)


def test_per_channel_values():
    """Parameters of the right length and dtype pass without a copy; others are broadcast."""
    weight = torch.arange(4, dtype=torch.float32)
    values = ublock_cpu._per_channel(weight, 4, np.float32)
    assert np.shares_memory(values, weight.numpy())
    np.testing.assert_array_equal(ublock_cpu._per_channel(weight, 4, np.float64), [0, 1, 2, 3])
    np.testing.assert_array_equal(ublock_cpu._per_channel(torch.tensor([0.25]), 3, np.float32), [0.25] * 3)
    np.testing.assert_array_equal(ublock_cpu._per_channel(None, 2, np.float32, 0.0), [0, 0])
    np.testing.assert_array_equal(ublock_cpu._per_channel(0.5, 2, np.float64), [0.5, 0.5])
    np.testing.assert_array_equal(ublock_cpu._per_channel(torch.arange(8.0)[::2], 4, np.float32), [0, 2, 4, 6])
    with pytest.raises(ValueError):
        ublock_cpu._per_channel(np.ones(3), 4, np.float32)
