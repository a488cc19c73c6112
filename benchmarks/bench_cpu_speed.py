"""CPU speed of U-Mamba-Net: inference real-time factor against DPRNN, and where the time goes.

    python benchmarks/bench_cpu_speed.py [--seconds 10] [--train-seconds 4] [--threads 2] [--repeats 5]

Prints, for the default ``hparams/umamba.yaml`` model (random weights, batch 1, 8 kHz):

1. inference on ``--seconds`` of audio: wall time and real-time factor (RTF) for U-Mamba-Net with each
   scan backend available here, with the fused CPU kernels switched off (``umamba.fast_paths.module_path``),
   and for the bundled DPRNN configuration (``hparams/dprnn.yaml``), measured in the same process,
   with the ratio (goals: RTF <= 0.05, >= 10x faster than DPRNN). U-Mamba-Net and DPRNN run in
   ``--repeats`` interleaved rounds (one inference each per round), so that both meet the same load
   from other processes; the ratio of each round is printed too;
2. the inference time per part (encoder, U-blocks, Mamba layers, mask head + decoder), from
   forward hooks;
3. one training step (forward + backward + Adam) on a ``--train-seconds`` segment, with the share of
   the selective scan (forward and backward) against convolutions and matrix products, from the
   PyTorch profiler (goal: the step is dominated by the convolutions, not the scan);
4. a roofline of one Mamba layer's forward (the default layer on ``--seconds`` of frames): its
   multiply-adds in matrix products at this machine's measured matrix-product rate, its scan at the
   measured exp and FMA rates (``benchmarks/bench_scan.py``), the bytes its tensors move at the
   measured copy bandwidth; floor = max(compute, memory) against the measured layer time (goal:
   within 3x).

Best of ``--repeats`` runs; figures only, no pass/fail (these machines are shared and noisy).
Both models run with the allocator setting of ``umamba-separate`` (freed memory kept for reuse,
``umamba.allocator``); ``--default-malloc`` measures them with glibc's defaults instead.
"""

import argparse
import collections
import time

import torch
from bench_scan import machine_rates
from torch.profiler import ProfilerActivity, profile

from umamba.allocator import keep_freed_memory
from umamba.fast_paths import module_path
from umamba.complexity import best_time, load_separator
from umamba.mamba.scan import cpu_kernel_available
from umamba.models.umamba_net import MambaLayer, UBlock


def inference_time(separator, mix, repeats):
    with torch.no_grad():
        separator(mix[:, : mix.shape[1] // 10])  # warm-up: numba compilation, allocator
        return best_time(lambda: separator(mix), repeats)


def interleaved_times(separators, mix, rounds):
    """Inference seconds of each separator in each of ``rounds`` rounds that run them one after the
    other, so that every model meets the same spells of load from other processes: {name: [s, ...]}."""
    times = {name: [] for name in separators}
    with torch.no_grad():
        for separator in separators.values():
            separator(mix[:, : mix.shape[1] // 10])  # warm-up: numba compilation, allocator
        for _ in range(rounds):
            for name, separator in separators.items():
                times[name].append(best_time(lambda: separator(mix)))
    return times


def time_by_part(separator, mix):
    """Seconds spent in each part of U-Mamba-Net during one forward pass (forward hooks)."""
    spent = collections.Counter()
    starts = {}

    def part_of(module):
        if isinstance(module, UBlock):
            return "U-blocks"
        if isinstance(module, MambaLayer):
            return "Mamba layers"
        return None

    def pre(module, args):
        starts[id(module)] = time.perf_counter()

    def post(module, args, output):
        spent[part_of(module)] += time.perf_counter() - starts.pop(id(module))

    handles = []
    for module in separator.masknet.modules():
        if part_of(module):
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            start = time.perf_counter()
            separator(mix)
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    spent["rest (encoder, bottleneck, mask head, decoder)"] = total - sum(spent.values())
    return total, spent


def training_step_profile(separator, segment):
    """Self CPU time of one training step, grouped into scan / convolution / matmul / other."""
    optimizer = torch.optim.Adam(separator.parameters(), lr=1e-4)
    separator.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        separator(segment).pow(2).mean().backward()
        optimizer.step()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    groups = collections.Counter()
    for event in prof.key_averages():
        name = event.key.lower()
        if "selectivescan" in name or "selective_scan" in name:
            group = "selective scan (fwd + bwd)"
        elif "conv" in name:
            group = "convolutions, 1x1 ones included (fwd + bwd)"
        elif name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
            group = "matrix products (fwd + bwd)"
        else:
            group = "other (norms, activations, copies, optimizer)"
        groups[group] += event.self_cpu_time_total / 1e6
    separator.eval()
    return wall, groups


def matmul_rate(repeats):
    """Multiply-adds per second of a large float32 matrix product (1024 x 1024 by 1024 x 8192)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 8192)
    torch.mm(a, b)
    return 1024 * 1024 * 8192 / best_time(lambda: torch.mm(a, b), repeats)


def mamba_layer_roofline(layer, frames, threads, repeats):
    """Prints the floor of one MambaLayer forward on (1, d_model, frames) and the measured time."""
    m = layer.mamba
    d, e, n, r = m.d_model, m.d_inner, m.d_state, m.dt_rank
    gemm_macs = frames * (d * 2 * e + e * (r + 2 * n) + r * e + e * d)  # in_proj, x_proj, dt_proj, out_proj
    scan_elements = frames * e * n  # one exp and four multiplies / multiply-adds each
    # Each tensor the layer makes is written once and read once (float32): the LayerNorm output
    # (d), xz (2e), conv + SiLU (e), x_proj (r + 2n), delta (e), the scan (e), out_proj (d), the sum (d).
    moved = 2 * 4 * frames * (3 * d + 5 * e + r + 2 * n)
    bandwidth, exp_rate, _, fma_rate = machine_rates(threads, repeats)
    mm_rate = matmul_rate(repeats)
    gemm_time = gemm_macs / mm_rate
    scan_time = scan_elements / exp_rate + 4 * scan_elements / fma_rate
    memory_time = moved / bandwidth
    floor = max(gemm_time + scan_time, memory_time)
    x = torch.randn(1, d, frames)
    with torch.no_grad():
        layer(x)
        measured = best_time(lambda: layer(x), repeats)
    print(f"\n4. Roofline of one Mamba layer's forward (d_model {d}, d_inner {e}, d_state {n}, {frames} frames, "
          f"{threads} threads)")
    print(f"  matrix products: {gemm_macs / 1e9:.3f} G multiply-adds / {mm_rate / 1e9:.1f} G/s (1024 x 1024 x 8192 "
          f"sgemm) = {gemm_time * 1e3:.2f} ms")
    print(f"  scan           : {scan_elements / 1e6:.1f} M exps / {exp_rate / 1e9:.2f} G/s + "
          f"{4 * scan_elements / 1e6:.1f} M mul/FMA / {fma_rate / 1e9:.2f} G/s = {scan_time * 1e3:.2f} ms")
    print(f"  memory         : {moved / 1e6:.1f} MB / {bandwidth / 1e9:.1f} GB/s = {memory_time * 1e3:.2f} ms")
    print(f"  floor {floor * 1e3:.2f} ms ({'compute' if gemm_time + scan_time >= memory_time else 'memory'} bound); "
          f"measured {measured * 1e3:.2f} ms = {measured / floor:.2f} x floor")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--train-seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (by default the benchmark, like umamba-separate, "
                             "calls umamba.allocator.keep_freed_memory)")
    args = parser.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sample_rate = 8000
    mix = torch.randn(1, int(args.seconds * sample_rate))
    print(f"{args.seconds:g} s of 8 kHz audio, batch 1, {torch.get_num_threads()} threads, best of {args.repeats}; "
          f"malloc {'keeps freed memory' if kept else 'as default'} (both models)")

    backends = (["cpu"] if cpu_kernel_available() else []) + ["torch"]
    fastest_name, dprnn_name = f"U-Mamba-Net ({backends[0]} scan)", "DPRNN (hparams/dprnn.yaml)"
    # The headline pair, U-Mamba-Net and DPRNN, in interleaved rounds (same load for both).
    pair = {
        fastest_name: load_separator("hparams/umamba.yaml", {"scan_backend": backends[0]})[0],
        dprnn_name: load_separator("hparams/dprnn.yaml")[0],
    }
    rounds = interleaved_times(pair, mix, args.repeats)
    times = {fastest_name: min(rounds[fastest_name])}
    with module_path():
        times["  same, fused kernels off"] = inference_time(pair[fastest_name], mix, args.repeats)
    for backend in backends[1:]:
        separator, _ = load_separator("hparams/umamba.yaml", {"scan_backend": backend})
        times[f"U-Mamba-Net ({backend} scan)"] = inference_time(separator, mix, args.repeats)
    times[dprnn_name] = min(rounds[dprnn_name])
    fastest = times[fastest_name]
    print(f"\n1. Inference\n{'model':<34} {'time s':>8} {'RTF':>7} {'x U-Mamba':>10}")
    for name, seconds in times.items():
        print(f"{name:<34} {seconds:>8.3f} {seconds / args.seconds:>7.3f} {seconds / fastest:>10.1f}")
    ratios = sorted(d / u for u, d in zip(rounds[fastest_name], rounds[dprnn_name]))
    print(f"DPRNN / U-Mamba-Net in each of {len(ratios)} interleaved rounds: "
          + " ".join(f"{r:.1f}" for r in ratios) + f" (median {ratios[len(ratios) // 2]:.1f})")

    separator, _ = load_separator("hparams/umamba.yaml", {"scan_backend": backends[0]})
    total, spent = time_by_part(separator, mix)
    print(f"\n2. Where inference time goes ({backends[0]} scan, one pass, {total:.3f} s)")
    for part, seconds in spent.most_common():
        print(f"{part:<48} {seconds:>7.3f} s {100 * seconds / total:>5.1f} %")

    segment = torch.randn(1, int(args.train_seconds * sample_rate))
    wall, groups = training_step_profile(separator, segment)
    total_cpu = sum(groups.values())
    print(f"\n3. One training step on a {args.train_seconds:g} s segment ({backends[0]} scan): {wall:.3f} s wall")
    for group, seconds in groups.most_common():
        print(f"{group:<48} {seconds:>7.3f} s {100 * seconds / total_cpu:>5.1f} % of profiled CPU time")

    layer = next(m for m in separator.masknet.modules() if isinstance(m, MambaLayer))
    with torch.no_grad():
        frames = separator.encoder(mix).shape[-1]
    mamba_layer_roofline(layer, frames, args.threads, max(args.repeats, 5))


if __name__ == "__main__":
    main()
