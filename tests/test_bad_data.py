"""Malformed inputs through preparation, datasets, dynamic mixing, training steps, evaluation and separation.

Each gives an error that names the file (or the CSV line), or a documented behaviour; no
half-written output is left behind, and no NaN reaches the model's parameters.
"""

import csv
import glob
import itertools
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.nnet.losses import get_si_snr_with_pitwrapper

from umamba.brain import Separation, TooManySkippedBatches
from umamba.data.audio import AudioError, write_audio
from umamba.data.datasets import separation_dataset
from umamba.data.dynamic_mixing import DynamicMixingDataset, Utterance, librimix_utterances
from umamba.data.librimix import LibriMixFormatError, LibriMixNotFoundError, metadata_path, prepare_librimix
from umamba.evaluation import EvaluationReport
from umamba.inference import UMambaSeparation
from umamba.metrics import evaluate_utterance, si_snr
from helpers import REPO, TINY_UMAMBA, export_untrained_tiny_model

TINY_MODEL = {**TINY_UMAMBA, "scan_backend": "torch"}


def dev_file(corpus_copy, folder="s1"):
    return min((corpus_copy / "Libri2Mix" / "wav8k" / "min" / "dev" / folder).iterdir())


def _keep_bytes(fraction_or_count):
    def cut(path):
        content = path.read_bytes()
        keep = fraction_or_count if isinstance(fraction_or_count, int) else int(len(content) * fraction_or_count)
        path.write_bytes(content[:keep])
    return cut


def _rewrite(path, sample_rate=None, channels=1):
    signal, rate = sf.read(path)
    sf.write(path, np.stack([signal] * channels, axis=1) if channels > 1 else signal, sample_rate or rate)


# corruption -> (expected error, words of its message)
PREPARATION_ERRORS = {
    "missing": (os.remove, LibriMixNotFoundError, "has no file"),
    "empty": (lambda p: p.write_bytes(b""), AudioError, "empty"),
    "truncated header": (_keep_bytes(20), AudioError, "corrupt"),
    "truncated samples": (_keep_bytes(0.5), LibriMixFormatError, "samples"),
    "wrong sample rate": (lambda p: _rewrite(p, sample_rate=16000), LibriMixFormatError, "16000 Hz"),
    "stereo": (lambda p: _rewrite(p, channels=2), LibriMixFormatError, "2 channels"),
}


@pytest.mark.parametrize("corruption", PREPARATION_ERRORS)
def test_preparation_names_the_bad_file_and_writes_no_csv_for_its_split(corpus_copy, tmp_path, corruption):
    corrupt, error, words = PREPARATION_ERRORS[corruption]
    bad = dev_file(corpus_copy)
    corrupt(bad)
    save = tmp_path / "save"
    with pytest.raises(error) as info:
        prepare_librimix(str(corpus_copy), str(save), splits=["train-360", "dev"])
    assert str(bad) in str(info.value) and words in str(info.value), str(info.value)
    # train-360 came first and is complete; nothing of dev, and no temporary file.
    assert sorted(os.listdir(save)) == ["train-360_mix_both_8000_min.csv", "train-360_mix_both_8000_min.csv.json"]


def test_metadata_row_with_a_missing_field_names_the_line(corpus_copy, tmp_path):
    metadata = metadata_path(str(corpus_copy / "Libri2Mix"), 8000, "min", "dev", "mix_both")
    with open(metadata, newline="") as f:
        table = list(csv.reader(f))
    table[2] = table[2][:-1]  # no length
    with open(metadata, "w", newline="") as f:
        csv.writer(f).writerows(table)
    with pytest.raises(LibriMixFormatError, match="line 3"):
        prepare_librimix(str(corpus_copy), str(tmp_path / "save"), splits=["dev"])
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("corruption", ["NaN samples", "deleted after preparation"])
def test_files_that_pass_preparation_fail_at_loading_naming_the_file(corpus_copy, tmp_path, corruption):
    """Preparation reads headers only (fast on 50k files): NaN samples are found when the file is read."""
    csvs = prepare_librimix(str(corpus_copy), str(tmp_path), splits=["dev"])
    bad = dev_file(corpus_copy, "s2")
    if corruption == "NaN samples":
        signal, rate = sf.read(bad, dtype="float32")
        signal[10] = np.nan
        sf.write(bad, signal, rate, subtype="FLOAT")
    else:
        os.remove(bad)
    dataset = separation_dataset(csvs["dev"], str(corpus_copy / "Libri2Mix"), num_spks=2, sample_rate=8000)
    with pytest.raises(AudioError) as info:
        dataset[0]
    assert str(bad) in str(info.value) and ("NaN" in str(info.value) or "no such file" in str(info.value))


def test_train_py_stops_at_a_nan_training_file_naming_it(corpus_copy, tmp_path):
    bad = min((corpus_copy / "Libri2Mix" / "wav8k" / "min" / "train-360" / "s1").iterdir())
    signal, rate = sf.read(bad, dtype="float32")
    signal[10] = np.nan
    sf.write(bad, signal, rate, subtype="FLOAT")
    out = tmp_path / "out"
    tiny = [f"--{key}={value}" for key, value in TINY_MODEL.items()]
    cmd = [sys.executable, "train.py", "hparams/umamba.yaml", "--data_folder", str(corpus_copy), "--output_folder", str(out),
           "--device", "cpu", *tiny, "--reverb", "False", "--batch_size", "1", "--segment_seconds", "0.5",
           "--N_epochs", "1", "--compute_pesq", "False", "--compute_stoi", "False", "--noprogressbar"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    last_line = proc.stdout.strip().splitlines()[-1]  # SpeechBrain logs the exception to stdout
    assert last_line == f"umamba.data.audio.AudioError: Cannot read audio '{bad}': it contains NaN or infinite samples"
    assert not glob.glob(str(out / "save" / "CKPT*")) and not glob.glob(str(out / "save" / ".*"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: [row[:-1] if i == 2 else row for i, row in enumerate(rows)], "line 3 has 5 fields"),
        (lambda rows: [row[:4] for row in rows], "no column s2_wav"),
        (lambda rows: [row[:4] + [""] + row[5:] if i == 1 else row for i, row in enumerate(rows)],
         "line 2 has no s2_wav"),
    ],
    ids=["row with a missing field", "missing column", "empty path"],
)
def test_prepared_csv_defects_name_the_csv(corpus_copy, tmp_path, edit, message):
    path = prepare_librimix(str(corpus_copy), str(tmp_path), splits=["dev"])["dev"]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))
    with pytest.raises(ValueError) as info:
        separation_dataset(path, str(corpus_copy / "Libri2Mix"), num_spks=2, sample_rate=8000, with_noise=True)
    assert path in str(info.value) and message in str(info.value), str(info.value)
    if "column" not in message:  # the dynamic-mixing speech list reads the same CSV
        with pytest.raises(ValueError, match="line"):
            librimix_utterances(path, str(corpus_copy / "Libri2Mix"), num_spks=2)


def test_dynamic_mixing_nan_file_is_named_and_a_silent_talker_stays_silent(tmp_path):
    rng = np.random.default_rng(0)
    speech = []
    for speaker in ("19", "26"):
        path = tmp_path / f"{speaker}.wav"
        write_audio(path, 0.1 * rng.standard_normal(8000), 8000)
        speech.append(Utterance(f"{speaker}-1-0000", speaker, str(path)))
    silent = tmp_path / "32.wav"
    write_audio(silent, np.zeros(8000), 8000)
    dataset = DynamicMixingDataset([speech[0], Utterance("32-1-0000", "32", str(silent))], None, 8000,
                                   segment_seconds=0.5, mixtures_per_epoch=4)
    for index in range(4):  # both talkers in every mixture: the silent one is always there
        item = dataset[index]
        sources = [item["s1_sig"], item["s2_sig"]]
        assert all(torch.isfinite(s).all() for s in sources) and torch.isfinite(item["mix_sig"]).all()
        talkers = item["id"].split("_")
        quiet = sources[talkers.index("32-1-0000")]
        assert torch.count_nonzero(quiet) == 0  # loudness normalisation did not blow silence up
        assert torch.allclose(item["mix_sig"], sources[0] + sources[1])

    nan_file = tmp_path / "40.wav"
    signal = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    signal[100] = np.inf
    sf.write(nan_file, signal, 8000, subtype="FLOAT")
    dataset = DynamicMixingDataset([speech[1], Utterance("40-1-0000", "40", str(nan_file))], None, 8000,
                                   segment_seconds=0.5, mixtures_per_epoch=1)
    with pytest.raises(AudioError, match=str(nan_file)):
        dataset[0]


def test_pit_si_snr_loss_with_silent_sources_is_finite_with_finite_gradients():
    """SpeechBrain's EPS makes a silent target a constant term (10 log10 EPS = -80 dB): no NaN, no gradient."""
    torch.manual_seed(0)
    targets = 0.1 * torch.randn(3, 4000, 2)
    targets[0, :, 1] = 0.0  # one silent source
    targets[1] = 0.0  # silent targets, estimated by noise
    estimates = (0.1 * torch.randn(3, 4000, 2)).requires_grad_()
    with torch.no_grad():
        estimates[2] = 0.0  # a silent estimate of real sources
    loss = get_si_snr_with_pitwrapper(targets, estimates)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(estimates.grad).all()
    # The same values from umamba.metrics.si_snr (an independent implementation, same eps), under
    # the best permutation.
    for b in range(3):
        expected = max(
            si_snr(estimates[b, :, list(perm)].T.detach().double(), targets[b].T.double()).mean().item()
            for perm in itertools.permutations(range(2))
        )
        assert loss[b].item() == pytest.approx(-expected, abs=1e-3)
    assert loss[1].item() == pytest.approx(80.0, abs=1e-3)
    assert torch.count_nonzero(estimates.grad[1]) == 0  # nothing to learn from silence


@pytest.fixture(scope="module")
def separation(tmp_path_factory):
    """The recipe's Brain with a tiny model, ready to train (no data, no checkpointer)."""
    with open(os.path.join(REPO, "hparams", "umamba.yaml"), encoding="utf-8") as f:
        overrides = {"output_folder": str(tmp_path_factory.mktemp("brain")), "max_consecutive_skips": 3, **TINY_MODEL}
        hparams = load_hyperpyyaml(f, overrides)
    hparams["augmentation"] = None
    brain = Separation(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams,
                       run_opts={"device": "cpu", "noprogressbar": True})
    brain.on_fit_start()
    return brain


def _batch(mix, sources):
    return PaddedBatch([
        {"id": f"utt{i}", "mix_sig": mix[i], "s1_sig": sources[i, :, 0], "s2_sig": sources[i, :, 1]}
        for i in range(mix.shape[0])
    ])


def _parameters(brain):
    return [p.detach().clone() for p in brain.modules.parameters()]


def test_training_skips_nan_batches_then_stops_and_steps_on_silent_sources(separation, caplog):
    sources = 0.1 * torch.randn(2, 4000, 2)
    nan_mix = sources.sum(-1)
    nan_mix[0, 5] = math.nan
    before = _parameters(separation)
    with caplog.at_level(logging.WARNING, logger="umamba.brain"):
        for _ in range(2):
            assert separation.fit_batch(_batch(nan_mix, sources)).item() == 0.0
        with pytest.raises(TooManySkippedBatches, match="3 training batches in a row"):
            separation.fit_batch(_batch(nan_mix, sources))
    assert "Skipped training batch utt0,utt1: losses nan, " in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, _parameters(separation), strict=True))  # no step on NaN

    sources[0, :, 1] = 0.0  # a silent talker
    sources[1] = 0.0  # and an all-zero mixture
    loss = separation.fit_batch(_batch(sources.sum(-1), sources))
    after = _parameters(separation)
    assert math.isfinite(loss.item()) and separation.consecutive_skips == 0
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # it did learn from the other talker


def test_evaluation_counts_undefined_metrics_of_a_silent_reference_as_failed(tmp_path):
    torch.manual_seed(0)
    ref = 0.1 * torch.randn(8000, 2)
    mix = ref.sum(1) + 0.01 * torch.randn(8000)
    silent_ref = ref.clone()
    silent_ref[:, 1] = 0.0
    with EvaluationReport(tmp_path) as report:
        est = ref.flip(1) + 0.01 * torch.randn(8000, 2)
        report.add("normal", evaluate_utterance(mix, est, ref, 8000))
        report.add("silent", evaluate_utterance(mix, est, silent_ref, 8000))
    for name in ("sdr", "sdri", "sir", "sar", "pesq", "pesq_mix"):  # undefined against silence
        assert (report.summary[name]["count"], report.summary[name]["n_failed"]) == (1, 1), name
    with open(tmp_path / "per_utterance.csv", newline="") as f:
        assert [row["ID"] for row in csv.DictReader(f)] == ["normal", "silent"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = export_untrained_tiny_model(tmp_path_factory.mktemp("model"))
    return UMambaSeparation.from_hparams(source=folder, savedir=None)


def test_separation_of_stereo_resampled_silent_and_cut_files(model, tmp_path):
    """Missing, empty, corrupt, NaN and too short inputs are tested in tests/test_cli.py."""
    signal = (0.1 * np.random.default_rng(0).standard_normal(12000)).astype(np.float32)

    def separate(path):
        return model.separate_file(str(path), chunk_seconds=0.5, overlap_seconds=0.1)

    write_audio(tmp_path / "mono.wav", 0.75 * signal, 8000)
    write_audio(tmp_path / "stereo.wav", np.stack([signal, 0.5 * signal], axis=1), 8000)
    assert torch.allclose(separate(tmp_path / "stereo.wav"), separate(tmp_path / "mono.wav"), atol=1e-6)  # averaged
    write_audio(tmp_path / "16k.wav", np.repeat(signal, 2), 16000)
    assert separate(tmp_path / "16k.wav").shape == (12000, 2)  # resampled to the model's 8 kHz
    write_audio(tmp_path / "silent.wav", np.zeros(12000), 8000)
    assert torch.isfinite(separate(tmp_path / "silent.wav")).all()
    write_audio(tmp_path / "cut.wav", signal, 8000, subtype="PCM_16")
    _keep_bytes(0.5)(tmp_path / "cut.wav")  # the header announces 12000 samples, about 6000 are left
    frames = sf.info(tmp_path / "cut.wav").frames
    assert frames < 6100 and separate(tmp_path / "cut.wav").shape == (frames, 2)  # what is there is separated
