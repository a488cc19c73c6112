"""CPU inference time and peak memory of every bundled separator against the input length.

    python benchmarks/bench_models.py [--lengths 1 5 10 30 60] [--models umamba sudormrf ...]
                                      [--threads 2] [--repeats 1] [--max-seconds sepformer=30 ...]
                                      [--out DIR]

For each model (``hparams/<model>.yaml``, random weights) and each length, a fresh subprocess
(``umamba.compare.measure_cost``) builds the model, counts its MACs and times one forward pass of
batch 1 after a warm-up (the fastest of ``--repeats``), with ``--threads`` torch threads; it reports:

- ``time s`` and ``RTF``: the forward pass's wall time, and that time / the input duration;
- ``peak RSS``: the subprocess's peak resident memory during the forward passes (imports and
  weights included; ``model_rss_mib`` in the CSV is the resident memory before them);
- ratios to U-Mamba-Net at the same length.

``--max-seconds MODEL=S`` skips the lengths above ``S`` for that model (noted in the table and
CSV); a measurement that fails (e.g. out of memory) is noted and the benchmark goes on. If the
numba CPU scan cannot be imported, U-Mamba-Net runs with ``scan_backend: torch`` (noted).

Writes ``DIR/bench_models.csv`` and ``DIR/bench_models.png`` (time and memory against length,
log-log); DIR defaults to ``results/bench_models``. Figures only: no pass/fail (these machines are
shared and noisy).
"""

import argparse
import csv
import math
import os

from tqdm import tqdm

from umamba.compare import BUNDLED_MODELS, PACKAGE_ROOT, CostMeasurementError, measure_cost

FIELDS = ("model", "seconds", "status", "params", "gmac_per_second", "time_s", "real_time_factor",
          "peak_rss_mib", "model_rss_mib", "time_ratio_to_umamba", "memory_ratio_to_umamba", "note")


def _max_seconds(pairs: list[str], models) -> dict:
    """``["sepformer=30", ...]`` -> ``{"sepformer": 30.0}``."""
    limits = {}
    for pair in pairs:
        model, sep, seconds = pair.partition("=")
        if not sep or model not in models:
            raise SystemExit(f"--max-seconds takes MODEL=SECONDS with MODEL one of {', '.join(models)}, got {pair!r}")
        limits[model] = float(seconds)
    return limits


def benchmark(models, lengths, threads: int, max_seconds: dict, repeats: int = 1) -> list[dict]:
    """One row per model and length (see ``FIELDS``); ratios filled in once U-Mamba-Net is measured."""
    rows = []
    for model, seconds in tqdm([(m, s) for m in models for s in lengths], desc="benchmark"):
        row = {"model": model, "seconds": seconds, "status": "ok", "note": ""}
        if seconds > max_seconds.get(model, math.inf):
            row.update(status="skipped", note=f"longer than --max-seconds {model}={max_seconds[model]:g}")
            rows.append(row)
            continue
        try:
            cost = measure_cost(os.path.join(PACKAGE_ROOT, "hparams", f"{model}.yaml"), seconds, threads, repeats)
        except CostMeasurementError as error:
            row.update(status="failed", note=str(error).splitlines()[0])
            rows.append(row)
            continue
        row.update(params=cost["params"], gmac_per_second=cost["gmac_per_second"], time_s=cost["cpu_time"],
                   real_time_factor=cost["real_time_factor"], peak_rss_mib=cost["peak_rss_mib"],
                   model_rss_mib=cost["model_rss_mib"])
        if cost["model"] == "U-Mamba-Net" and cost["scan_backend"] == "torch":
            row["note"] = "scan_backend torch (numba CPU scan not importable)"
        rows.append(row)
    reference = {r["seconds"]: r for r in rows if r["model"] == "umamba" and r["status"] == "ok"}
    for row in rows:
        ref = reference.get(row["seconds"])
        if row["status"] == "ok" and ref:
            row["time_ratio_to_umamba"] = row["time_s"] / ref["time_s"]
            row["memory_ratio_to_umamba"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
    return rows


def print_table(rows: list[dict], threads: int) -> None:
    print(f"\nrandom weights, batch 1, 8 kHz, {threads} threads; ratios: / U-Mamba-Net at the same length")
    print(f"{'model':>11} {'length s':>9} {'GMAC/s':>8} {'time s':>8} {'RTF':>7} {'peak RSS MiB':>13} "
          f"{'x time':>7} {'x memory':>9}  note")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']:>11} {r['seconds']:>9g} {r['status']:>8}  {r['note']}")
            continue
        ratios = [f"{r[k]:.2f}" if k in r else "-" for k in ("time_ratio_to_umamba", "memory_ratio_to_umamba")]
        print(f"{r['model']:>11} {r['seconds']:>9g} {r['gmac_per_second']:>8.3g} {r['time_s']:>8.3f} "
              f"{r['real_time_factor']:>7.3f} {r['peak_rss_mib']:>13.0f} {ratios[0]:>7} {ratios[1]:>9}  {r['note']}")


def plot(rows: list[dict], path: str, threads: int) -> None:
    """Forward time and peak RSS against input length, one line per model, log-log."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        for ax, key in zip(axes, ("time_s", "peak_rss_mib")):
            ax.plot([r["seconds"] for r in ok], [r[key] for r in ok], marker="o", label=model)
    for ax, label in zip(axes, (f"forward time (s, {threads} threads)", "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input length (s of 8 kHz audio)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=float, nargs="+", default=[1.0, 5.0, 10.0, 30.0, 60.0],
                        help="input lengths in seconds")
    parser.add_argument("--models", nargs="+", default=list(BUNDLED_MODELS), choices=BUNDLED_MODELS)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of each measurement")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward passes; the fastest is reported")
    parser.add_argument("--max-seconds", nargs="*", default=[], metavar="MODEL=SECONDS",
                        help="skip the lengths above SECONDS for MODEL")
    parser.add_argument("--out", default=os.path.join("results", "bench_models"), help="folder of the CSV and plot")
    args = parser.parse_args()
    rows = benchmark(args.models, args.lengths, args.threads, _max_seconds(args.max_seconds, args.models),
                     args.repeats)
    print_table(rows, args.threads)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench_models.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    png_path = os.path.join(args.out, "bench_models.png")
    plot(rows, png_path, args.threads)
    print(f"written: {csv_path}, {png_path}")


if __name__ == "__main__":
    main()
