"""Tests of umamba.data.reverb_librimix on the tiny demo corpus and a small RIR bank."""

import csv
import os
import shutil

import numpy as np
import pytest
import torch
from scipy.signal import correlate

from umamba.data.audio import read_audio
from umamba.data.demo_corpus import make_demo_corpus
from umamba.data.librimix import metadata_path, prepare_librimix
from umamba.data.reverb_librimix import REVERB_FOLDERS, make_reverb_librimix, reverberate_mixture
from umamba.data.rir import DIRECT_INDEX, make_rir_bank, read_rir
from umamba.metrics import si_snr

SR = 8000
SPLITS = ("dev", "test")
QUANTUM = 1 / 32768  # 16-bit PCM step


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _audio(base, split, folder, mixture_id):
    return read_audio(os.path.join(base, split, folder, f"{mixture_id}.wav"), SR).double().numpy()


def _files(folder):
    """Relative path -> content of the files of the reverberant set, the folder's path masked."""
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.relpath(os.path.join(directory, name), folder)
            if "reverb" in path or "anechoic" in path:
                with open(os.path.join(folder, path), "rb") as f:
                    files[path] = f.read().replace(str(folder).encode(), b"<root>")
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A demo corpus, a 3-room bank, and the reverberant set built from them (one process)."""
    tmp = tmp_path_factory.mktemp("reverb")
    make_demo_corpus(str(tmp), n_train=2, n_valid=1, n_test=2, seconds=1.0, voices="synthetic")
    pristine = tmp / "pristine"
    shutil.copytree(tmp / "Libri2Mix", pristine)  # the corpus before the reverberant build
    bank = tmp / "bank"
    make_rir_bank(str(bank), n_rooms=3, sample_rates=[SR], seed=0, jobs=1)
    outputs = make_reverb_librimix(str(tmp), str(bank), splits=SPLITS, jobs=1)
    return {"root": tmp / "Libri2Mix", "pristine": pristine, "bank": bank, "outputs": outputs}


def test_layout_and_metadata(data):
    base = data["root"] / "wav8k" / "min"
    for split in SPLITS:
        assert data["outputs"][split] == metadata_path(
            str(data["root"]), SR, "min", split, "mix_both_reverb"
        )
        original = _read_csv(metadata_path(str(data["root"]), SR, "min", split, "mix_both"))
        both = _read_csv(data["outputs"][split])
        clean = _read_csv(metadata_path(str(data["root"]), SR, "min", split, "mix_clean_reverb"))
        assert list(both[0]) == [
            "mixture_ID", "mixture_path", "source_1_path", "source_2_path", "noise_path", "length"
        ]
        assert list(clean[0]) == [
            "mixture_ID", "mixture_path", "source_1_path", "source_2_path", "length"
        ]
        assert [r["mixture_ID"] for r in both] == sorted(r["mixture_ID"] for r in original)
        rooms = _read_csv(base / "metadata" / f"reverb_{split}.csv")
        assert [r["mixture_ID"] for r in rooms] == [r["mixture_ID"] for r in both]
        assert {r["room_id"] for r in rooms} <= {"room_00000", "room_00001", "room_00002"}
        for row, clean_row in zip(both, clean):
            name = f"{row['mixture_ID']}.wav"
            assert row["mixture_path"] == str(base / split / "mix_both_reverb" / name)
            assert clean_row["mixture_path"] == str(base / split / "mix_clean_reverb" / name)
            assert row["source_2_path"] == clean_row["source_2_path"]
            assert row["source_2_path"] == str(base / split / "s2_anechoic" / name)
            assert row["noise_path"] == str(base / split / "noise_reverb" / name)
            for folder in REVERB_FOLDERS.values():
                assert _audio(base, split, folder, row["mixture_ID"]).size == int(row["length"])


def test_mixtures_are_sums_of_their_parts(data):
    base = data["root"] / "wav8k" / "min"
    for split in SPLITS:
        for row in _read_csv(data["outputs"][split]):
            get = lambda folder: _audio(base, split, folder, row["mixture_ID"])  # noqa: E731
            clean = get("s1_reverb") + get("s2_reverb")
            np.testing.assert_allclose(get("mix_clean_reverb"), clean, atol=2 * QUANTUM)
            np.testing.assert_allclose(
                get("mix_both_reverb"), clean + get("noise_reverb"), atol=3 * QUANTUM
            )
            peak = max(np.abs(get(folder)).max() for folder in REVERB_FOLDERS.values())
            assert peak <= 0.9 + QUANTUM


def test_matches_an_independent_convolution(data):
    """s_k_reverb and s_k_anechoic = np.convolve of the dry source with the room's RIRs, aligned."""
    base = data["root"] / "wav8k" / "min"
    for split in SPLITS:
        for row in _read_csv(base / "metadata" / f"reverb_{split}.csv"):
            mixture_id = row["mixture_ID"]
            rirs = read_rir(data["bank"] / "rirs" / str(SR) / f"{row['room_id']}.wav", SR)
            direct = read_rir(
                data["bank"] / "rirs" / str(SR) / f"{row['room_id']}_direct.wav", SR
            )
            noise = _audio(base, split, "noise", mixture_id)
            # the common gain: 1, or 0.9 / peak when the mixture would have clipped
            gain = _audio(base, split, "noise_reverb", mixture_id) @ noise / (noise @ noise)
            assert 0 < gain <= 1 + 1e-3
            for k in range(2):
                dry = _audio(base, split, f"s{k + 1}", mixture_id)
                crop = slice(DIRECT_INDEX, DIRECT_INDEX + dry.size)
                for kernel, folder in ((rirs[k], "reverb"), (direct[k], "anechoic")):
                    expected = gain * np.convolve(dry, kernel.astype(float))[crop]
                    written = _audio(base, split, f"s{k + 1}_{folder}", mixture_id)
                    tolerance = 2 * QUANTUM + 1e-3 * np.abs(expected).max()
                    np.testing.assert_allclose(written, expected, atol=tolerance)


def test_anechoic_targets_aligned_with_sources(data):
    base = data["root"] / "wav8k" / "min"
    for row in _read_csv(data["outputs"]["test"]):
        for k in (1, 2):
            dry = _audio(base, "test", f"s{k}", row["mixture_ID"])
            anechoic = _audio(base, "test", f"s{k}_anechoic", row["mixture_ID"])
            reverberant = _audio(base, "test", f"s{k}_reverb", row["mixture_ID"])
            for other in (dry, reverberant):
                xcorr = correlate(other, anechoic, mode="full")
                assert np.argmax(xcorr) - (anechoic.size - 1) == 0
            # the dry source up to a sub-sample delay: close below 2 kHz
            assert si_snr(torch.tensor(anechoic), torch.tensor(dry)).item() > 5


def test_reverberation_lowers_the_si_snr(data):
    base = data["root"] / "wav8k" / "min"
    for split in SPLITS:
        for row in _read_csv(data["outputs"][split]):
            get = lambda f: torch.tensor(_audio(base, split, f, row["mixture_ID"]))  # noqa: E731
            anechoic = torch.stack([get("s1_anechoic"), get("s2_anechoic")])
            reverb = si_snr(get("mix_both_reverb"), anechoic)
            dry = si_snr(get("mix_both"), torch.stack([get("s1"), get("s2")]))
            assert torch.all(reverb > -15) and torch.all(reverb < 5)
            assert reverb.mean() < dry.mean()


def test_loud_mixtures_are_scaled_down_together():
    rng = np.random.default_rng(0)
    sources, noise = rng.uniform(-0.6, 0.6, (2, 500)), rng.uniform(-0.3, 0.3, 500)
    rirs = np.zeros((2, 50))
    rirs[:, [3, 20, 45]] = [1.0, 0.7, -0.5]
    direct = np.zeros((2, 7))
    direct[:, 3] = 1.0
    signals = reverberate_mixture(sources, noise, rirs, direct)
    gain = signals["noise"] @ noise / (noise @ noise)
    assert gain < 1
    assert max(np.abs(signal).max() for signal in signals.values()) == pytest.approx(0.9)
    np.testing.assert_allclose(signals["s1_anechoic"], gain * sources[0])
    expected = np.convolve(sources[1], rirs[1])[3:503]
    np.testing.assert_allclose(signals["s2"], gain * expected)
    mix = signals["s1"] + signals["s2"] + signals["noise"]
    np.testing.assert_allclose(signals["mix_both"], mix)


def test_deterministic_and_resumable(data, tmp_path):
    # built again from scratch, with two processes: the same files
    root = tmp_path / "Libri2Mix"
    shutil.copytree(data["pristine"], root)
    make_reverb_librimix(str(root), str(data["bank"]), splits=SPLITS, jobs=2)
    built = _files(data["root"])
    assert len(built) == 3 * len(REVERB_FOLDERS) + 4 * len(SPLITS)  # 3 mixtures, 4 metadata files
    assert _files(root) == built

    # a finished build is skipped; an interrupted one (a file missing, one cut short) resumes
    folder = root / "wav8k" / "min" / "test"
    mtimes = {p: os.stat(p).st_mtime_ns for p in folder.glob("*_reverb/*.wav")}
    make_reverb_librimix(str(root), str(data["bank"]), splits=["test"], jobs=1)
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in mtimes}
    victims = sorted(folder.glob("s1_anechoic/*.wav"))
    victims[0].unlink()
    with open(sorted(folder.glob("mix_both_reverb/*.wav"))[-1], "r+b") as f:
        f.truncate(200)
    make_reverb_librimix(str(root), str(data["bank"]), splits=["test"], jobs=1)
    assert _files(root) == built


def test_another_seed_rebuilds(data, tmp_path):
    root = tmp_path / "Libri2Mix"
    shutil.copytree(data["root"], root)
    make_reverb_librimix(str(root), str(data["bank"]), splits=["test"], seed=5, jobs=1)
    metadata = root / "wav8k" / "min" / "metadata"
    rooms = [r["room_id"] for r in _read_csv(metadata / "reverb_test.csv")]
    old_metadata = data["root"] / "wav8k" / "min" / "metadata"
    old_rooms = [r["room_id"] for r in _read_csv(old_metadata / "reverb_test.csv")]
    assert rooms != old_rooms  # (3 rooms, 2 mixtures: true for seeds 0 and 5)
    base = root / "wav8k" / "min"
    for row, room, old_room in zip(_read_csv(metadata / "reverb_test.csv"), rooms, old_rooms):
        old = _audio(data["root"] / "wav8k" / "min", "test", "s1_reverb", row["mixture_ID"])
        new = _audio(base, "test", "s1_reverb", row["mixture_ID"])
        assert np.array_equal(old, new) == (room == old_room)


def test_prepare_librimix_reads_the_reverberant_set(data, tmp_path):
    for targets in (("s1_anechoic", "s2_anechoic"), ("s1_reverb", "s2_reverb")):
        csvs = prepare_librimix(
            str(data["root"].parent),
            str(tmp_path / targets[0]),
            splits=SPLITS,
            mix_folder="mix_both_reverb",
            source_folders=targets,
        )
        for split in SPLITS:
            rows = _read_csv(csvs[split])
            metadata = _read_csv(data["outputs"][split])
            assert [r["ID"] for r in rows] == [r["mixture_ID"] for r in metadata]
            for row in rows:
                folder = f"$data_root/wav8k/min/{split}"
                assert row["mix_wav"] == f"{folder}/mix_both_reverb/{row['ID']}.wav"
                assert row["s1_wav"] == f"{folder}/{targets[0]}/{row['ID']}.wav"
                assert row["s2_wav"] == f"{folder}/{targets[1]}/{row['ID']}.wav"


def test_bank_without_the_sample_rate(data, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(data["bank"], bank)
    (bank / f"rirs_{SR}.csv").unlink()
    with pytest.raises(FileNotFoundError, match=f"rirs_{SR}.csv"):
        make_reverb_librimix(str(data["root"]), str(bank), splits=["dev"])

