"""The channel-first LayerNorm kernel of MambaLayer's inference path, against ``F.layer_norm``."""

import pytest
import torch
import torch.nn.functional as F

from umamba.fast_paths import module_path
from umamba.models import MambaLayer
from umamba.models import layer_norm_cpu

pytestmark = pytest.mark.skipif(layer_norm_cpu.numba is None, reason="numba is not installed")


def reference(x, weight, bias, eps):
    return F.layer_norm(x.transpose(1, 2), (x.shape[1],), weight, bias, eps).transpose(1, 2)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels", [1, 7, 128])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_layer_norm(batch, channels, length, dtype):
    torch.manual_seed(channels * 1000 + length)
    x = torch.randn(batch, channels, length, dtype=dtype) * 3 + 0.5
    weight, bias = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    got = layer_norm_cpu.layer_norm_channels(x, weight, bias, 1e-5)
    assert got.shape == x.shape and got.is_contiguous()
    exact = reference(x.double(), weight.double(), bias.double(), 1e-5)
    ours = (got.double() - exact).abs().max()
    torchs = (reference(x, weight, bias, 1e-5).double() - exact).abs().max()  # PyTorch's own rounding
    assert ours <= 2 * torchs + 1e-12 * exact.abs().max()


def test_large_mean_costs_no_precision():
    """Two passes (mean, then deviations): a frame at 1e4 + N(0, 1) normalises as well as at 0."""
    torch.manual_seed(0)
    x = torch.randn(1, 128, 300, dtype=torch.float64)
    weight, bias = torch.ones(128, dtype=torch.float64), torch.zeros(128, dtype=torch.float64)
    exact = reference(x, weight, bias, 1e-5)
    shifted = (x + 1e4).float()  # float32 holds 1e4 + x to 5e-4
    got = layer_norm_cpu.layer_norm_channels(shifted, weight.float(), bias.float(), 1e-5)
    torch_error = (reference(shifted, weight.float(), bias.float(), 1e-5).double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= max(1e-3, torch_error)


def test_non_contiguous_input_and_eps():
    x = torch.randn(2, 50, 16).transpose(1, 2)  # [2, 16, 50], not contiguous
    weight, bias = torch.randn(16), torch.randn(16)
    torch.testing.assert_close(layer_norm_cpu.layer_norm_channels(x, weight, bias, 0.5),
                               reference(x, weight, bias, 0.5))


def test_mamba_layer_uses_it_only_where_it_may():
    torch.manual_seed(0)
    layer = MambaLayer(16, d_state=4, backend="torch").eval()
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    x = torch.randn(2, 16, 70)
    with torch.no_grad():
        assert layer_norm_cpu.applies(layer.norm, x)
        fused = layer(x)
        with module_path():
            assert not layer_norm_cpu.applies(layer.norm, x)
            modules = layer(x)
    torch.testing.assert_close(fused, modules, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).detach(), modules, rtol=1e-5, atol=1e-5)  # training path
    assert not layer_norm_cpu.applies(layer.norm, x)  # grad mode, weights need a gradient
    assert not layer_norm_cpu.applies(layer.norm, x.double())
    calls = []
    handle = layer.norm.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        assert not layer_norm_cpu.applies(layer.norm, x)
        layer(x)
    handle.remove()
    assert calls == [1]  # a hooked norm is called as a module


def test_residual_added_in_place_only_when_nobody_holds_the_output():
    """At inference the layer adds its input into the Mamba output in place, unless a hook may hold it."""
    torch.manual_seed(0)
    layer = MambaLayer(16, d_state=4, backend="torch").eval()
    x = torch.randn(1, 16, 40)
    seen = []
    handle = layer.mamba.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        y = layer(x)
    handle.remove()
    torch.testing.assert_close(y, x + seen[0])  # the hooked output was not overwritten
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)
    assert torch.equal(x, x.clone())
