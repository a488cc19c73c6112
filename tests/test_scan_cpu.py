"""Tests of the numba CPU selective scan against a plain sequential float64 reference.

The first run compiles the kernels (float32 and float64, forward and backward): about a minute
on two cores; numba caches them in ``umamba/mamba/__pycache__`` for later runs.
"""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

scan_cpu = pytest.importorskip("umamba.mamba.scan_cpu")
if not scan_cpu.is_available():
    pytest.skip("numba is not installed", allow_module_level=True)

from umamba.mamba.scan_cpu import CHUNK, LANES, SEGMENT, selective_scan_cpu  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence written out step by step in float64 (as mamba_ssm's selective_scan_ref)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def make_inputs(batch, dim, d_state, length, with_D=True, with_z=True, with_bias=True, seed=0):
    """float64 inputs in the ranges a Mamba block produces (A < 0, delta around softplus's knee)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) - 1.0,
        "A": -torch.exp(randn(dim, d_state)),
        "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length),
        "D": randn(dim) if with_D else None,
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": 0.5 * randn(dim) if with_bias else None,
    }


def as_float32(inputs):
    return {k: None if v is None else v.float() for k, v in inputs.items()}


def rel_error(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def run_both(inputs, delta_softplus, dtype):
    """Output and gradients (for a fixed random dout) of the kernel in ``dtype`` and of the reference."""
    dout = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn, cast in ((selective_scan_cpu, dtype), (reference_scan, torch.float64)):
        leaves = {k: None if v is None else v.detach().to(cast).requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves, delta_softplus=delta_softplus)
        out.backward(dout.to(out.dtype))
        grads = {k: v.grad for k, v in leaves.items() if v is not None}
        results.append((out.detach(), grads))
    return results


# (batch, dim, d_state, L): one step; a few steps; dim not a multiple of LANES and L not a
# multiple of CHUNK; several channel blocks and backward segments (L > CHUNK * SEGMENT).
SHAPES = [(1, 16, 4, 1), (3, 5, 4, 7), (2, 20, 16, 150)]
LONG = (1, 40, 3, CHUNK * SEGMENT + 77)
OPTIONS = [  # with_D, with_z, with_bias, delta_softplus
    (True, True, True, True),
    (False, False, False, False),
    (True, False, True, True),
    (False, True, False, True),
]
CASES = [(shape, options) for shape in SHAPES for options in OPTIONS] + [(LONG, OPTIONS[0]), (LONG, OPTIONS[1])]


@pytest.mark.parametrize("shape, options", CASES)
def test_float32_matches_reference(shape, options):
    with_D, with_z, with_bias, softplus = options
    inputs = make_inputs(*shape, with_D=with_D, with_z=with_z, with_bias=with_bias)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # raw positive step sizes
    (out, grads), (ref_out, ref_grads) = run_both(inputs, softplus, torch.float32)
    assert out.dtype == torch.float32
    assert rel_error(out, ref_out) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == torch.float32
        assert rel_error(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("shape", [(3, 5, 4, 7), (2, 20, 16, 150)])
def test_float64_gradients_match_reference_autograd(shape):
    (out, grads), (ref_out, ref_grads) = run_both(make_inputs(*shape), True, torch.float64)
    assert rel_error(out, ref_out) < 1e-12
    assert set(grads) == set(NAMES)
    for name in NAMES:
        assert rel_error(grads[name], ref_grads[name]) < 1e-10, name


def test_gradcheck():
    inputs = make_inputs(2, 3, 2, 9)
    tensors = tuple(inputs[k].requires_grad_() for k in NAMES)

    def fn(*args):
        return selective_scan_cpu(*args, delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tensors)


def test_threads_agree_and_do_not_race():
    """Several tasks share a batch element's dB and dC: results must not depend on scheduling."""
    inputs = make_inputs(3, 3 * LANES + 5, 8, 2 * CHUNK + 9)
    inputs = as_float32(inputs)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 2, 2):
            torch.set_num_threads(n)
            runs.append(run_both(inputs, True, torch.float32)[0])
    finally:
        torch.set_num_threads(threads)
    (out_1, grads_1) = runs[0]
    for out, grads in runs[1:]:
        assert torch.equal(out, out_1)
        for name in grads:
            # dB, dC: the order of the sum over channel groups depends on the number of threads
            torch.testing.assert_close(grads[name], grads_1[name], rtol=1e-5, atol=1e-6)
    for out, grads in runs[2:]:  # same thread count: bit for bit
        assert torch.equal(out, runs[1][0])
        for name in grads:
            assert torch.equal(grads[name], runs[1][1][name]), name


def test_no_grad_output_and_layouts():
    inputs = as_float32(make_inputs(2, 6, 5, 70))
    expected = selective_scan_cpu(**inputs, delta_softplus=True)
    with torch.no_grad():
        assert torch.equal(selective_scan_cpu(**inputs, delta_softplus=True), expected)
    # B and C as a Mamba block makes them: a transposed view of (batch, L, d_state)
    B_t = inputs["B"].transpose(1, 2).contiguous().transpose(1, 2)
    C_t = inputs["C"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not B_t.is_contiguous()
    assert torch.equal(selective_scan_cpu(**{**inputs, "B": B_t, "C": C_t}, delta_softplus=True), expected)
    # bfloat16 input: computed in float32, returned in the input dtype
    out = selective_scan_cpu(**{**inputs, "u": inputs["u"].bfloat16()}, delta_softplus=True)
    assert out.dtype == torch.bfloat16


def test_extreme_values():
    inputs = make_inputs(1, 4, 3, 20, with_z=False)
    inputs["delta"][0, 0, 5] = 300.0  # exp(delta * A) underflows to 0: the state restarts
    inputs["delta"][0, 1, 3] = -300.0  # softplus ~ 0: the state is carried unchanged
    inputs["u"][0, 2, 7] = float("nan")
    out = selective_scan_cpu(**as_float32(inputs), delta_softplus=True)
    ref = reference_scan(**inputs, delta_softplus=True)
    assert torch.isnan(out[0, 2, 7:]).all() and not torch.isnan(out[0, 2, :7]).any()
    finite = ~torch.isnan(ref)
    assert torch.equal(finite, ~torch.isnan(out))
    assert rel_error(out[finite], ref[finite]) < 1e-5


@scan_cpu.numba.njit
def _elementwise(xs, function):
    """0: _exp, 1: _log1p_unit, 2: _exp_nonpositive, 3: _decay, 4: _decay_negative, elementwise."""
    out = np.empty_like(xs)
    for i in range(xs.size):
        if function == 0:
            out[i] = scan_cpu._exp(xs[i])
        elif function == 1:
            out[i] = scan_cpu._log1p_unit(xs[i])
        elif function == 2:
            out[i] = scan_cpu._exp_nonpositive(xs[i])
        elif function == 3:
            out[i] = scan_cpu._decay(xs[i])
        else:
            out[i] = scan_cpu._decay_negative(xs[i])
    return out


def test_float32_exp_and_log1p_are_accurate():
    """The polynomial exp and log1p (on [0, 1]) of the float32 kernels: within 2 ulp of float64 numpy."""
    ulp = 2.0**-23
    # the last floats above the smallest normal result: 2**k * exp(r) built from exponent bits
    low = np.nextafter(np.float32(-87.33654), np.float32(0)) + np.arange(200, dtype=np.float32) * np.float32(2**-17)
    xs = np.concatenate([np.linspace(-87.3, 88.3, 100001), low, -low[::-1]]).astype(np.float32)
    got = _elementwise(xs, 0)
    assert got.dtype == np.float32
    assert np.max(np.abs(got / np.exp(xs.astype(np.float64)) - 1)) < 2 * ulp
    edges = _elementwise(np.array([-np.inf, -200, -87.34, 88.4, 200, np.inf, np.nan], dtype=np.float32), 0)
    assert edges[:6].tolist() == [0.0, 0.0, 0.0, np.inf, np.inf, np.inf] and math.isnan(edges[6])
    # the variant for arguments <= 0: the same values (no check for overflow)
    xs = xs[xs <= 0]
    assert np.array_equal(_elementwise(xs, 2), _elementwise(xs, 0))
    edges = _elementwise(np.array([-np.inf, -200, -87.34, 0, np.nan], dtype=np.float32), 2)
    assert edges[:4].tolist() == [0.0, 0.0, 0.0, 1.0] and math.isnan(edges[4])
    ys = np.concatenate([np.geomspace(1e-30, 1, 50000), np.linspace(0, 1, 50001)[1:]]).astype(np.float32)
    got = _elementwise(ys, 1)
    ref = np.log1p(ys.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2 * ulp
    assert _elementwise(np.zeros(1, dtype=np.float32), 1)[0] == 0


def test_float32_decay_is_accurate():
    """The forward recurrence's decay 2**x (float32 polynomial): within 2 ulp of float64 numpy on
    [-126, 127.5); 2**-126 below (not 0), inf above, NaN for NaN; the unchecked variant for the
    path where A < 0 gives the same values for x <= 0."""
    ulp = 2.0**-23
    xs = np.concatenate([np.linspace(-126, 127.49, 400001), np.linspace(-1, 1, 100001)]).astype(np.float32)
    got = _elementwise(xs, 3)
    assert got.dtype == np.float32
    assert np.max(np.abs(got / np.exp2(xs.astype(np.float64)) - 1)) < 2 * ulp
    smallest = np.finfo(np.float32).tiny  # 2**-126
    edges = _elementwise(np.array([-np.inf, -200, -126.4, 0, 127.5, 200, np.inf, np.nan], dtype=np.float32), 3)
    assert edges[:7].tolist() == [smallest] * 3 + [1.0] + [np.inf] * 3 and math.isnan(edges[7])
    xs = np.concatenate([xs[xs <= 0], np.array([-np.inf, -200, -126.4], dtype=np.float32)])
    assert np.array_equal(_elementwise(xs, 4), _elementwise(xs, 3))


def test_growing_state_with_softplus():
    """Softplus on but some A > 0: the forward recurrence needs the decay's overflow check (the
    path for A < 0 skips it); results as the reference, and the two paths agree where both apply."""
    inputs = make_inputs(2, 20, 16, 150)
    inputs["A"][:, ::3] = 0.02  # exp(delta' * A) > 1: the state grows, slowly
    (out, grads), (ref_out, ref_grads) = run_both(inputs, True, torch.float32)
    assert rel_error(out, ref_out) < 1e-5
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) < 1e-5, name
    # The kernel's two recurrences give the same bits where the unchecked one may run: each
    # channel block whose A are all negative and finite. A < 0 everywhere; then one channel of
    # the second block with A = 100, so large that its decay overflows (inf, where the unchecked
    # decay would give garbage) and A = -inf in one of the first (a NaN decay where delta' = 0).
    for big in (False, True):
        x = {k: v.float().numpy() for k, v in make_inputs(2, 20, 16, 150).items()}
        if big:
            x["A"][LANES + 1, 2] = 100.0
            x["delta"][:, LANES + 1, 40:] = 30.0
            x["A"][3, 1] = -np.inf
            x["delta"][:, 3, 50] = -200.0  # delta' = 0
        outs = []
        for unchecked in (True, False):
            out = np.empty_like(x["u"])
            no_proj = np.zeros((20, 1), np.float32)
            no_states = np.empty((2, 2, 0, 16, LANES), np.float32)
            scan_cpu._forward_kernel(x["u"], x["delta"], no_proj, False, x["A"], x["B"], x["C"], x["D"], x["z"],
                                     x["delta_bias"], True, True, unchecked, out, no_states)
            outs.append(out)
        assert np.array_equal(outs[0], outs[1], equal_nan=True)
        if big:
            assert np.isinf(outs[0][:, LANES + 1, 41:]).any() and np.isnan(outs[0][:, 3]).any()


def test_long_input_crosses_forward_segments():
    """The forward loads SEGMENT chunks at a time: several segments, the last one partial."""
    inputs = as_float32(make_inputs(1, 3, 2, 2 * CHUNK * SEGMENT + CHUNK + 5, with_D=False))
    with torch.no_grad():
        out = selective_scan_cpu(**inputs, delta_softplus=True)
    assert rel_error(out, reference_scan(**inputs, delta_softplus=True)) < 1e-5


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("B", torch.zeros(2, 4, 9), "B must have shape (2, 3, 10)"),
        ("A", torch.zeros(5, 3), "A must be (dim, d_state) with dim = 4"),
        ("D", torch.zeros(3), "D must have shape (4,)"),
        ("z", torch.zeros(2, 4, 10, dtype=torch.int64), "z must be real floating point"),
    ],
)
def test_bad_input_names_the_argument(name, value, message):
    inputs = as_float32(make_inputs(2, 4, 3, 10))
    inputs[name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        selective_scan_cpu(**inputs)


def test_numba_start_up_leaves_torch_thread_count_alone():
    """numba's first parallel call starts its OpenMP pool, which reset torch's thread count to
    NUMBA_NUM_THREADS: a process that asked torch for 1 thread then ran on 2. Fresh process."""
    probe = (
        "import torch; torch.set_num_threads(1)\n"
        "from umamba.mamba.conv_cpu import causal_conv1d_silu\n"
        "causal_conv1d_silu(torch.randn(1, 4, 10), torch.randn(4, 1, 4), None)\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == "1"


# (batch, dim, d_state, L, rank): one step; dim not a multiple of LANES, odd L; a Mamba block's
# rank; several forward segments with the last one partial; ranks in groups of four and one
# by one (6 = 4 + 1 + 1).
PROJ_SHAPES = [
    (1, 16, 4, 1, 1), (3, 5, 4, 7, 2), (2, 20, 16, 150, 8), (1, 40, 3, CHUNK * SEGMENT + 77, 3), (2, 17, 4, 70, 6)
]


@pytest.mark.parametrize("shape", PROJ_SHAPES)
@pytest.mark.parametrize("options", OPTIONS)
def test_delta_proj_matches_projected_delta_and_reference(shape, options):
    """Low-rank delta projected inside the kernel = the 1x1 convolution then the scan = the reference."""
    batch, dim, d_state, length, rank = shape
    with_D, with_z, with_bias, softplus = options
    inputs = make_inputs(batch, dim, d_state, length, with_D=with_D, with_z=with_z, with_bias=with_bias)
    g = torch.Generator().manual_seed(2)
    low = torch.randn(batch, rank, length, generator=g, dtype=torch.float64)
    proj = torch.randn(dim, rank, generator=g, dtype=torch.float64) / math.sqrt(rank)
    full = F.conv1d(low, proj[..., None])  # (batch, dim, L)
    if not softplus:  # raw step sizes must be positive: a positive projection of positive values
        low, proj, full = low.abs(), proj.abs(), F.conv1d(low.abs(), proj.abs()[..., None])
    ref = reference_scan(**{**inputs, "delta": full}, delta_softplus=softplus)
    args = {k: v for k, v in inputs.items() if k != "delta"}
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        cast = {k: None if v is None else v.to(dtype) for k, v in args.items()}
        with torch.no_grad():
            out = selective_scan_cpu(**cast, delta=low.to(dtype), delta_proj=proj.to(dtype), delta_softplus=softplus)
            unfused = selective_scan_cpu(
                **cast, delta=F.conv1d(low.to(dtype), proj.to(dtype)[..., None]), delta_softplus=softplus
            )
        assert out.dtype == dtype
        assert rel_error(out, ref) < tol
        torch.testing.assert_close(out, unfused, rtol=tol, atol=tol * ref.abs().max().item())


def test_delta_proj_needs_no_grad_and_its_shape():
    inputs = as_float32(make_inputs(2, 4, 3, 10))
    inputs["delta"] = torch.randn(2, 2, 10)
    proj = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="delta_proj has no backward"):
        selective_scan_cpu(**inputs, delta_proj=proj)
    with torch.no_grad():
        assert selective_scan_cpu(**inputs, delta_proj=proj).shape == (2, 4, 10)
    with pytest.raises(ValueError, match=re.escape("delta_proj must be (dim, rank) with dim = 4")):
        selective_scan_cpu(**inputs, delta_proj=torch.randn(5, 2))
    with pytest.raises(ValueError, match=re.escape("delta must have shape (2, 3, 10)")):
        selective_scan_cpu(**inputs, delta_proj=torch.randn(4, 3))
    from umamba.mamba.scan import selective_scan

    with pytest.raises(ValueError, match="delta_proj needs the 'cpu' backend"):
        selective_scan(**inputs, delta_proj=proj.detach(), backend="torch")


def test_mamba_block_folds_dt_proj_only_in_cpu_inference(monkeypatch):
    """In CPU inference the block hands dt_proj to the scan; with a gradient, hooks on dt_proj or
    inside fast_paths.module_path() it applies dt_proj itself. The outputs agree."""
    from umamba import fast_paths
    from umamba.mamba import block

    seen = []
    scan = block.selective_scan

    def recording_scan(*args, **kwargs):
        seen.append(kwargs.get("delta_proj") is not None)
        return scan(*args, **kwargs)

    monkeypatch.setattr(block, "selective_scan", recording_scan)
    torch.manual_seed(0)
    layer = block.Mamba(d_model=24, d_state=8, backend="cpu")  # d_inner 48, dt_rank 2
    x = torch.randn(2, 75, 24)
    with torch.no_grad():
        fused = layer(x)
        assert seen == [True]
        with fast_paths.module_path():
            switched_off = layer(x)
        handle = layer.dt_proj.register_forward_hook(lambda *args: None)
        hooked = layer(x)
        handle.remove()
    assert seen == [True, False, False]
    trained = layer(x)
    assert seen == [True, False, False, False]
    reference = block.Mamba(d_model=24, d_state=8, backend="torch")
    reference.load_state_dict(layer.state_dict())
    expected = reference(x).detach()
    for out in (fused, switched_off, hooked, trained):
        torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-5)
