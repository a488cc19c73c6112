"""Time one Mamba block, forward and backward, on CPU: our backends against peers, as ratios.

    python benchmarks/bench_mamba.py [--length 8000] [--d-model 128] [--threads 2] [--repeats 3]

Compared, on the same weights and input (batch 1):
- ``umamba`` with each scan backend available here ("cpu" = numba kernel, "torch" = chunked scan);
- mambapy's MambaBlock (pure PyTorch, parallel ``pscan``), when installed;
- a sequential reference: the same block with mamba_ssm's ``selective_scan_ref``-style loop
  over time (one PyTorch step per frame), differentiated by autograd.
Ratios are to the fastest ``umamba`` backend, measured in the same process. Figures only: no
pass/fail (these machines are shared and noisy).
"""

import argparse

import torch
import torch.nn.functional as F

from umamba.complexity import best_time
from umamba.mamba import Mamba
from umamba.mamba import scan as scan_module
from umamba.mamba.scan import cpu_kernel_available


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's ``selective_scan_ref``: one step per frame."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return y * F.silu(z)


def bench(block, x, repeats):
    """Best-of forward time and forward+backward time."""
    x = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            block(x)

    def train_step():
        block.zero_grad(set_to_none=True)
        block(x).sum().backward()

    forward()  # warm-up (numba compilation, allocator)
    return best_time(forward, repeats), best_time(train_step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sequential", action="store_true", help="skip the slow per-frame reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, args.length, args.d_model)
    print(f"Mamba block, batch 1, length {args.length}, d_model {args.d_model}, d_state 16, expand 2, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")

    reference = Mamba(args.d_model, backend="torch")
    rows = {}
    for backend in (["cpu"] if cpu_kernel_available() else []) + ["torch"]:
        block = Mamba(args.d_model, backend=backend)
        block.load_state_dict(reference.state_dict())
        rows[f"umamba ({backend} scan)"] = bench(block, x, args.repeats)
    try:
        from mambapy.mamba import MambaBlock, MambaConfig

        peer = MambaBlock(MambaConfig(d_model=args.d_model, n_layers=1, d_state=16, expand_factor=2, pscan=True))
        peer.load_state_dict(reference.state_dict(), strict=True)
        rows["mambapy (pscan)"] = bench(peer, x, args.repeats)
    except ImportError:
        print("mambapy not installed: peer skipped (pip install mambapy)")
    if not args.skip_sequential:
        original = scan_module.selective_scan_torch
        scan_module.selective_scan_torch = sequential_scan
        try:
            rows["sequential reference"] = bench(reference, x, 1)
        finally:
            scan_module.selective_scan_torch = original

    base_fwd, base_train = min(rows[k][0] for k in rows if k.startswith("umamba")), min(
        rows[k][1] for k in rows if k.startswith("umamba")
    )
    print(f"{'implementation':<24} {'forward s':>10} {'x fastest':>10} {'fwd+bwd s':>10} {'x fastest':>10}")
    for name, (fwd, train) in rows.items():
        print(f"{name:<24} {fwd:>10.3f} {fwd / base_fwd:>10.1f} {train:>10.3f} {train / base_train:>10.1f}")


if __name__ == "__main__":
    main()
