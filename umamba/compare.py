"""Compare finished separation runs: scores, parameters, compute, CPU speed and memory.

Usage::

    python -m umamba.compare RUN_DIR [RUN_DIR ...] [--out DIR] [--seconds 10] [--threads 2] [--repeats 1]
    python -m umamba.compare --demo [--budget-minutes 2] [--models umamba sepformer ...] [--out DIR]
                             [--train-args "--demo_n_train 24 --demo_seconds 2"]

A run folder is a training run's ``output_folder`` (``train.py`` writes ``hyperparams.yaml``,
``train_log.txt`` and ``test_results/summary.csv`` there). For each run, the scores are the means
of ``test_results/summary.csv`` (SI-SNRi, SDRi, PESQ, STOI) and the cost is measured on the
run's own model (its ``hyperparams.yaml``, random weights: cost does not depend on them), each in
a fresh subprocess with ``--threads`` torch threads on ``--seconds`` of random audio:

- parameters, and GMAC per second of audio (counted by :mod:`umamba.complexity`);
- real-time factor: wall time of a forward pass (after a warm-up; the fastest of ``--repeats``)
  / audio duration;
- peak RSS: the subprocess's peak resident memory during the forward passes (Linux ``VmHWM``,
  reset once the model is built): imports and weights included, i.e. what separating needs.

``DIR`` (default ``results/comparison``) receives ``comparison.md`` (the table, the paper's
numbers beside ours where it has them, and whether the runs used the synthetic demo corpus,
detected from ``data_folder: null`` in their ``hyperparams.yaml``), ``comparison.csv`` and
``comparison.png`` (SI-SNRi against GMAC per second, marker area by parameters).

``--demo`` first trains every bundled recipe (``hparams/<model>.yaml``) with ``train.py`` for
the same CPU budget (``--train_budget_minutes``) on the synthetic demo corpus, into
``DIR/<model>``, then compares those runs.
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile

import yaml
from tqdm import tqdm

from umamba.allocator import keep_freed_memory

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_MODELS = ("umamba", "sudormrf", "sepformer", "dprnn", "convtasnet")
"""The recipes in ``hparams/`` (``hparams/<name>.yaml``), U-Mamba-Net first."""

METRICS = {"si_snri": "SI-SNRi (dB)", "sdri": "SDRi (dB)", "pesq": "PESQ", "stoi": "STOI"}
"""Test metrics read from ``summary.csv`` (their means) and their table headings."""

PAPER = {"U-Mamba-Net": (8.50, 2.5), "DPRNN": (7.58, 23.9)}
"""The U-Mamba-Net paper's results: model -> (SI-SNRi in dB, GMAC per second of 8 kHz audio)."""

PAPER_NOTE = (
    "Paper: Dang et al., U-Mamba-Net, APSIPA ASC 2024 (arXiv 2412.18217), on noisy-reverberant "
    "Libri2Mix (WHAM! noise, simulated reverberation, anechoic targets). Its DPRNN is the original "
    "configuration, not SpeechBrain's recipe measured here; it also reports a cascaded DPRNN (CMTL) "
    "at 8.08 dB SI-SNRi and 40.2 GMAC/s, which has no recipe here."
)


class IncompleteRunError(FileNotFoundError):
    """A run folder lacks a file the comparison needs (its hyperparams or its test results)."""


class CostMeasurementError(RuntimeError):
    """The subprocess measuring a model failed (e.g. out of memory)."""


class DemoTrainingError(RuntimeError):
    """``train.py`` failed on one of the demo runs."""


class _TagsAsText(yaml.SafeLoader):
    """Reads a HyperPyYAML file as plain data, without building objects: a tagged node
    (``!new:...``, ``!ref ...``) reads as its tag."""


_TagsAsText.add_multi_constructor("!", lambda loader, suffix, node: "!" + suffix)


def read_hparams_values(hparams_file: str | os.PathLike) -> dict:
    r"""The top-level values of a recipe yaml, objects left unbuilt (tagged nodes read as their tag).

    Example
    -------
    >>> path = getfixture("tmp_path") / "hyperparams.yaml"
    >>> _ = path.write_text("data_folder: null\nN: 4\nEncoder: !new:torch.nn.Conv1d\n  in_channels: !ref <N>\n")
    >>> read_hparams_values(path)
    {'data_folder': None, 'N': 4, 'Encoder': '!new:torch.nn.Conv1d'}
    """
    try:
        with open(hparams_file, encoding="utf-8") as f:
            return yaml.load(f, _TagsAsText)
    except yaml.YAMLError as error:
        raise ValueError(f"{hparams_file} is not valid YAML: {error}") from None


def read_summary(summary_csv: str) -> dict:
    """Metric -> mean from an evaluation's ``summary.csv`` (NaN where every utterance failed).

    Example
    -------
    >>> from umamba.evaluation import EvaluationReport
    >>> folder = getfixture("tmp_path")
    >>> with EvaluationReport(folder) as report:
    ...     report.add("utt1", {"si_snri": 9.0})
    ...     report.add("utt2", {"si_snri": 11.0})
    >>> read_summary(report.summary_path)
    {'si_snri': 10.0}
    """
    with open(summary_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "metric" not in rows[0] or "mean" not in rows[0]:
        raise ValueError(f"{summary_csv} is not an evaluation summary (columns metric, mean, ...)")
    return {row["metric"]: float(row["mean"]) for row in rows}


def trained_epochs(train_log: str) -> int | None:
    """The last epoch number in a SpeechBrain ``train_log.txt`` (None without the file)."""
    if not os.path.isfile(train_log):
        return None
    with open(train_log, encoding="utf-8") as f:
        epochs = [int(m.group(1)) for m in re.finditer(r"^epoch: (\d+),", f.read(), flags=re.MULTILINE)]
    return max(epochs, default=None)


def model_name(masknet) -> str:
    """The architecture of a masknet: U-Mamba-Net, SuDoRM-RF, SepFormer, DPRNN or Conv-TasNet.

    Example
    -------
    >>> from umamba.models import UMambaMaskNet
    >>> model_name(UMambaMaskNet(16, 8, 16, num_blocks=1, use_mamba=False))
    'SuDoRM-RF'
    """
    from speechbrain.lobes.models.conv_tasnet import MaskNet as ConvTasNetMaskNet
    from speechbrain.lobes.models.dual_path import Dual_Path_Model, SBRNNBlock, SBTransformerBlock

    from umamba.mamba import Mamba
    from umamba.models import UMambaMaskNet

    if isinstance(masknet, UMambaMaskNet):
        return "U-Mamba-Net" if any(isinstance(m, Mamba) for m in masknet.modules()) else "SuDoRM-RF"
    if isinstance(masknet, Dual_Path_Model):
        intra = masknet.dual_mdl[0].intra_mdl
        if isinstance(intra, SBTransformerBlock):
            return "SepFormer"
        if isinstance(intra, SBRNNBlock):
            return "DPRNN"
    if isinstance(masknet, ConvTasNetMaskNet):
        return "Conv-TasNet"
    return type(masknet).__name__


def _status_mib(field: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status", encoding="utf-8") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _measure_here(hparams_file: str, seconds: float, threads: int, repeats: int, overrides: dict) -> dict:
    """The subprocess side of :func:`measure_cost`."""
    from umamba.complexity import load_separator, measure

    values = read_hparams_values(hparams_file)
    if "scan_backend" in values and "scan_backend" not in overrides and not _cpu_scan_available():
        overrides = {**overrides, "scan_backend": "torch"}
    with tempfile.TemporaryDirectory() as tmp:
        # A run's hyperparams.yaml names its own save folder: build the checkpointer elsewhere.
        if "checkpointer" in values:
            overrides = {**overrides, "checkpointer": {"checkpoints_dir": tmp}}
        separator, sample_rate = load_separator(hparams_file, overrides)
    model_rss = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets VmHWM to the current RSS: the peak below is the forward passes'
    cost = measure(separator, sample_rate, seconds, threads, repeats)
    return {
        "model": model_name(separator.masknet),
        "sample_rate": sample_rate,
        "scan_backend": overrides.get("scan_backend", values.get("scan_backend")),
        "params": cost.params,
        "gmac_per_second": cost.gmac_per_second,
        "cpu_time": cost.cpu_time,
        "real_time_factor": cost.real_time_factor,
        "threads": cost.threads,
        "model_rss_mib": model_rss,
        "peak_rss_mib": _status_mib("VmHWM"),
    }


def _cpu_scan_available() -> bool:
    try:
        from umamba.mamba.scan_cpu import selective_scan_cpu  # noqa: F401
    except ImportError:
        return False
    return True


def _subprocess_env(threads: int) -> dict:
    """This environment with ``threads`` CPU threads and this package importable."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "NUMBA_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
    }


def measure_cost(hparams_file: str, seconds: float = 10.0, threads: int = 2, repeats: int = 1,
                 overrides: dict | None = None) -> dict:
    """Cost of the yaml's separator on ``seconds`` of audio, measured in a fresh subprocess.

    Returns a dict: ``model`` (see :func:`model_name`), ``sample_rate``, ``scan_backend`` (None
    without Mamba), ``params``, ``gmac_per_second``, ``cpu_time`` (s, the fastest of ``repeats``
    forward passes after a warm-up), ``real_time_factor``, ``threads``, ``model_rss_mib``
    (resident memory once the model is built) and ``peak_rss_mib`` (peak resident memory during
    the forward passes, the model included). When numba's CPU scan cannot be imported, a yaml
    with ``scan_backend`` is measured with the pure PyTorch scan.
    """
    spec = {"hparams_file": hparams_file, "seconds": seconds, "threads": threads, "repeats": repeats,
            "overrides": overrides or {}}
    proc = subprocess.run([sys.executable, "-m", "umamba.compare", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=_subprocess_env(threads))
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else f"exit status {proc.returncode}"
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise CostMeasurementError(f"measuring {hparams_file} on {seconds:g} s of audio failed ({why}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclasses.dataclass
class RunResult:
    """One row of the comparison: a run's scores and its model's measured cost."""

    run: str
    synthetic: bool
    epochs: int | None
    budget_minutes: float
    scores: dict  # METRICS key -> mean (NaN when absent)
    cost: dict  # see measure_cost

    @property
    def model(self) -> str:
        return self.cost["model"]


def collect_run(run_dir: str, seconds: float = 10.0, threads: int = 2, repeats: int = 1) -> RunResult:
    """Reads a finished run's scores and measures its model (see :func:`measure_cost`)."""
    hparams_file = os.path.join(run_dir, "hyperparams.yaml")
    summary_csv = os.path.join(run_dir, "test_results", "summary.csv")
    if not os.path.isfile(hparams_file):
        raise IncompleteRunError(f"{run_dir} is not a training run folder: {hparams_file} is missing")
    if not os.path.isfile(summary_csv):
        raise IncompleteRunError(
            f"{run_dir} has no test results ({summary_csv} is missing): let the run finish, or evaluate "
            f"it with `python train.py {hparams_file} --test_only`"
        )
    values = read_hparams_values(hparams_file)
    summary = read_summary(summary_csv)
    return RunResult(
        run=run_dir,
        synthetic=not values.get("data_folder"),
        epochs=trained_epochs(os.path.join(run_dir, "train_log.txt")),
        budget_minutes=float(values.get("train_budget_minutes") or 0),
        scores={key: summary.get(key, math.nan) for key in METRICS},
        cost=measure_cost(hparams_file, seconds, threads, repeats),
    )


CSV_FIELDS = ("model", "run", "synthetic", "epochs", "budget_minutes", *METRICS, "params", "gmac_per_second",
              "real_time_factor", "peak_rss_mib", "model_rss_mib", "threads", "seconds",
              "paper_si_snri", "paper_gmac_per_second")


def _csv_row(result: RunResult, seconds: float) -> dict:
    paper = PAPER.get(result.model, (None, None))
    return {
        "model": result.model, "run": result.run, "synthetic": result.synthetic, "epochs": result.epochs,
        "budget_minutes": result.budget_minutes, **result.scores,
        **{key: result.cost[key] for key in ("params", "gmac_per_second", "real_time_factor", "peak_rss_mib",
                                             "model_rss_mib", "threads")},
        "seconds": seconds, "paper_si_snri": paper[0], "paper_gmac_per_second": paper[1],
    }


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _data_line(results: list[RunResult]) -> str:
    synthetic = [r.synthetic for r in results]
    if all(synthetic):
        return ("**Data: the SYNTHETIC demo corpus** (`data_folder: null` in every run's hyperparams.yaml). "
                "These scores show the recipes working; they are NOT Libri2Mix scores and are not comparable "
                "with the paper's.")
    if not any(synthetic):
        return "Data: the runs' `data_folder` (Libri2Mix), not the synthetic demo corpus."
    return ("**Data: mixed**: runs marked *synthetic* used the SYNTHETIC demo corpus (`data_folder: null`); "
            "their scores are not comparable with the others or with the paper's.")


def comparison_markdown(results: list[RunResult], seconds: float) -> str:
    """The comparison table as Markdown, with the data, cost and paper notes."""
    budgets = {r.budget_minutes for r in results}
    threads = results[0].cost["threads"]
    lines = ["# Separation models compared", "", _data_line(results), ""]
    if len(budgets) == 1 and budgets != {0.0}:
        lines += [f"Training: the same budget for every model, {budgets.pop():g} minutes (`train_budget_minutes`), "
                  "a lower bound: training stops after the epoch that spends it (see the epochs column).", ""]
    lines += [
        f"Cost: measured on {seconds:g} s of random audio, batch 1, {threads} torch threads, each model in a "
        "fresh subprocess (`python -m umamba.compare`). GMAC/s: multiply-accumulates per second of audio "
        "(`umamba.complexity`). RTF: forward time / audio duration. Peak RSS: the subprocess's peak resident "
        "memory during the forward pass, imports and weights included.",
        "",
        "| model | run | data | epochs | " + " | ".join(METRICS.values())
        + " | params (M) | GMAC/s | RTF | peak RSS (MiB) | paper: SI-SNRi (dB) | paper: GMAC/s |",
        "|---|---|---|---:|" + "---:|" * len(METRICS) + "---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        paper = PAPER.get(r.model, (None, None))
        cells = [
            r.model, f"`{r.run}`", "synthetic" if r.synthetic else "Libri2Mix",
            "—" if r.epochs is None else str(r.epochs),
            *(_fmt(r.scores[key], 3 if key == "stoi" else 2) for key in METRICS),
            _fmt(r.cost["params"] / 1e6, 3), f"{r.cost['gmac_per_second']:.3g}",
            _fmt(r.cost["real_time_factor"], 3), _fmt(r.cost["peak_rss_mib"], 0),
            _fmt(paper[0], 2), _fmt(paper[1], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.model == "U-Mamba-Net" and r.cost["scan_backend"] == "torch" for r in results):
        lines += ["", "U-Mamba-Net was measured with `scan_backend: torch` (the pure PyTorch scan; numba's CPU "
                      "scan is faster)."]
    lines += ["", PAPER_NOTE + " —: not reported or not measured.", ""]
    return "\n".join(lines)


def plot_comparison(results: list[RunResult], path: str) -> None:
    """SI-SNRi against GMAC per second (log axis), marker area by parameters, labelled points.

    The paper's points are drawn (hollow stars) only when no run used the synthetic corpus.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [r for r in results if math.isfinite(r.scores["si_snri"])]
    largest = max((r.cost["params"] for r in shown), default=1)
    for r in shown:
        x, y = r.cost["gmac_per_second"], r.scores["si_snri"]
        ax.scatter(x, y, s=30 + 400 * r.cost["params"] / largest, alpha=0.6)
        ax.annotate(f"{r.model}\n{r.cost['params'] / 1e6:.2f} M", (x, y), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    synthetic = any(r.synthetic for r in results)
    if not synthetic:
        for name, (si_snri, gmac) in PAPER.items():
            ax.scatter(gmac, si_snri, marker="*", s=120, facecolors="none", edgecolors="black")
            ax.annotate(f"{name} (paper)", (gmac, si_snri), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.2)  # room for the labels
    ax.set_xlabel("GMAC per second of audio (log scale)")
    ax.set_ylabel("SI-SNRi (dB)")
    title = "SI-SNRi against compute (marker area: parameters)"
    if synthetic:
        title += "\nSYNTHETIC demo corpus: not Libri2Mix scores"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_comparison(results: list[RunResult], out_dir: str, seconds: float) -> dict:
    """Writes ``comparison.md``, ``comparison.csv`` and ``comparison.png`` to ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"comparison.{ext}") for ext in ("md", "csv", "png")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(comparison_markdown(results, seconds))
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_csv_row(r, seconds) for r in results)
    plot_comparison(results, paths["png"])
    return paths


def train_demo_runs(out_dir: str, budget_minutes: float, threads: int, models=BUNDLED_MODELS,
                    train_args=()) -> list[str]:
    """Trains each bundled recipe with ``train.py`` for ``budget_minutes`` on the demo corpus.

    Runs go to ``out_dir/<model>`` (their output in ``out_dir/<model>.log``); the demo corpus is
    built once in ``out_dir/demo_corpus``. Returns the run folders.
    """
    train_py = os.path.join(PACKAGE_ROOT, "train.py")
    if not os.path.isfile(train_py):
        raise FileNotFoundError(f"--demo needs the source checkout: {train_py} is missing")
    runs = [os.path.join(out_dir, model) for model in models]
    for run in runs:
        if os.path.exists(os.path.join(run, "save")):
            raise FileExistsError(f"{run} already holds a run (it would resume, not restart): remove it or "
                                  "choose another --out")
    for model, run in zip(tqdm(models, desc="training (demo)"), runs):
        hparams_file = os.path.join(PACKAGE_ROOT, "hparams", f"{model}.yaml")
        if not os.path.isfile(hparams_file):
            raise FileNotFoundError(f"no recipe for {model!r}: {hparams_file} is missing")
        cmd = [sys.executable, train_py, hparams_file, "--output_folder", run, "--device", "cpu",
               "--demo_folder", os.path.join(out_dir, "demo_corpus"), "--train_budget_minutes", str(budget_minutes),
               "--demo_N_epochs", "100000", *train_args]  # the budget, not the epoch count, stops training
        log = f"{run}.log"
        os.makedirs(out_dir, exist_ok=True)
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_subprocess_env(threads),
                                  cwd=PACKAGE_ROOT)
        if proc.returncode != 0:
            raise DemoTrainingError(f"training {model} failed (exit status {proc.returncode}): see {log}")
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python -m umamba.compare RUN_DIR [RUN_DIR ...] [options] | --demo [options]",
        allow_abbrev=False,
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="finished training runs (output folders)")
    parser.add_argument("--out", default=os.path.join("results", "comparison"), help="folder of the outputs")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length of the cost measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (measurement and demo training)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward passes; the fastest is reported")
    parser.add_argument("--demo", action="store_true", help="train every bundled recipe on the demo corpus first")
    parser.add_argument("--budget-minutes", type=float, default=2.0, help="--demo: training budget per model")
    parser.add_argument("--models", nargs="+", default=list(BUNDLED_MODELS), choices=BUNDLED_MODELS,
                        help="--demo: the recipes to train")
    parser.add_argument("--train-args", default="", help="--demo: train.py options, e.g. \"--demo_n_train 24\"")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        keep_freed_memory()  # time the models as umamba-separate runs them
        print(json.dumps(_measure_here(**json.loads(args.child))))
        return {}
    if args.train_args and not args.demo:
        parser.error("--train-args goes with --demo")
    if args.demo == bool(args.runs):
        parser.error("give run folders or --demo (one of the two)")
    try:
        runs = args.runs
        if args.demo:
            runs = train_demo_runs(args.out, args.budget_minutes, args.threads, args.models,
                                   shlex.split(args.train_args))
        results = [collect_run(run, args.seconds, args.threads, args.repeats) for run in tqdm(runs, desc="measuring")]
    except (OSError, ValueError, CostMeasurementError, DemoTrainingError) as error:
        raise SystemExit(f"error: {error}") from None
    paths = write_comparison(results, args.out, args.seconds)
    print(comparison_markdown(results, args.seconds))
    print("written: " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
