"""The Mamba block against an independent float64 reference, written here from the equations."""

import logging

import pytest
import torch
import torch.nn.functional as F

from umamba.mamba import Mamba, conv_cpu, resolve_backend
from umamba.mamba.scan import cpu_kernel_available

BACKENDS = ["torch"] + (["cpu"] if cpu_kernel_available() else [])


def reference_mamba(block, x, reverse=False):
    """One direction of a Mamba block as a plain float64 loop over time (mamba_ssm semantics)."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    sfx = "_b" if reverse else ""
    a_log = p["A_b_log" if reverse else "A_log"]
    x = x.detach().double()
    if reverse:
        x = x.flip(1)
    batch, length, _ = x.shape
    e, n, r = block.d_inner, block.d_state, block.dt_rank
    xz = x @ p["in_proj.weight"].T + p.get("in_proj.bias", 0.0)  # (b, l, 2e)
    xi, z = xz[..., :e], xz[..., e:]
    w, bias = p[f"conv1d{sfx}.weight"][:, 0, :], p[f"conv1d{sfx}.bias"]  # (e, k), (e,)
    k = w.shape[1]
    conv = torch.zeros(batch, length, e, dtype=torch.float64)
    for t in range(length):
        acc = bias.expand(batch, e).clone()
        for j in range(k):
            s = t - (k - 1) + j  # causal: only past and present frames
            if s >= 0:
                acc = acc + w[:, j] * xi[:, s]
        conv[:, t] = acc
    u = conv * torch.sigmoid(conv)
    proj = u @ p[f"x_proj{sfx}.weight"].T
    dt_low, Bm, Cm = proj[..., :r], proj[..., r : r + n], proj[..., r + n :]
    dt = F.softplus(dt_low @ p[f"dt_proj{sfx}.weight"].T + p[f"dt_proj{sfx}.bias"])  # (b, l, e)
    A = -torch.exp(a_log)  # (e, n)
    h = torch.zeros(batch, e, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + p[f"D{sfx}"] * u[:, t])
    y = torch.stack(ys, dim=1) * (z * torch.sigmoid(z))  # (b, l, e)
    if reverse:
        y = y.flip(1)
    return y


def reference_output(block, x):
    y = reference_mamba(block, x)
    if block.bidirectional:
        y = 0.5 * (y + reference_mamba(block, x, reverse=True))
    state = block.state_dict()
    return y @ state["out_proj.weight"].double().T + state.get("out_proj.bias", torch.zeros(1)).double()


def _randomise(block):
    """Move every parameter away from its structured initialisation (A_log, D, biases)."""
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.add_(0.2 * torch.randn_like(param))
    return block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 7, 1001])
def test_forward_matches_reference(backend, length):
    block = _randomise(Mamba(d_model=12, d_state=5, d_conv=4, expand=2, backend=backend))
    x = torch.randn(3, length, 12)
    out = block(x)
    ref = reference_output(block, x)
    assert out.shape == (3, length, 12)
    rel = (out.double() - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_biases_match_reference(backend):
    block = _randomise(Mamba(d_model=8, d_state=4, bias=True, backend=backend))
    x = torch.randn(2, 9, 8)
    ref = reference_output(block, x)
    assert (block(x).double() - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_matches_reference(backend):
    block = _randomise(Mamba(d_model=8, d_state=4, bidirectional=True, backend=backend))
    assert "A_b_log" in block.state_dict() and "conv1d_b.weight" in block.state_dict()
    x = torch.randn(2, 33, 8)
    ref = reference_output(block, x)
    rel = (block(x).double() - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5
    # The backward direction really looks at the future: changing the last frame moves the first output.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (block(x2)[:, 0] - block(x)[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_unidirectional_is_causal(backend):
    block = _randomise(Mamba(d_model=8, d_state=4, backend=backend))
    x = torch.randn(1, 20, 8)
    x2 = x.clone()
    x2[:, 10:] += torch.randn(1, 10, 8)
    torch.testing.assert_close(block(x)[:, :10], block(x2)[:, :10])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    block = _randomise(Mamba(d_model=4, d_state=3, d_conv=3, expand=2, backend=backend)).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    params = [p for _, p in sorted(block.named_parameters())]

    def fn(x, *ps):
        return torch.func.functional_call(block, dict(zip(sorted(n for n, _ in block.named_parameters()), ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_backends_agree_on_gradients():
    if len(BACKENDS) < 2:
        pytest.skip("only one CPU backend available")
    ref_block = _randomise(Mamba(d_model=8, d_state=4, backend="torch"))
    other = Mamba(d_model=8, d_state=4, backend=BACKENDS[1])
    other.load_state_dict(ref_block.state_dict(), strict=True)
    x = torch.randn(2, 50, 8)
    for block in (ref_block, other):
        block.zero_grad()
        block(x).pow(2).sum().backward()
    for (name, p1), (_, p2) in zip(ref_block.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_parameter_names_and_shapes_match_mamba_ssm():
    block = Mamba(d_model=16, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    # mamba_ssm.modules.mamba_simple.Mamba(16) with default arguments (bias=False, conv_bias=True).
    assert shapes == {
        "A_log": (32, 16),
        "D": (32,),
        "conv1d.bias": (32,),
        "conv1d.weight": (32, 1, 4),
        "dt_proj.bias": (32,),
        "dt_proj.weight": (32, 1),
        "in_proj.weight": (64, 16),
        "out_proj.weight": (16, 32),
        "x_proj.weight": (33, 32),
    }
    # S4D-real initialisation and the softplus range of the step sizes.
    torch.testing.assert_close(block.A_log.exp()[0], torch.arange(1, 17, dtype=torch.float32))
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


def test_state_dict_round_trip_with_peer_implementation():
    """mambapy's MambaBlock uses mamba_ssm's names and shapes: weights move both ways, outputs agree."""
    mambapy = pytest.importorskip("mambapy.mamba")
    config = mambapy.MambaConfig(d_model=12, n_layers=1, d_state=6, expand_factor=2, d_conv=4, pscan=False)
    peer = mambapy.MambaBlock(config)
    ours = Mamba(d_model=12, d_state=6, expand=2, d_conv=4, backend="torch")
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 40, 12)
    torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-6)
    _randomise(ours)
    peer.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-6)


def test_missing_parameter_is_refused():
    block = Mamba(d_model=8)
    state = block.state_dict()
    del state["D"]
    with pytest.raises(RuntimeError, match="D"):
        Mamba(d_model=8).load_state_dict(state, strict=True)


def test_backend_choice():
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("cuda", cpu)
    with pytest.raises(ValueError):
        Mamba(d_model=8, backend="fast")
    assert resolve_backend("auto", cpu) == ("cpu" if cpu_kernel_available() else "torch")


def test_backend_is_logged_once(caplog):
    from umamba.mamba import scan

    scan._announced.clear()
    block = Mamba(d_model=8, backend="torch")
    with caplog.at_level(logging.INFO, logger="umamba.mamba.scan"):
        block(torch.randn(1, 5, 8))
        block(torch.randn(1, 5, 8))
    messages = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert messages == ["Mamba selective scan backend: torch (device cpu)"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_first_layout_is_the_same_block(backend):
    block = _randomise(Mamba(d_model=8, d_state=4, bidirectional=True, backend=backend))
    x = torch.randn(2, 15, 8)
    torch.testing.assert_close(block(x.transpose(1, 2), channels_first=True), block(x).transpose(1, 2))


@pytest.mark.skipif(conv_cpu.numba is None, reason="numba not importable")
@pytest.mark.parametrize("length", [1, 3, 7, 1001])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_inference_conv_path_matches_reference(length, bidirectional):
    """Without gradients the causal conv + SiLU run as one numba pass: same block, same outputs."""
    block = _randomise(Mamba(d_model=12, d_state=5, d_conv=4, bidirectional=bidirectional, backend=BACKENDS[-1]))
    x = torch.randn(3, length, 12)
    ref = reference_output(block, x)
    with torch.no_grad():
        assert conv_cpu.applies(block.conv1d, torch.randn(3, 24, length))
        out = block(x)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5
    assert not conv_cpu.applies(block.conv1d, torch.randn(3, 24, length))  # weights need gradients
    with torch.no_grad():
        handle = block.conv1d.register_forward_hook(lambda *args: None)
        assert not conv_cpu.applies(block.conv1d, torch.randn(3, 24, length))  # hooks see the module
        handle.remove()


@pytest.mark.skipif(conv_cpu.numba is None, reason="numba not importable")
@pytest.mark.parametrize("kernel", [2, 3, 4, 5])
@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 9, 1001])
def test_causal_conv_silu_kernel_against_torch(kernel, length):
    x = torch.randn(2, 6, length) * 3
    weight, bias = torch.randn(6, 1, kernel), torch.randn(6)
    reference = F.silu(F.conv1d(x, weight, bias, padding=kernel - 1, groups=6)[..., :length])
    assert torch.allclose(conv_cpu.causal_conv1d_silu(x, weight, bias), reference, rtol=1e-5, atol=1e-5)
    no_bias = F.silu(F.conv1d(x, weight, None, padding=kernel - 1, groups=6)[..., :length])
    assert torch.allclose(conv_cpu.causal_conv1d_silu(x, weight, None), no_bias, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(conv_cpu.numba is None, reason="numba not importable")
def test_module_path_switch_turns_the_conv_kernel_off():
    from umamba.fast_paths import module_path

    conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3)
    x = torch.randn(1, 8, 20)
    with torch.no_grad():
        assert conv_cpu.applies(conv, x)
        with module_path():
            assert not conv_cpu.applies(conv, x)
        assert conv_cpu.applies(conv, x)
