"""Evaluation outputs: the per-utterance metrics CSV and its summary, spectrogram pictures and
example wavs of separated utterances.

Signals follow SpeechBrain's layout, as a separation Brain holds them at test time: the mixture
``[T]`` and the estimated and reference sources ``[T, n_src]``.

Authors
 * U-Mamba-Net contributors
"""

import csv
import math
import os

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy.signal import stft
from speechbrain.utils.logger import get_logger

from umamba.data.audio import atomic_output, write_audio
from umamba.metrics import best_permutation, prepare_utterance, si_snr

logger = get_logger(__name__)

SUMMARY_FIELDS = ("metric", "mean", "std", "median", "count", "n_failed")
"""Columns of ``summary.csv``: one row per numeric metric."""

_MAX_LOGGED_IDS = 20
_COLORMAP = colormaps["magma"].resampled(32)  # few colours: a small palette PNG, no visible banding
_PNG_COLORS = 128


class EvaluationReport:
    """Writes the metrics of each utterance to a CSV as they come, and a summary at the end.

    Each row is flushed to disk when added, so an interrupted evaluation keeps the rows already
    written. Numeric values that are NaN or infinite (e.g. PESQ when no speech is detected) are
    counted as failed: the summary statistics ignore them and :meth:`close` logs a warning with
    their count and utterance IDs.

    Arguments
    ---------
    output_dir : str or os.PathLike
        Folder of the two CSV files (created if missing).
    per_utterance_name : str
        File name of the per-utterance CSV (columns ``ID`` and the metric names).
    summary_name : str
        File name of the summary CSV (columns ``SUMMARY_FIELDS``).

    Example
    -------
    >>> output_dir = getfixture("tmp_path")
    >>> with EvaluationReport(output_dir) as report:
    ...     report.add("utt1", {"si_snri": 12.0, "pesq": 3.0, "permutation": (1, 0)})
    ...     report.add("utt2", {"si_snri": 14.0, "pesq": float("nan"), "permutation": (0, 1)})
    >>> report.summary["si_snri"]["mean"], report.summary["pesq"]["n_failed"]
    (13.0, 1)
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        per_utterance_name: str = "per_utterance.csv",
        summary_name: str = "summary.csv",
    ):
        os.makedirs(output_dir, exist_ok=True)
        self.per_utterance_path = os.path.join(output_dir, per_utterance_name)
        self.summary_path = os.path.join(output_dir, summary_name)
        self.summary = None
        self._file = open(self.per_utterance_path, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._columns = None
        self._ids = set()
        self._values = {}  # metric name -> {utterance ID: float}

    def add(self, utt_id: str, metrics: dict) -> None:
        """Appends one utterance's metrics to the CSV and flushes it.

        Arguments
        ---------
        utt_id : str
            Utterance ID, unique in the report.
        metrics : dict
            Metric name -> value: floats or ints (summarised), tuples (written space-separated,
            e.g. a permutation) or strings. Every utterance must have the same names, in the
            same order, as the first one.
        """
        if self._file.closed:
            raise ValueError(f"Cannot add {utt_id!r}: {self.per_utterance_path} is closed")
        if self._columns is None:
            self._columns = list(metrics)
            self._writer.writerow(["ID", *self._columns])
            self._values = {name: {} for name, value in metrics.items() if _is_number(value)}
        elif list(metrics) != self._columns:
            raise ValueError(
                f"Utterance {utt_id!r} has metrics {list(metrics)}, but {self.per_utterance_path} "
                f"has columns {self._columns}"
            )
        if utt_id in self._ids:
            raise ValueError(f"Utterance {utt_id!r} is already in {self.per_utterance_path}")
        self._ids.add(utt_id)
        for name, values in self._values.items():
            values[utt_id] = float(metrics[name])
        self._writer.writerow([utt_id, *(_format(metrics[name]) for name in self._columns)])
        self._file.flush()

    def close(self) -> dict:
        """Closes the per-utterance CSV, writes the summary CSV and returns the summary.

        Returns
        -------
        dict
            Metric name -> ``{"mean", "std", "median", "count", "n_failed"}``: statistics over
            the finite values (``count`` of them; population std), ``n_failed`` non-finite ones.
        """
        if self.summary is not None:
            return self.summary
        self._file.close()
        self.summary = {}
        for name, values in self._values.items():
            array = np.fromiter(values.values(), dtype=float, count=len(values))
            finite = array[np.isfinite(array)]
            failed = [utt_id for utt_id, value in values.items() if not math.isfinite(value)]
            if failed:
                shown = ", ".join(failed[:_MAX_LOGGED_IDS])
                if len(failed) > _MAX_LOGGED_IDS:
                    shown += f" and {len(failed) - _MAX_LOGGED_IDS} more"
                logger.warning(
                    f"{name}: {len(failed)} of {len(values)} utterances could not be scored "
                    f"(NaN or infinite, left out of the summary): {shown}"
                )
            self.summary[name] = {
                "mean": float(finite.mean()) if finite.size else math.nan,
                "std": float(finite.std()) if finite.size else math.nan,
                "median": float(np.median(finite)) if finite.size else math.nan,
                "count": int(finite.size),
                "n_failed": len(failed),
            }
        with atomic_output(self.summary_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SUMMARY_FIELDS)
            for name, stats in self.summary.items():
                writer.writerow([name, *(_format(stats[field]) for field in SUMMARY_FIELDS[1:])])
        return self.summary

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        """Writes the summary on success; after an error only closes the per-utterance CSV."""
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def plot_separation(
    mix: torch.Tensor,
    est: torch.Tensor,
    ref: torch.Tensor,
    sample_rate: int,
    path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Saves a PNG of log-magnitude spectrograms: the mixture, then each estimate by its reference.

    The estimates are put in their best SI-SNR order first; each estimate's panel names its
    SI-SNR. All panels share one dB colour scale (80 dB range) and a time axis in seconds.

    Arguments
    ---------
    mix : torch.Tensor
        Mixture ``[T]``.
    est : torch.Tensor
        Estimated sources ``[T, n_src]``.
    ref : torch.Tensor
        Reference sources ``[T, n_src]``.
    sample_rate : int
        Sampling rate in Hz.
    path : str or os.PathLike
        Output PNG file.
    title : str, optional
        Figure title (e.g. the utterance ID).

    Example
    -------
    >>> ref = torch.randn(8000, 2)
    >>> path = getfixture("tmp_path") / "utt1.png"
    >>> plot_separation(ref.sum(1), ref.flip(1), ref, 8000, path, title="utt1")
    >>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    mix, est, ref = prepare_utterance(mix, est, ref)
    est = est[list(best_permutation(est, ref))]
    scores = si_snr(est, ref)
    n_src = ref.shape[0]
    window = 2 ** round(math.log2(0.032 * sample_rate))  # ~32 ms
    _, _, spectra = stft(
        torch.cat([mix.unsqueeze(0), est, ref]).numpy(), nperseg=window, noverlap=window * 3 // 4
    )
    spectra_db = 20 * np.log10(np.abs(spectra) + 1e-12)
    vmax = spectra_db.max()
    panels = [("mixture", spectra_db[0])]
    for k in range(n_src):
        panels.append((f"estimate {k + 1} (SI-SNR {scores[k]:.1f} dB)", spectra_db[1 + k]))
        panels.append((f"reference {k + 1}", spectra_db[1 + n_src + k]))

    figure = Figure(figsize=(9, 1.8 * (n_src + 1) + 0.4), dpi=72, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(n_src + 1, 2)
    extent = (0.0, mix.shape[0] / sample_rate, 0.0, sample_rate / 2000)
    axes = [figure.add_subplot(grid[0, :])]
    axes += [figure.add_subplot(grid[1 + k // 2, k % 2], sharex=axes[0]) for k in range(2 * n_src)]
    for ax, (label, spectrum) in zip(axes, panels):
        image = ax.imshow(
            spectrum,
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap=_COLORMAP,
            interpolation="nearest",
            vmin=vmax - 80,
            vmax=vmax,
        )
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("frequency (kHz)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[-2:]:
        ax.set_xlabel("time (s)", fontsize=8)
    figure.colorbar(image, ax=axes, label="dB", shrink=0.6)
    if title is not None:
        figure.suptitle(title, fontsize=10)
    # a palette PNG (~100 KB): noisy spectrograms in 24-bit colour take ~4x more space
    figure.canvas.draw()
    rgb = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    with atomic_output(path) as tmp:
        Image.fromarray(rgb).quantize(colors=_PNG_COLORS).save(tmp, format="png", optimize=True)


def save_examples(
    mix: torch.Tensor,
    est: torch.Tensor,
    ref: torch.Tensor,
    sample_rate: int,
    output_dir: str | os.PathLike,
    utt_id: str,
    peak_normalize: bool = True,
) -> list[str]:
    """Writes an utterance's mixture, estimates and references as float wavs, for listening.

    Files: ``{utt_id}_mix.wav``, then ``{utt_id}_est{k}.wav`` and ``{utt_id}_ref{k}.wav`` for
    k = 1..n_src, the estimates put in their best SI-SNR order (``est{k}`` estimates ``ref{k}``).

    Arguments
    ---------
    mix : torch.Tensor
        Mixture ``[T]``.
    est : torch.Tensor
        Estimated sources ``[T, n_src]``.
    ref : torch.Tensor
        Reference sources ``[T, n_src]``.
    sample_rate : int
        Sampling rate in Hz.
    output_dir : str or os.PathLike
        Folder of the wavs (created if missing).
    utt_id : str
        Utterance ID, the prefix of the file names.
    peak_normalize : bool
        Scales each signal to a peak of 0.9 (estimates of an SI-SNR-trained model have an
        arbitrary scale); silent signals are left as they are.

    Returns
    -------
    list of str
        Paths of the written files, in the order above.

    Example
    -------
    >>> ref = torch.randn(800, 2)
    >>> paths = save_examples(ref.sum(1), ref, ref, 8000, getfixture("tmp_path"), "utt1")
    >>> [os.path.basename(p) for p in paths]
    ['utt1_mix.wav', 'utt1_est1.wav', 'utt1_ref1.wav', 'utt1_est2.wav', 'utt1_ref2.wav']
    """
    mix, est, ref = prepare_utterance(mix, est, ref)
    est = est[list(best_permutation(est, ref))]
    signals = {"mix": mix}
    for k in range(ref.shape[0]):
        signals[f"est{k + 1}"] = est[k]
        signals[f"ref{k + 1}"] = ref[k]
    paths = []
    for name, signal in signals.items():
        signal = signal.numpy()
        peak = np.abs(signal).max()
        if peak_normalize and peak > 0:
            signal = 0.9 * signal / peak
        path = os.path.join(output_dir, f"{utt_id}_{name}.wav")
        write_audio(path, signal, sample_rate)
        paths.append(path)
    return paths


def _format(value) -> str:
    """A CSV cell: floats with 4 decimals, tuples and lists space-separated, the rest as str."""
    if isinstance(value, (tuple, list)):
        return " ".join(str(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _is_number(value) -> bool:
    """True for the values the summary averages: real numbers, not booleans."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

