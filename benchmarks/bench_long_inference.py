"""Wall time, real-time factor and peak memory of separating long recordings, chunk by chunk.

    python benchmarks/bench_long_inference.py [--minutes 1 10] [--threads 2] [--chunk-seconds 10]
                                              [--overlap-seconds 1] [--hparams hparams/umamba.yaml]
                                              [--key value ...]

The model is the yaml's Encoder/MaskNet/Decoder with random weights (timing only), saved as a
training run would save it and exported with ``umamba.export``. For each length, an 8 kHz
recording (two speech-like sources and noise) is written to a temporary folder and separated to
wav files by ``UMambaSeparation.separate_to_files`` (the ``umamba-separate`` code path) in a fresh
subprocess, which reports:

- ``load s``: importing, building the model and loading the parameters;
- ``separate s`` and ``RTF``: separating the file (after a 1-second warm-up, which compiles the
  numba scan kernel), and that time divided by the recording's duration (< 1: faster than real time);
- ``peak RSS``: the subprocess's peak resident memory (``VmHWM``), everything included.

Extra ``--key value`` pairs override the yaml (e.g. ``--scan_backend torch``). Figures only: no
pass/fail (these machines are shared and noisy).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_RATE = 8000


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ``VmHWM``)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def recording(seconds: float, seed: int = 0) -> np.ndarray:
    """Two speech-like sources (gliding harmonics, noise bursts with syllable-rate envelopes) + noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.4 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SAMPLE_RATE) / k for k in range(1, 6))
    voiced *= np.maximum(0.0, np.sin(2 * np.pi * 4.0 * t)) ** 2
    bursts = rng.standard_normal(t.size) * np.maximum(0.0, np.sin(2 * np.pi * 2.7 * t + 1.0)) ** 4
    noise = 0.05 * rng.standard_normal(t.size)
    return (0.1 * (voiced + bursts + noise)).astype(np.float32)


def export_random_model(hparams_file: str, overrides: dict, folder: str) -> str:
    """Saves the yaml's modules (random weights) as a training run's checkpoint and exports it."""
    from hyperpyyaml import load_hyperpyyaml, resolve_references

    from umamba.export import export_model

    run = os.path.join(folder, "run")
    os.makedirs(run)
    with open(hparams_file, encoding="utf-8") as f:
        resolved = resolve_references(f, {"output_folder": run, **overrides}).getvalue()
    with open(os.path.join(run, "hyperparams.yaml"), "w", encoding="utf-8") as f:
        f.write(resolved)
    load_hyperpyyaml(resolved)["checkpointer"].save_checkpoint(meta={"neg_si_snr": 0.0})
    model_dir = os.path.join(folder, "model")
    export_model(run, model_dir)
    return model_dir


def child(model_dir: str, wav: str, out_dir: str, chunk_seconds: float, overlap_seconds: float) -> None:
    """Runs in the fresh subprocess: load, warm up, separate ``wav``; prints one JSON line."""
    start = time.perf_counter()
    import torch

    from umamba.allocator import keep_freed_memory
    from umamba.data.audio import write_audio
    from umamba.inference import UMambaSeparation

    keep_freed_memory()  # as umamba-separate does
    model = UMambaSeparation.from_hparams(source=model_dir)
    load = time.perf_counter() - start
    warm = os.path.join(out_dir, "warm-up.wav")
    write_audio(warm, recording(1.0, seed=1), SAMPLE_RATE)
    model.separate_file(warm)
    start = time.perf_counter()
    model.separate_to_files(wav, out_dir, chunk_seconds, overlap_seconds)
    separate = time.perf_counter() - start
    print(json.dumps({"load": load, "separate": separate, "peak_rss_mb": peak_rss_mb(),
                      "threads": torch.get_num_threads()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0], help="recording lengths")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of each run")
    parser.add_argument("--chunk-seconds", type=float, default=10.0)
    parser.add_argument("--overlap-seconds", type=float, default=1.0)
    parser.add_argument("--hparams", default=os.path.join(REPO, "hparams", "umamba.yaml"))
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "WAV", "OUT"), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(*args.child, args.chunk_seconds, args.overlap_seconds)
        return
    if len(rest) % 2:
        parser.error(f"overrides come in pairs (--key value), got {rest}")
    import yaml

    from umamba.data.audio import write_audio

    overrides = {k.lstrip("-"): yaml.safe_load(v) for k, v in zip(rest[::2], rest[1::2])}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "NUMBA_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_random_model(args.hparams, overrides, tmp)
        print(f"model: {args.hparams} {overrides or ''} (random weights), {SAMPLE_RATE} Hz, chunks of "
              f"{args.chunk_seconds:g} s overlapping by {args.overlap_seconds:g} s, {args.threads} threads")
        print(f"{'recording':>10} {'load s':>8} {'separate s':>11} {'RTF':>7} {'peak RSS MiB':>13}")
        for minutes in args.minutes:
            wav = os.path.join(tmp, f"rec_{minutes:g}min.wav")
            write_audio(wav, recording(60 * minutes), SAMPLE_RATE)
            out_dir = os.path.join(tmp, f"out_{minutes:g}min")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", model_dir, wav, out_dir,
                   "--chunk-seconds", str(args.chunk_seconds), "--overlap-seconds", str(args.overlap_seconds)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {minutes:g}-minute run failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{minutes:>7g} min {r['load']:>8.1f} {r['separate']:>11.1f} "
                  f"{r['separate'] / (60 * minutes):>7.3f} {r['peak_rss_mb']:>13.0f}", flush=True)
            os.remove(wav)


if __name__ == "__main__":
    main()
