"""CPU speed of U-Mamba-Net: inference real-time factor against DPRNN, and where the time goes.

    python benchmarks/bench_cpu_speed.py [--seconds 10] [--train-seconds 4] [--threads 2] [--repeats 3]

Prints, for the default ``hparams/umamba.yaml`` model (random weights, batch 1, 8 kHz):

1. inference on ``--seconds`` of audio: wall time and real-time factor (RTF) for U-Mamba-Net with each
   scan backend available here, and for the bundled DPRNN configuration (``hparams/dprnn.yaml``),
   measured in the same process, with the ratio (goals: RTF <= 0.05, >= 10x faster than DPRNN);
2. the inference time per part (encoder, U-blocks, Mamba layers, mask head + decoder), from
   forward hooks;
3. one training step (forward + backward + Adam) on a ``--train-seconds`` segment, with the share of
   the selective scan (forward and backward) against convolutions and matrix products, from the
   PyTorch profiler (goal: the step is dominated by the convolutions, not the scan).

Best of ``--repeats`` runs; figures only, no pass/fail (these machines are shared and noisy).
Both models run with the allocator setting of ``umamba-separate`` (freed memory kept for reuse,
``umamba.allocator``); ``--default-malloc`` measures them with glibc's defaults instead.
"""

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from umamba.allocator import keep_freed_memory
from umamba.complexity import best_time, load_separator
from umamba.mamba.scan import cpu_kernel_available
from umamba.models.umamba_net import MambaLayer, UBlock


def inference_time(separator, mix, repeats):
    with torch.no_grad():
        separator(mix[:, : mix.shape[1] // 10])  # warm-up: numba compilation, allocator
        return best_time(lambda: separator(mix), repeats)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--train-seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
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
    times = {}
    for backend in backends:
        separator, _ = load_separator("hparams/umamba.yaml", {"scan_backend": backend})
        times[f"U-Mamba-Net ({backend} scan)"] = inference_time(separator, mix, args.repeats)
    dprnn, _ = load_separator("hparams/dprnn.yaml")
    times["DPRNN (hparams/dprnn.yaml)"] = inference_time(dprnn, mix, args.repeats)
    fastest = min(v for k, v in times.items() if k.startswith("U-Mamba"))
    print(f"\n1. Inference\n{'model':<34} {'time s':>8} {'RTF':>7} {'x U-Mamba':>10}")
    for name, seconds in times.items():
        print(f"{name:<34} {seconds:>8.3f} {seconds / args.seconds:>7.3f} {seconds / fastest:>10.1f}")

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


if __name__ == "__main__":
    main()
