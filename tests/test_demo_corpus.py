"""Tests of umamba.data.demo_corpus: layout, levels, determinism, caching and distinct talkers."""

import csv
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from umamba.data.demo_corpus import main, make_demo_corpus, make_speakers, synth_utterance
from umamba.data.librimix import read_json

TINY = dict(n_train=3, n_valid=2, n_test=2, seconds=1.0, voices="synthetic")
SPLITS = ("train-360", "dev", "test")
FOLDERS = ("mix_clean", "mix_both", "mix_single", "s1", "s2", "noise")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(str(tmp_path_factory.mktemp("demo")), **TINY)


def _metadata(corpus, name, rate="wav8k", mode="min"):
    with open(os.path.join(corpus, rate, mode, "metadata", name), newline="") as f:
        return list(csv.DictReader(f))


def _hashes(folder):
    """sha256 of every wav under ``folder``, by relative path."""
    hashes = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".wav"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def _f0(signal, sample_rate):
    """Median f0 of the loud frames, from the autocorrelation peak in 60-400 Hz."""
    frame = int(0.04 * sample_rate)
    frames = np.lib.stride_tricks.sliding_window_view(signal, frame)[:: frame // 2]
    energy = (frames**2).mean(axis=1)
    low, high = int(sample_rate / 400), int(sample_rate / 60)
    estimates = []
    for x in frames[energy > 0.3 * energy.max()]:
        x = x - x.mean()
        autocorrelation = np.correlate(x, x, "full")[frame - 1 :]
        estimates.append(sample_rate / (low + np.argmax(autocorrelation[low:high])))
    return float(np.median(estimates))


def test_layout_and_metadata_format(corpus):
    assert os.path.basename(corpus) == "Libri2Mix"
    assert "SYNTHETIC" in open(os.path.join(corpus, "README.txt")).read()
    base = os.path.join(corpus, "wav8k", "min")
    for split, count in zip(SPLITS, (3, 2, 2)):
        assert sorted(os.listdir(os.path.join(base, split))) == sorted(FOLDERS)
        both = _metadata(corpus, f"mixture_{split}_mix_both.csv")
        clean = _metadata(corpus, f"mixture_{split}_mix_clean.csv")
        single = _metadata(corpus, f"mixture_{split}_mix_single.csv")
        metrics = _metadata(corpus, f"metrics_{split}_mix_both.csv")
        assert list(both[0]) == [
            "mixture_ID", "mixture_path", "source_1_path", "source_2_path", "noise_path", "length"
        ]
        assert list(clean[0]) == [
            "mixture_ID", "mixture_path", "source_1_path", "source_2_path", "length"
        ]
        assert list(single[0]) == [
            "mixture_ID", "mixture_path", "source_1_path", "noise_path", "length"
        ]
        assert list(metrics[0]) == ["mixture_ID", "source_1_SNR", "source_2_SNR", "noise_SNR"]
        assert len(both) == len(clean) == len(single) == len(metrics) == count
        for row in both:
            assert re.fullmatch(r"\d+-\d+-\d{4}_\d+-\d+-\d{4}", row["mixture_ID"])
            assert row["mixture_path"] == os.path.join(
                base, split, "mix_both", row["mixture_ID"] + ".wav"
            )
            for folder in FOLDERS:
                info = sf.info(os.path.join(base, split, folder, row["mixture_ID"] + ".wav"))
                assert (info.samplerate, info.channels) == (8000, 1)
                assert info.frames == int(row["length"])


def test_mixtures_are_sums_with_librimix_levels(corpus):
    base = os.path.join(corpus, "wav8k", "min", "dev")
    meter = pyloudnorm.Meter(8000)
    for row in _metadata(corpus, "metrics_dev_mix_both.csv"):
        wav = {f: sf.read(os.path.join(base, f, row["mixture_ID"] + ".wav"))[0] for f in FOLDERS}
        step = 1.5 / 32768  # 16-bit PCM rounding of three files
        assert np.abs(wav["mix_both"] - wav["s1"] - wav["s2"] - wav["noise"]).max() <= 2 * step
        assert np.abs(wav["mix_clean"] - wav["s1"] - wav["s2"]).max() <= step
        assert np.abs(wav["mix_single"] - wav["s1"] - wav["noise"]).max() <= step
        assert max(np.abs(wav[f]).max() for f in FOLDERS[:3]) <= 0.9 + step
        # after a rescaling (some mixture peaked above 0.9) all levels went down together
        rescaled = max(np.abs(wav[f]).max() for f in FOLDERS[:3]) > 0.89
        for name, (low, high) in (("s1", (-33, -25)), ("s2", (-33, -25)), ("noise", (-38, -30))):
            level = meter.integrated_loudness(wav[name])
            assert level <= high + 0.2 and (rescaled or level >= low - 0.2)
        rest = wav["mix_both"] - wav["s1"]
        snr = 10 * np.log10(np.mean(wav["s1"] ** 2) / np.mean(rest**2))
        assert snr == pytest.approx(float(row["source_1_SNR"]), abs=0.01)


def test_distinct_and_disjoint_speakers(corpus):
    speakers = {}
    for split in SPLITS:
        speakers[split] = set()
        for row in _metadata(corpus, f"mixture_{split}_mix_both.csv"):
            first, second = (utt.split("-")[0] for utt in row["mixture_ID"].split("_"))
            assert first != second
            speakers[split] |= {first, second}
    assert not speakers["train-360"] & speakers["test"]
    assert not speakers["train-360"] & speakers["dev"]
    assert not speakers["dev"] & speakers["test"]


def test_pseudo_speech_f0_follows_the_speaker():
    low, high = make_speakers(np.random.default_rng(0), [1, 2])
    low, high = low._replace(f0=110.0), high._replace(f0=220.0)
    for sample_rate in (8000, 16000):
        x_low = synth_utterance(low, 2.0, sample_rate, np.random.default_rng(1))
        x_high = synth_utterance(high, 2.0, sample_rate, np.random.default_rng(1))
        assert _f0(x_low, sample_rate) == pytest.approx(110.0, rel=0.15)
        assert _f0(x_high, sample_rate) == pytest.approx(220.0, rel=0.15)


def test_deterministic_and_cached(corpus, tmp_path):
    again = make_demo_corpus(str(tmp_path / "again"), **TINY)
    assert _hashes(again) == _hashes(corpus) and len(_hashes(corpus)) == 7 * len(FOLDERS)
    marker = os.path.join(again, "wav8k", "min", "demo_corpus.json")
    stamp = os.stat(marker).st_mtime_ns
    assert make_demo_corpus(str(tmp_path / "again"), **TINY) == again
    assert os.stat(marker).st_mtime_ns == stamp
    # other arguments: rebuilt, and nothing of the old build is left
    make_demo_corpus(str(tmp_path / "again"), **dict(TINY, seed=1, n_train=2))
    assert read_json(marker)["args"]["seed"] == 1
    rebuilt = _hashes(again)
    assert len(rebuilt) == 6 * len(FOLDERS)
    assert not set(rebuilt.values()) & set(_hashes(corpus).values())


def test_interrupted_build_is_redone(corpus, tmp_path):
    copy = shutil.copytree(os.path.dirname(corpus), tmp_path / "copy")
    libri2mix = os.path.join(copy, "Libri2Mix")
    marker = os.path.join(libri2mix, "wav8k", "min", "demo_corpus.json")
    state = read_json(marker)
    with open(marker, "w") as f:
        json.dump(dict(state, complete=False), f)
    shutil.rmtree(os.path.join(libri2mix, "wav8k", "min", "test"))
    make_demo_corpus(str(copy), **TINY)
    assert _hashes(libri2mix) == _hashes(corpus)
    assert read_json(marker)["complete"] is True


def test_max_mode_pads_to_the_longer_source(corpus, tmp_path):
    longer = make_demo_corpus(str(tmp_path), **dict(TINY, mode="max"))
    assert longer == os.path.join(str(tmp_path), "Libri2Mix")
    min_rows = _metadata(corpus, "mixture_train-360_mix_both.csv")
    max_rows = _metadata(longer, "mixture_train-360_mix_both.csv", mode="max")
    assert [r["mixture_ID"] for r in min_rows] == [r["mixture_ID"] for r in max_rows]
    pairs = [(int(a["length"]), int(b["length"])) for a, b in zip(min_rows, max_rows)]
    assert all(short < long for short, long in pairs)
    base = os.path.join(longer, "wav8k", "max", "train-360")
    for row, (short, long) in zip(max_rows, pairs):
        name = row["mixture_ID"] + ".wav"
        s1, s2 = (sf.read(os.path.join(base, f"s{i}", name))[0] for i in (1, 2))
        padded = s1 if np.abs(s1[short:]).max() == 0 else s2
        assert np.abs(padded[short:]).max() == 0 and len(padded) == long


def test_never_overwrites_a_folder_that_is_not_a_demo_corpus(tmp_path):
    real = tmp_path / "Libri2Mix" / "wav8k" / "min" / "dev"
    real.mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a demo corpus"):
        make_demo_corpus(str(tmp_path), **TINY)
    assert real.is_dir()


def test_espeak_voices_need_the_program(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="espeak-ng"):
        make_demo_corpus(str(tmp_path), **dict(TINY, voices="espeak"))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_voices(tmp_path):
    corpus = make_demo_corpus(str(tmp_path), **dict(TINY, voices="espeak", sample_rate=16000))
    marker = read_json(os.path.join(corpus, "wav16k", "min", "demo_corpus.json"))
    assert marker["args"]["voices"] == "espeak"
    row = _metadata(corpus, "mixture_dev_mix_both.csv", rate="wav16k")[0]
    speech, rate = sf.read(row["source_1_path"])
    assert rate == 16000 and np.abs(speech).max() > 0.01


def test_command_line(tmp_path, capsys):
    sizes = ["--n-train", "1", "--n-valid", "1", "--n-test", "1", "--seconds", "0.5"]
    main([str(tmp_path), *sizes, "--voices", "synthetic", "--sample-rate", "16000"])
    corpus = capsys.readouterr().out.strip()
    assert corpus == os.path.join(str(tmp_path), "Libri2Mix")
    assert len(os.listdir(os.path.join(corpus, "wav16k", "min", "dev", "mix_both"))) == 1
