"""train.py end to end, in a subprocess, on a tiny generated corpus with a tiny model."""

import csv
import glob
import os
import subprocess
import sys

import torch

from umamba.data.audio import audio_info
from helpers import REPO, TINY_UMAMBA, as_cli


TINY_MODEL = as_cli(TINY_UMAMBA)


def tiny_corpus_args(tmp_path):
    return [
        "--demo_folder", str(tmp_path / "demo"), "--demo_n_train", "4", "--demo_n_valid", "2",
        "--demo_n_test", "2", "--demo_seconds", "1.0", "--demo_voices", "synthetic", "--demo_rir_rooms", "4",
        "--batch_size", "2", "--segment_seconds", "0.5", "--n_audio_to_save", "1",
    ]


def run_train(tmp_path, *extra, hparams="hparams/umamba.yaml", output="out"):
    cmd = [sys.executable, "train.py", hparams, "--output_folder", str(tmp_path / output), "--device", "cpu",
           *TINY_MODEL, *tiny_corpus_args(tmp_path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_debug_run_writes_results_checkpoints_audio_and_pictures(tmp_path):
    proc = run_train(tmp_path, "--debug", "--debug_persistently")
    out = tmp_path / "out"
    assert "SYNTHETIC" in proc.stderr + proc.stdout

    with open(out / "test_results" / "per_utterance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "no test utterance scored"
    for column in ("si_snr", "si_snri", "sdr", "sdri", "pesq", "stoi"):
        assert column in rows[0], f"missing column {column}: {list(rows[0])}"
    assert all(float(r["si_snri"]) == float(r["si_snri"]) for r in rows)  # finite numbers, not NaN
    with open(out / "test_results" / "summary.csv", newline="") as f:
        summary = {r["metric"]: r for r in csv.DictReader(f)}
    assert int(summary["si_snri"]["count"]) == len(rows)

    assert glob.glob(str(out / "save" / "CKPT*" / "masknet.ckpt")), "no checkpoint written"
    wavs = glob.glob(str(out / "test_results" / "examples" / "*_est1.wav"))
    assert wavs and audio_info(wavs[0]).sample_rate == 8000
    pngs = glob.glob(str(out / "test_results" / "examples" / "*.png"))
    assert pngs and open(pngs[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # Preparation wrote sorted CSVs with real durations from the demo corpus.
    train_csv = glob.glob(str(out / "save" / "train-360_*.csv"))[0]
    with open(train_csv, newline="") as f:
        ids = [r["ID"] for r in csv.DictReader(f)]
    assert ids == sorted(ids) and len(ids) == 4


def test_debug_run_with_on_the_fly_reverb_dynamic_mixing_and_speed(tmp_path):
    """The paper's condition with every training augmentation on: it trains and evaluates."""
    run_train(tmp_path, "--debug", "--debug_persistently", "--on_the_fly_reverb", "True", "--dynamic_mixing", "True",
              "--speed_perturb", "[95, 100, 105]", "--dm_mixtures_per_epoch", "8",
              "--compute_pesq", "False", "--compute_stoi", "False")
    out = tmp_path / "out"
    log = (out / "train_log.txt").read_text()
    assert "epoch: 2," in log and "test neg_si_snr" in log
    # Valid/test read the static reverberant set with anechoic targets; training the dry set.
    saved = sorted(os.listdir(out / "save"))
    assert "test_mix_both_reverb-s1_anechoic-s2_anechoic_8000_min.csv" in saved
    assert "train-360_mix_both_8000_min.csv" in saved
    assert (tmp_path / "demo" / "rir_bank" / "rirs_8000.csv").exists()


def _optimizer_steps(ckpt_dir):
    state = torch.load(os.path.join(ckpt_dir, "optimizer.ckpt"), map_location="cpu")
    return int(max(s["step"] for s in state["state"].values()))


def _latest_ckpt(out):
    return max(glob.glob(str(out / "save" / "CKPT*")), key=os.path.getmtime)


def test_resume_continues_from_the_checkpoint(tmp_path):
    out = tmp_path / "out"
    run_train(tmp_path, "--demo_N_epochs", "1", "--compute_pesq", "False", "--compute_stoi", "False")
    first = _latest_ckpt(out)
    steps_per_epoch = _optimizer_steps(first)
    assert steps_per_epoch == 2  # 4 training mixtures, batches of 2

    run_train(tmp_path, "--demo_N_epochs", "2", "--compute_pesq", "False", "--compute_stoi", "False")
    second = _latest_ckpt(out)
    assert open(os.path.join(second, "counter.ckpt")).read().strip() == "2"  # SpeechBrain's EpochCounter
    assert _optimizer_steps(second) == 2 * steps_per_epoch  # the optimizer state carried over
    log = (out / "train_log.txt").read_text()
    # Epoch 1 was trained once (first run) and epoch 2 once (second run): nothing repeated.
    assert log.count("epoch: 1,") == 1 and log.count("epoch: 2,") == 1, log


def test_training_budget_stops_after_the_epoch_that_spends_it(tmp_path):
    run_train(tmp_path, "--demo_N_epochs", "5", "--train_budget_minutes", "0.0001",
              "--compute_pesq", "False", "--compute_stoi", "False")
    log = (tmp_path / "out" / "train_log.txt").read_text()
    assert "epoch: 1," in log and "epoch: 2," not in log  # stopped after the first epoch of 5


def test_test_only_evaluates_without_training(tmp_path):
    out = tmp_path / "out"
    run_train(tmp_path, "--demo_N_epochs", "1", "--compute_pesq", "False", "--compute_stoi", "False")
    log_before = (out / "train_log.txt").read_text()
    os.remove(out / "test_results" / "per_utterance.csv")
    run_train(tmp_path, "--test_only", "--compute_pesq", "False", "--compute_stoi", "False")
    log_after = (out / "train_log.txt").read_text()
    assert log_after.count("epoch: ") == log_before.count("epoch: ")  # no new training epoch
    assert (out / "test_results" / "per_utterance.csv").exists()


def test_missing_librimix_folder_is_a_clear_error(tmp_path):
    data = tmp_path / "data" / "Libri2Mix" / "wav8k" / "min" / "train-360"
    data.mkdir(parents=True)
    cmd = [sys.executable, "train.py", "hparams/umamba.yaml", "--data_folder", str(tmp_path / "data"),
           "--output_folder", str(tmp_path / "out"), *TINY_MODEL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "LibriMixNotFoundError" in output and "Libri2Mix/wav8k/min/train-360" in output, output[-2000:]
