"""Speed of the numba CPU selective scan against other CPU scans, and against this machine's roofline.

    python benchmarks/bench_scan.py [--length 8000] [--threads 2] [--batch 1] [--dim 256] [--d-state 16]

Prints, for float32 inputs of shape (batch, dim, length) with ``delta_softplus``, ``D``, ``z`` and
``delta_bias`` (as a Mamba block calls it):

1. forward and forward + backward wall time of ``umamba.mamba.scan_cpu.selective_scan_cpu`` (the
   "cpu" backend), of mambapy's ``pscan`` selective scan when mambapy is installed, of the pure
   PyTorch chunked scan (``umamba.mamba.scan.selective_scan_torch``, the "torch" backend) and of a
   step-by-step PyTorch loop (timed on ``--loop-length`` steps and scaled to ``--length``), with
   their ratios to the numba scan, and the backward / forward ratio of the numba scan;
2. a roofline of the numba forward pass: the bytes it must move (read u, delta, z, B, C and write
   y, once each), the work per (batch, channel, step, state) element (one exp, two multiplies,
   two fused multiply-adds), this machine's achievable memory bandwidth (a parallel copy), exp
   throughput (the forward recurrence's own vectorised exp, ``2 ** x`` with A pre-scaled by
   log2(e), over a cache-resident array; libm's exp for reference) and multiply-add throughput,
   the floor time max(bytes / bandwidth, exp time + FMA time) and measured / floor.

Best of ``--repeats`` runs; figures only, no pass/fail (these machines are shared and noisy).
"""

import argparse
import math

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from umamba.complexity import best_time
from umamba.mamba import scan_cpu
from umamba.mamba.scan_cpu import selective_scan_cpu

try:
    from mambapy.pscan import pscan
except ImportError:
    pscan = None

try:
    from umamba.mamba.scan import selective_scan_torch
except ImportError:
    selective_scan_torch = None


def make_inputs(batch, dim, d_state, length, seed=0):
    """float32 inputs as a Mamba block produces them, all requiring a gradient."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) - 1.0,
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, d_state, length, generator=g),
        "C": torch.randn(batch, d_state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.5,
    }
    return {name: tensor.requires_grad_() for name, tensor in inputs.items()}


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """mambapy's selective scan (``MambaBlock.selective_scan``: parallel ``pscan`` over (B, L, D, N)
    tensors), with softplus, bias and gate around it as mambapy's ``ssm`` applies them."""
    x, dt = u.transpose(1, 2), F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (B, L, D)
    delta_A = torch.exp(dt.unsqueeze(-1) * A)  # (B, L, D, N)
    BX = (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)  # (B, L, D, N)
    hs = pscan(delta_A, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return y.transpose(1, 2) * F.silu(z)


def loop_scan(u, delta, A, B, C, D, z, delta_bias):
    """The recurrence one step at a time in PyTorch (state (batch, dim, N) per step)."""
    dt = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, dim=-1) + D[:, None] * u) * F.silu(z)


def time_scan(fn, inputs, repeats, softplus_flag=True):
    """(forward seconds without autograd, forward + backward seconds)."""
    kwargs = {"delta_softplus": True} if softplus_flag else {}

    def forward():
        with torch.no_grad():
            fn(**inputs, **kwargs)

    def forward_backward():
        out = fn(**inputs, **kwargs)
        torch.autograd.grad(out, list(inputs.values()), torch.ones_like(out))

    forward_backward()  # warm-up
    return best_time(forward, repeats), best_time(forward_backward, repeats)


@numba.njit(parallel=True)
def _copy(src, dst):
    for i in prange(src.size):
        dst[i] = src[i]


@numba.njit(parallel=True, fastmath={"contract"}, error_model="numpy")
def _exp_fast(x, out, reps):
    for i in prange(x.shape[0]):
        for _ in range(reps):
            for j in range(x.shape[1]):
                out[i, j] = scan_cpu._decay_negative(x[i, j])  # the forward recurrence's exp (2 ** x)


@numba.njit(parallel=True, error_model="numpy")
def _exp_libm(x, out, reps):
    for i in prange(x.shape[0]):
        for _ in range(reps):
            for j in range(x.shape[1]):
                out[i, j] = np.exp(x[i, j])


@numba.njit(parallel=True, fastmath={"contract"})
def _fma(x, reps):
    # Eight dependent multiply-adds per element of a cache-resident array; elements are independent.
    a, b = np.float32(0.999), np.float32(0.001)
    for i in prange(x.shape[0]):
        for _ in range(reps):
            for j in range(x.shape[1]):
                v = x[i, j]
                v = ((((((((v * a + b) * a + b) * a + b) * a + b) * a + b) * a + b) * a + b) * a + b)
                x[i, j] = v


def machine_rates(threads, repeats):
    """(bytes/s of a parallel copy, fast exp/s, libm exp/s, multiply-adds/s) with ``threads`` threads."""
    n = 1 << 25  # 128 MiB per array
    src, dst = np.ones(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    _copy(src, dst)
    bandwidth = 2 * src.nbytes / best_time(lambda: _copy(src, dst), repeats)

    x = -np.random.default_rng(0).random((threads, 4096), dtype=np.float32) * 20  # 16 KiB per thread
    out = np.empty_like(x)
    reps = 2000
    _exp_fast(x, out, 1)
    _exp_libm(x, out, 1)
    exp_rate = reps * x.size / best_time(lambda: _exp_fast(x, out, reps), repeats)
    libm_rate = 200 * x.size / best_time(lambda: _exp_libm(x, out, 200), repeats)

    y = np.ones((threads, 2048), dtype=np.float32)
    _fma(y, 1)
    fma_rate = 8 * reps * y.size / best_time(lambda: _fma(y, reps), repeats)
    return bandwidth, exp_rate, libm_rate, fma_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--loop-length", type=int, default=500, help="steps timed for the PyTorch loop")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    batch, dim, d_state, length = args.batch, args.dim, args.d_state, args.length
    print(f"selective scan, float32, batch {batch}, dim {dim}, d_state {d_state}, L {length}, {args.threads} threads")

    inputs = make_inputs(batch, dim, d_state, length)
    rows = [("numba (scan_cpu)",) + time_scan(selective_scan_cpu, inputs, args.repeats)]
    if pscan is not None:
        rows.append(("mambapy pscan",) + time_scan(mambapy_scan, inputs, args.repeats, softplus_flag=False))
    if selective_scan_torch is not None:
        rows.append(("torch chunked (scan.py)",) + time_scan(selective_scan_torch, inputs, args.repeats))
    short = make_inputs(batch, dim, d_state, min(args.loop_length, length))
    scale = length / short["u"].shape[2]
    fwd, fwd_bwd = time_scan(loop_scan, short, max(1, args.repeats // 2), softplus_flag=False)
    rows.append((f"torch loop (x{scale:.0f} of L {short['u'].shape[2]})", fwd * scale, fwd_bwd * scale))

    numba_fwd, numba_fwd_bwd = rows[0][1:]
    print(f"numba threading layer: {numba.threading_layer()}")
    print(f"\n{'scan':<30}{'forward ms':>12}{'fwd+bwd ms':>12}{'fwd / numba':>13}{'f+b / numba':>13}")
    for name, fwd, fwd_bwd in rows:
        print(f"{name:<30}{fwd * 1e3:12.1f}{fwd_bwd * 1e3:12.1f}{fwd / numba_fwd:13.1f}{fwd_bwd / numba_fwd_bwd:13.1f}")
    backward = numba_fwd_bwd - numba_fwd
    print(f"numba backward (fwd+bwd - fwd) {backward * 1e3:.1f} ms = {backward / numba_fwd:.2f} x forward")

    bandwidth, exp_rate, libm_rate, fma_rate = machine_rates(args.threads, args.repeats)
    elements = batch * dim * length * d_state
    moved = 4 * (4 * batch * dim * length + 2 * batch * d_state * length)
    memory_time = moved / bandwidth
    compute_time = elements / exp_rate + 4 * elements / fma_rate
    floor = max(memory_time, compute_time)
    print(f"\nroofline of the numba forward ({args.threads} threads)")
    print(f"  memory : {moved / 1e6:.1f} MB moved / {bandwidth / 1e9:.1f} GB/s (parallel copy) = {memory_time * 1e3:.2f} ms")
    print(f"  exp    : {elements / 1e6:.1f} M / {exp_rate / 1e9:.2f} G/s (vectorised, cache-resident) "
          f"= {elements / exp_rate * 1e3:.2f} ms   [libm exp: {libm_rate / 1e9:.2f} G/s]")
    print(f"  mul/FMA: {4 * elements / 1e6:.1f} M / {fma_rate / 1e9:.2f} G/s = {4 * elements / fma_rate * 1e3:.2f} ms")
    print(f"  floor  : {floor * 1e3:.2f} ms ({'compute' if compute_time >= memory_time else 'memory'} bound); "
          f"measured {numba_fwd * 1e3:.2f} ms = {numba_fwd / floor:.2f} x floor")
    print(f"  forward throughput {elements / numba_fwd / 1e9:.2f} G elements/s; "
          f"{math.ceil(length / scan_cpu.CHUNK)} chunks of {scan_cpu.CHUNK} steps")


if __name__ == "__main__":
    main()
