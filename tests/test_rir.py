"""Tests of umamba.data.rir: T60, direct-path alignment, multichannel files, determinism, resume."""

import csv
import filecmp
import os
import shutil

import numpy as np
import pyroomacoustics as pra
import pytest
from scipy.signal import correlate, fftconvolve
from speechbrain.dataio.dataset import DynamicItemDataset

from umamba.data.audio import AudioError, audio_info
from umamba.data.rir import (
    DIRECT_INDEX,
    DIRECT_LENGTH,
    make_rir_bank,
    measure_t60,
    read_rir,
    sample_room,
    simulate_room,
)

SR = 8000


def _with_rt60(room, rt60):
    """The same room with another target T60 (absorption from Sabine's formula)."""
    absorption, order = pra.inverse_sabine(rt60, room.dims)
    return room._replace(rt60=rt60, absorption=absorption, full_ism_order=order)


def _schroeder_t30(rir, sample_rate):
    """T60 from the Schroeder curve: line fitted between -5 and -35 dB, extrapolated to -60 dB."""
    energy = np.cumsum(rir[::-1].astype(float) ** 2)[::-1]
    energy = energy[energy > 0]
    curve = 10 * np.log10(energy / energy[0])
    fit = (curve <= -5) & (curve >= -35)
    slope = np.polyfit(np.flatnonzero(fit) / sample_rate, curve[fit], 1)[0]
    return -60.0 / slope


def _files(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


def _same_tree(a, b):
    """Same files: same samples for wavs (float wav headers hold a time stamp), else same bytes."""
    files = _files(a)
    assert files == _files(b)
    for name in files:
        if name.endswith(".wav"):
            np.testing.assert_array_equal(read_rir(a / name), read_rir(b / name), err_msg=name)
        else:
            assert filecmp.cmp(a / name, b / name, shallow=False), name
    return True


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A 3-room bank at 8 kHz, built with one process."""
    out = tmp_path_factory.mktemp("bank")
    make_rir_bank(str(out), n_rooms=3, sample_rates=[SR], seed=1, jobs=1)
    return out


@pytest.mark.parametrize("index, rt60", [(0, 0.3), (1, 0.45), (2, 0.6)])
def test_measured_t60_near_target(index, rt60):
    rirs, _ = simulate_room(_with_rt60(sample_room(0, index), rt60), SR)
    for rir in rirs:
        reference = _schroeder_t30(rir, SR)
        assert measure_t60(rir, SR) == pytest.approx(reference, rel=0.05)
        assert reference == pytest.approx(rt60, rel=0.2)


def test_rooms_csv_records_the_measured_t60(bank):
    with open(bank / "rooms.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["room_id"] for row in rows] == ["room_00000", "room_00001", "room_00002"]
    for row in rows:
        room = sample_room(1, int(row["room_id"][-5:]))
        assert float(row["rt60_target"]) == pytest.approx(room.rt60, rel=1e-5)
        assert float(row["distance_2"]) == pytest.approx(room.distances[1], rel=1e-5)
        rirs = read_rir(bank / "rirs" / str(SR) / f"{row['room_id']}.wav", SR)
        for k, rir in enumerate(rirs):
            measured = float(row[f"rt60_{SR}_src{k + 1}"])
            assert measured == pytest.approx(_schroeder_t30(rir, SR), rel=0.05)


def test_direct_path_is_the_one_of_pyroomacoustics():
    """Our analytic direct path equals pyroomacoustics' with max_order=0, scaled by the distance."""
    room = sample_room(0, 5)
    _, direct = simulate_room(room, SR)
    anechoic = pra.ShoeBox(room.dims, fs=SR, max_order=0)
    anechoic.add_microphone(room.mic)
    for source in room.sources:
        anechoic.add_source(source)
    anechoic.compute_rir()
    for k, distance in enumerate(room.distances):
        reference = anechoic.rir[0][k] * distance
        start = int(np.argmax(reference)) - DIRECT_INDEX
        reference = reference[start : start + DIRECT_LENGTH]
        # pyroomacoustics interpolates its sinc from a table and high-passes at 10 Hz
        np.testing.assert_allclose(direct[k], reference, atol=0.01)


def test_direct_path_aligned_with_reverberant_rir():
    rng = np.random.default_rng(0)
    dry = rng.standard_normal(4000)
    for index in range(2):
        rirs, direct = simulate_room(sample_room(0, index), SR)
        for rir, path in zip(rirs, direct):
            assert np.argmax(np.abs(rir)) == np.argmax(np.abs(path)) == DIRECT_INDEX
            assert abs(path[DIRECT_INDEX]) > 0.6  # unit gain, fraction of a sample off
            assert np.sum(path) == pytest.approx(1.0, abs=0.01)  # unit gain at low frequency
            reverberant = fftconvolve(dry, rir)[: dry.size]
            anechoic = fftconvolve(dry, path)[: dry.size]
            xcorr = correlate(reverberant, anechoic, mode="full")
            assert np.argmax(xcorr) - (dry.size - 1) == 0


def test_rir_channels_are_the_sources(bank):
    room = sample_room(1, 0)
    rirs = read_rir(bank / "rirs" / str(SR) / "room_00000.wav", SR)
    direct = read_rir(bank / "rirs" / str(SR) / "room_00000_direct.wav", SR)
    assert rirs.shape[0] == direct.shape[0] == 2 and direct.shape[1] == DIRECT_LENGTH
    assert room.sources[0] != room.sources[1]
    length = min(np.flatnonzero(rirs[0])[-1], np.flatnonzero(rirs[1])[-1])
    assert np.corrcoef(rirs[0][:length], rirs[1][:length])[0, 1] < 0.5
    # each channel is the simulation of its own source
    expected, _ = simulate_room(room, SR)
    np.testing.assert_array_equal(rirs, expected)


def test_speechbrain_csv(bank):
    csv_path = bank / f"rirs_{SR}.csv"
    with open(csv_path) as f:
        assert f.readline().strip() == "ID,duration,wav,wav_format,wav_opts"
    data = DynamicItemDataset.from_csv(str(csv_path), replacements={"rir_root": str(bank)})
    assert data.data_ids == ["room_00000", "room_00001", "room_00002"]
    for room in data.data_ids:
        entry = data.data[room]
        info = audio_info(entry["wav"])
        assert (info.sample_rate, info.channels) == (SR, 2)
        assert float(entry["duration"]) == pytest.approx(info.duration, abs=1e-5)
        assert entry["wav_format"] == "wav"


def test_same_files_whatever_the_jobs_and_interruptions(bank, tmp_path):
    parallel = tmp_path / "parallel"
    make_rir_bank(str(parallel), n_rooms=3, sample_rates=[SR], seed=1, jobs=2)
    assert _same_tree(bank, parallel)

    # interrupted builds: a room without its record, one with a missing or a half-written file
    os.remove(parallel / "rooms" / "room_00000.json")
    os.remove(parallel / "rirs" / str(SR) / "room_00001.wav")
    with open(parallel / "rirs" / str(SR) / "room_00002_direct.wav", "r+b") as f:
        f.truncate(100)
    (parallel / "rooms.csv").unlink()
    make_rir_bank(str(parallel), n_rooms=3, sample_rates=[SR], seed=1, jobs=2)
    assert _same_tree(bank, parallel)

    # a finished bank is not touched
    mtimes = {f: os.stat(parallel / f).st_mtime_ns for f in _files(parallel) if f.endswith(".wav")}
    make_rir_bank(str(parallel), n_rooms=3, sample_rates=[SR], seed=1, jobs=2)
    assert mtimes == {f: os.stat(parallel / f).st_mtime_ns for f in mtimes}


def test_other_settings_rebuild_the_rooms(bank, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(bank, other)
    make_rir_bank(str(other), n_rooms=3, sample_rates=[SR], seed=2, jobs=1)
    assert sample_room(2, 0) != sample_room(1, 0)
    rirs = read_rir(other / "rirs" / str(SR) / "room_00000.wav")
    assert rirs.shape != read_rir(bank / "rirs" / str(SR) / "room_00000.wav").shape
    np.testing.assert_array_equal(rirs, simulate_room(sample_room(2, 0), SR)[0])
    with open(other / "rooms.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["rt60_target"]) == pytest.approx(sample_room(2, 0).rt60, rel=1e-5)


def test_same_geometry_at_every_sample_rate(tmp_path):
    make_rir_bank(str(tmp_path), n_rooms=1, sample_rates=[8000, 16000], seed=1, jobs=1)
    rirs_8k = read_rir(tmp_path / "rirs" / "8000" / "room_00000.wav", 8000)
    rirs_16k = read_rir(tmp_path / "rirs" / "16000" / "room_00000.wav", 16000)
    np.testing.assert_array_equal(rirs_8k, simulate_room(sample_room(1, 0), 8000)[0])
    # same room: the same decay (within the simulation noise) and direct path at the same index
    for rir_8k, rir_16k in zip(rirs_8k, rirs_16k):
        t60_8k = _schroeder_t30(rir_8k, 8000)
        assert _schroeder_t30(rir_16k, 16000) == pytest.approx(t60_8k, rel=0.1)
        assert np.argmax(np.abs(rir_16k)) == DIRECT_INDEX


def test_read_rir_names_the_file(bank):
    path = bank / "rirs" / str(SR) / "room_00000.wav"
    with pytest.raises(AudioError, match="room_00000.wav.*16000 Hz"):
        read_rir(path, 16000)
    with pytest.raises(AudioError, match="missing.wav"):
        read_rir(bank / "missing.wav")
