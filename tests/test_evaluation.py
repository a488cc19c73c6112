"""Tests of umamba.evaluation: the metrics CSVs, the spectrogram PNG and the example wavs."""

import csv
import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from matplotlib.image import imread

from umamba.evaluation import SUMMARY_FIELDS, EvaluationReport, plot_separation, save_examples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def utterance_metrics(si_snri: float, pesq: float) -> dict:
    """A metrics dict shaped like evaluate_utterance's."""
    return {"si_snr": si_snri + 1.0, "si_snri": si_snri, "pesq": pesq, "permutation": (1, 0)}


def test_report_csv_columns_rows_and_summary(tmp_path):
    report = EvaluationReport(tmp_path)
    values = {"a": (10.0, 3.0), "b": (12.5, 2.0), "c": (15.0, 4.0), "d": (11.0, 1.5)}
    for utt_id, (si_snri, pesq) in values.items():
        report.add(utt_id, utterance_metrics(si_snri, pesq))
    summary = report.close()

    rows = read_csv(tmp_path / "per_utterance.csv")
    assert list(rows[0]) == ["ID", "si_snr", "si_snri", "pesq", "permutation"]
    assert [row["ID"] for row in rows] == list(values)
    assert [float(row["si_snri"]) for row in rows] == [v[0] for v in values.values()]
    assert rows[0]["permutation"] == "1 0"

    si_snri = np.array([v[0] for v in values.values()])
    assert list(summary) == ["si_snr", "si_snri", "pesq"]  # the permutation is not averaged
    assert summary["si_snri"]["mean"] == pytest.approx(si_snri.mean())
    assert summary["si_snri"]["std"] == pytest.approx(si_snri.std())
    assert summary["si_snri"]["median"] == pytest.approx(np.median(si_snri))
    assert (summary["si_snri"]["count"], summary["si_snri"]["n_failed"]) == (4, 0)

    summary_rows = read_csv(tmp_path / "summary.csv")
    assert tuple(summary_rows[0]) == SUMMARY_FIELDS
    assert [row["metric"] for row in summary_rows] == ["si_snr", "si_snri", "pesq"]
    assert float(summary_rows[1]["mean"]) == pytest.approx(si_snri.mean(), abs=1e-4)
    assert summary_rows[1]["count"] == "4"


def test_report_nan_pesq_is_counted_and_ignored(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="umamba.evaluation"):
        with EvaluationReport(tmp_path) as report:
            report.add("ok1", utterance_metrics(10.0, 3.0))
            report.add("silent", utterance_metrics(11.0, math.nan))
            report.add("ok2", utterance_metrics(12.0, 2.0))
    assert report.summary["pesq"] == {
        "mean": 2.5, "std": 0.5, "median": 2.5, "count": 2, "n_failed": 1,
    }  # fmt: skip
    assert report.summary["si_snri"]["n_failed"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pesq: 1 of 3" in warnings[0] and "silent" in warnings[0]
    rows = {row["metric"]: row for row in read_csv(tmp_path / "summary.csv")}
    assert rows["pesq"]["n_failed"] == "1" and float(rows["pesq"]["mean"]) == 2.5
    assert read_csv(tmp_path / "per_utterance.csv")[1]["pesq"] == "nan"


def test_report_all_failed_metric_has_nan_statistics(tmp_path):
    with EvaluationReport(tmp_path) as report:
        report.add("x", utterance_metrics(10.0, math.nan))
    assert report.summary["pesq"]["count"] == 0 and report.summary["pesq"]["n_failed"] == 1
    assert math.isnan(report.summary["pesq"]["mean"]) and math.isnan(report.summary["pesq"]["median"])


def test_interrupted_report_keeps_finished_rows(tmp_path):
    report = EvaluationReport(tmp_path)
    report.add("a", utterance_metrics(10.0, 3.0))
    report.add("b", utterance_metrics(12.0, 2.0))
    # a killed process never closes the file: the rows must already be on disk
    assert [row["ID"] for row in read_csv(tmp_path / "per_utterance.csv")] == ["a", "b"]

    with pytest.raises(KeyboardInterrupt):
        with EvaluationReport(tmp_path / "run2") as report2:
            report2.add("a", utterance_metrics(10.0, 3.0))
            raise KeyboardInterrupt
    assert [row["ID"] for row in read_csv(tmp_path / "run2" / "per_utterance.csv")] == ["a"]
    assert not (tmp_path / "run2" / "summary.csv").exists()


def test_report_rejects_inconsistent_rows(tmp_path):
    with EvaluationReport(tmp_path) as report:
        report.add("a", utterance_metrics(10.0, 3.0))
        with pytest.raises(ValueError, match="'b' has metrics"):
            report.add("b", {"si_snr": 1.0})
        with pytest.raises(ValueError, match="'a' is already in"):
            report.add("a", utterance_metrics(10.0, 3.0))
    with pytest.raises(ValueError, match="closed"):
        report.add("c", utterance_metrics(10.0, 3.0))
    assert [row["ID"] for row in read_csv(tmp_path / "per_utterance.csv")] == ["a"]


def sources(n_src: int, sample_rate: int = 8000, seconds: float = 1.0):
    """Random-noise sources [T, n_src] (a spectrogram needs no speech), their mixture, estimates."""
    ref = torch.randn(int(seconds * sample_rate), n_src)
    return ref.sum(dim=1), ref.roll(1, dims=1) + 0.1 * torch.randn_like(ref), ref


@pytest.mark.parametrize("n_src", [2, 3])
def test_plot_separation_writes_a_valid_small_png(tmp_path, n_src):
    mix, est, ref = sources(n_src)
    path = tmp_path / "utt.png"
    plot_separation(mix, est, ref, 8000, path, title="utt")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and 0 < len(data) < 200_000
    image = imread(path)
    height, width, channels = image.shape
    assert channels in (3, 4) and width > 500 and height > 100 * (n_src + 1)
    assert image.std() > 0.05  # not a blank canvas
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_plot_separation_rejects_non_finite(tmp_path):
    mix, est, ref = sources(2)
    est[10, 0] = math.nan
    with pytest.raises(ValueError, match="est holds 1 NaN"):
        plot_separation(mix, est, ref, 8000, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_save_examples_writes_aligned_wavs(tmp_path):
    ref = torch.randn(800, 2)
    est = 2.0 * ref.flip(1)  # swapped order, louder
    paths = save_examples(ref.sum(dim=1), est, ref, 8000, tmp_path / "examples", "utt")
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert names == ["utt_mix.wav", "utt_est1.wav", "utt_ref1.wav", "utt_est2.wav", "utt_ref2.wav"]
    audio = {name: sf.read(path) for name, path in zip(names, paths)}
    for name, (signal, sample_rate) in audio.items():
        assert sample_rate == 8000 and signal.shape == (800,)
        assert np.abs(signal).max() == pytest.approx(0.9, abs=1e-6)
    for k in (1, 2):  # est{k} is the estimate of ref{k}: equal after peak normalisation
        np.testing.assert_allclose(audio[f"utt_est{k}.wav"][0], audio[f"utt_ref{k}.wav"][0], atol=1e-6)
