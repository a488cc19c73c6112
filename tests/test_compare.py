"""umamba.compare on finished runs, and benchmarks/bench_models.py, at tiny sizes."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
from hyperpyyaml import resolve_references
from matplotlib.image import imread

from umamba.compare import main, read_hparams_values
from umamba.complexity import load_separator
from umamba.evaluation import EvaluationReport

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = {
    "umamba": {"N_encoder_out": 16, "F": 8, "hidden_channels": 16, "num_blocks": 1, "upsampling_depth": 2,
               "d_state": 4},
    "sepformer": {"N_encoder_out": 16, "out_channels": 16, "num_dual_path_layers": 1, "transformer_layers": 1,
                  "nhead": 2, "d_ffn": 32, "K": 20},
}
SI_SNRI = {"umamba": (8.0, 10.0), "sepformer": (5.0, 7.0)}  # per test utterance; means 9 and 6
COLUMNS = ["model", "run", "data", "epochs", "SI-SNRi (dB)", "SDRi (dB)", "PESQ", "STOI", "params (M)", "GMAC/s",
           "RTF", "peak RSS (MiB)", "paper: SI-SNRi (dB)", "paper: GMAC/s"]


def make_run(folder, model, epochs=2):
    """A finished run as train.py leaves it: the resolved hyperparams.yaml (as SpeechBrain's
    create_experiment_directory writes it), a train log and the test results."""
    folder.mkdir()
    with open(os.path.join(REPO, "hparams", f"{model}.yaml"), encoding="utf-8") as f:
        resolved = resolve_references(f, {"output_folder": str(folder), **TINY[model]}).getvalue()
    (folder / "hyperparams.yaml").write_text(resolved)
    (folder / "train_log.txt").write_text(
        "".join(f"epoch: {e}, lr: 1.00e-03 - train neg_si_snr: 1.0 - valid neg_si_snr: 1.0\n" for e in
                range(1, epochs + 1)) + f"epoch loaded: {epochs} - test neg_si_snr: 1.0\n")
    with EvaluationReport(folder / "test_results") as report:
        for i, value in enumerate(SI_SNRI[model]):
            report.add(f"utt{i}", {"si_snri": value, "sdri": value + 1, "pesq": 2.0, "stoi": 0.5})
    return folder


def table_rows(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header, _, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    return header, [dict(zip(header, row)) for row in rows]


def test_compare_writes_table_csv_and_plot(tmp_path):
    runs = [make_run(tmp_path / "umamba", "umamba", epochs=3), make_run(tmp_path / "sepformer", "sepformer")]
    out = tmp_path / "comparison"
    proc = subprocess.run([sys.executable, "-m", "umamba.compare", *map(str, runs), "--out", str(out),
                           "--seconds", "0.5", "--threads", "1"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    markdown = (out / "comparison.md").read_text()
    assert "SYNTHETIC demo corpus" in markdown  # data_folder is null in both runs
    header, rows = table_rows(markdown)
    assert header == COLUMNS
    assert [r["model"] for r in rows] == ["U-Mamba-Net", "SepFormer"]
    assert [r["SI-SNRi (dB)"] for r in rows] == ["9.00", "6.00"]
    assert [r["SDRi (dB)"] for r in rows] == ["10.00", "7.00"]
    assert [r["epochs"] for r in rows] == ["3", "2"]
    assert [r["data"] for r in rows] == ["synthetic", "synthetic"]
    # The paper's numbers beside ours where it has them, and only there.
    assert (rows[0]["paper: SI-SNRi (dB)"], rows[0]["paper: GMAC/s"]) == ("8.50", "2.5")
    assert (rows[1]["paper: SI-SNRi (dB)"], rows[1]["paper: GMAC/s"]) == ("—", "—")

    with open(out / "comparison.csv", newline="") as f:
        measured = list(csv.DictReader(f))
    assert [r["run"] for r in measured] == [str(r) for r in runs]
    for row, run in zip(measured, runs):
        # The run's own (tiny) model was measured: same parameter count as building it here.
        separator, _ = load_separator(str(run / "hyperparams.yaml"))
        assert int(row["params"]) == sum(p.numel() for p in separator.parameters())
        assert float(row["gmac_per_second"]) > 0 and float(row["real_time_factor"]) > 0
        assert float(row["peak_rss_mib"]) >= float(row["model_rss_mib"]) > 0
        assert row["threads"] == "1" and row["synthetic"] == "True"

    png = out / "comparison.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = imread(png).shape
    assert height > 200 and width > 200 and channels in (3, 4)


def test_run_without_test_results_is_a_clear_error(tmp_path):
    run = make_run(tmp_path / "run", "umamba")
    os.remove(run / "test_results" / "summary.csv")
    with pytest.raises(SystemExit) as error:
        main([str(run), "--out", str(tmp_path / "out")])
    message = str(error.value)
    assert str(run) in message and os.path.join("test_results", "summary.csv") in message

    with pytest.raises(SystemExit, match="hyperparams.yaml is missing"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_demo_refuses_to_resume_an_existing_run(tmp_path):
    (tmp_path / "umamba" / "save").mkdir(parents=True)
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["--demo", "--models", "umamba", "--out", str(tmp_path)])


def test_read_hparams_values_sees_the_demo_corpus_and_the_model(tmp_path):
    run = make_run(tmp_path / "run", "sepformer")
    values = read_hparams_values(run / "hyperparams.yaml")
    assert values["data_folder"] is None
    assert values["MaskNet"] == "!new:speechbrain.lobes.models.dual_path.Dual_Path_Model"
    assert values["K"] == 20  # the run's overrides, not the recipe's defaults


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_models", os.path.join(REPO, "benchmarks", "bench_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_writes_its_csv_and_plot(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_models.py"), "--lengths", "0.5",
           "--models", "umamba", "sudormrf", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "bench_models.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"umamba", "sudormrf"}
    assert all(r["status"] == "ok" and float(r["time_s"]) > 0 for r in rows.values())
    assert float(rows["umamba"]["time_ratio_to_umamba"]) == 1.0
    ratio = float(rows["sudormrf"]["time_s"]) / float(rows["umamba"]["time_s"])
    assert float(rows["sudormrf"]["time_ratio_to_umamba"]) == pytest.approx(ratio)
    # SuDoRM-RF is U-Mamba-Net without its Mamba layers: fewer parameters and MACs.
    assert int(rows["sudormrf"]["params"]) < int(rows["umamba"]["params"])
    assert float(rows["sudormrf"]["gmac_per_second"]) < float(rows["umamba"]["gmac_per_second"])
    assert (tmp_path / "bench_models.png").read_bytes()[:8] == PNG_MAGIC


def test_benchmark_skips_lengths_above_max_seconds_with_a_note():
    rows = _bench_module().benchmark(["sepformer"], [60.0], threads=1, max_seconds={"sepformer": 30.0})
    assert rows == [{"model": "sepformer", "seconds": 60.0, "status": "skipped",
                     "note": "longer than --max-seconds sepformer=30"}]
