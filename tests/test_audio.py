"""Tests of umamba.data.audio: reading, writing and the errors that name the file."""

import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from umamba.data.audio import AudioError, atomic_output, audio_info, read_audio, write_audio


def _error(func, path, **kwargs):
    """Calls ``func(path)`` and returns the AudioError message, checking it names the file."""
    with pytest.raises(AudioError) as info:
        func(path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


def test_round_trip_float_and_pcm16(tmp_path):
    signal = np.random.default_rng(0).uniform(-0.9, 0.9, 1000).astype(np.float32)
    write_audio(tmp_path / "f.wav", torch.from_numpy(signal), 8000)
    write_audio(tmp_path / "p.wav", signal, 16000, subtype="PCM_16")
    # soundfile as the independent reader
    assert np.array_equal(sf.read(tmp_path / "f.wav", dtype="float32")[0], signal)
    assert sf.info(tmp_path / "p.wav").subtype == "PCM_16"
    x = read_audio(tmp_path / "p.wav", sample_rate=16000)
    assert x.dtype == torch.float32 and x.shape == (1000,)
    assert np.abs(x.numpy() - signal).max() <= 1 / 32768
    assert audio_info(tmp_path / "p.wav") == (1000, 16000, 1, 1000 / 16000)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.wav"
    assert "no such file" in _error(read_audio, path)
    assert "no such file" in _error(audio_info, path)


def test_corrupt_truncated_header(tmp_path):
    write_audio(tmp_path / "ok.wav", np.zeros(100), 8000)
    path = tmp_path / "truncated.wav"
    path.write_bytes((tmp_path / "ok.wav").read_bytes()[:20])
    assert "corrupt" in _error(read_audio, path)
    assert "corrupt" in _error(audio_info, path)
    path.write_bytes(b"not audio at all" * 10)
    assert "corrupt" in _error(read_audio, path)


def test_empty_files(tmp_path):
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    assert "empty" in _error(read_audio, zero_bytes)
    zero_frames = tmp_path / "no_frames.wav"
    sf.write(zero_frames, np.zeros(0), 8000)
    assert audio_info(zero_frames).frames == 0
    assert "0 frames" in _error(read_audio, zero_frames)


def test_wrong_sample_rate(tmp_path):
    path = tmp_path / "a.wav"
    write_audio(path, np.zeros(80), 8000)
    message = _error(read_audio, path, sample_rate=16000)
    assert "expected 16000 Hz" in message and "found 8000 Hz" in message
    assert read_audio(path, sample_rate=8000).shape == (80,)


def test_stereo_error_and_downmix(tmp_path, caplog):
    path = tmp_path / "stereo.wav"
    stereo = np.stack([np.full(50, 0.5), np.full(50, -0.1)], axis=1)
    sf.write(path, stereo, 8000, subtype="FLOAT")
    assert "2 channels" in _error(read_audio, path)
    with caplog.at_level(logging.WARNING):
        first = read_audio(path, downmix=True)
        second = read_audio(path, downmix=True)
    assert torch.allclose(first, torch.full((50,), 0.2))
    assert torch.equal(first, second)
    warnings = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1


def test_non_finite_samples(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.array([0.0, np.nan, 0.1]), 8000, subtype="FLOAT")
    assert "NaN" in _error(read_audio, path)


def test_write_refuses_bad_input_and_keeps_old_file(tmp_path):
    path = tmp_path / "out.wav"
    write_audio(path, np.full(10, 0.25), 8000)
    before = path.read_bytes()
    assert "NaN or infinite" in _error(write_audio, path, signal=np.array([np.inf]), sample_rate=8)
    assert "[time, channels]" in _error(write_audio, path, signal=np.zeros((2, 10, 1)), sample_rate=8000)
    assert "subtype" in _error(write_audio, path, signal=np.zeros(9), sample_rate=8, subtype="NO")
    assert "extension" in _error(write_audio, tmp_path / "a.xyz", signal=np.zeros(9), sample_rate=8)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.wav"]


def test_write_creates_folders_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a" / "b" / "c.wav"
    write_audio(path, np.zeros(10), 8000)
    write_audio(path, np.ones(20) * 0.5, 8000)  # replaces
    assert os.listdir(path.parent) == ["c.wav"]
    assert audio_info(path).frames == 20


def test_atomic_output_failure_leaves_target_untouched(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half written")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["table.csv"]
