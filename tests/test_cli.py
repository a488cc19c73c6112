"""umamba-separate: good files separated, bad files reported by name, exit codes, no clobbering."""

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from umamba.cli import main, output_names
from umamba.data.audio import audio_info, read_audio, write_audio
from umamba.inference import UMambaSeparation
from helpers import REPO, export_untrained_tiny_model



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_untrained_tiny_model(tmp_path_factory.mktemp("cli"))


def _signal(seconds, seed, sample_rate=8000):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(round(seconds * sample_rate))).astype(np.float32)


def test_output_names_never_collide():
    paths = ["a/mix.wav", "b/mix.wav", "c/MIX.flac", "mix-1.wav", "d/other.wav"]
    names = output_names(paths)
    assert names[3:] == ["mix-1", "other"]  # unique stems are kept
    assert len({n.casefold() for n in names}) == len(paths)


def test_bad_files_are_reported_by_name_and_the_good_one_is_separated(model_dir, tmp_path, capsys):
    good = tmp_path / "good.wav"
    write_audio(good, _signal(2.0, 0), 8000)
    bad = {
        "missing": tmp_path / "missing.wav",
        "empty": tmp_path / "empty.wav",
        "truncated": tmp_path / "truncated.wav",
        "nan": tmp_path / "nan.wav",
        "short": tmp_path / "short.wav",
        "no_samples": tmp_path / "no_samples.wav",
    }
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(good.read_bytes()[:30])  # cut inside the header
    # NaN samples and zero frames: files write_audio refuses to write, written with soundfile.
    late_nan = _signal(2.0, 1)
    late_nan[14000] = np.nan  # after the first chunks were already separated and written
    sf.write(bad["nan"], late_nan, 8000, subtype="FLOAT")
    write_audio(bad["short"], _signal(0.05, 2), 8000)
    sf.write(bad["no_samples"], np.zeros(0, np.float32), 8000)
    out = tmp_path / "out"

    inputs = [str(bad["missing"]), str(good), *(str(p) for k, p in bad.items() if k != "missing")]
    status = main([*inputs, "--model", model_dir, "--out", str(out), "--chunk-seconds", "0.5",
                   "--overlap-seconds", "0.1"])

    assert status == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad)
    for path in bad.values():
        assert sum(str(path) in line for line in errors) == 1, (path, errors)
    assert "NaN" in next(line for line in errors if str(bad["nan"]) in line)
    assert "too short" in next(line for line in errors if str(bad["short"]) in line)
    # Only the good file's outputs, complete, and no temporary file left behind.
    assert sorted(os.listdir(out)) == ["good_s1.wav", "good_s2.wav"]
    assert audio_info(out / "good_s1.wav").frames == 16000


def test_same_file_name_in_two_folders_gives_two_outputs(model_dir, tmp_path, capsys):
    first, second = tmp_path / "a" / "mix.wav", tmp_path / "b" / "mix.wav"
    write_audio(first, _signal(1.0, 3), 8000)
    write_audio(second, _signal(1.5, 4), 8000)
    out = tmp_path / "out"
    assert main([str(first), str(second), "--model", model_dir, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["mix-1_s1.wav", "mix-1_s2.wav", "mix-2_s1.wav", "mix-2_s2.wav"]
    model = UMambaSeparation.from_hparams(source=model_dir)
    for path, name in ((first, "mix-1"), (second, "mix-2")):
        expected = model.separate_file(str(path))
        assert torch.allclose(read_audio(out / f"{name}_s2.wav"), expected[:, 1], atol=1e-6)
    assert "Separated 2 of 2 files" in capsys.readouterr().out


def test_usage_errors_exit_with_status_2(model_dir, tmp_path):
    write_audio(tmp_path / "a.wav", _signal(1.0, 5), 8000)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "a.wav"), "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2  # not a model folder
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "a.wav"), "--model", model_dir, "--out", str(tmp_path / "out"),
              "--chunk-seconds", "1", "--overlap-seconds", "1"])
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


def test_python_m_umamba_cli(model_dir, tmp_path):
    write_audio(tmp_path / "talk.wav", _signal(1.0, 6, 16000), 16000)  # resampled to the model's 8 kHz
    cmd = [sys.executable, "-m", "umamba.cli", str(tmp_path / "talk.wav"), str(tmp_path / "gone.wav"),
           "--model", model_dir, "--out", str(tmp_path / "out"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert f"error: Cannot read audio '{tmp_path / 'gone.wav'}': no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert audio_info(tmp_path / "out" / "talk_s1.wav") == audio_info(tmp_path / "out" / "talk_s2.wav")
    assert audio_info(tmp_path / "out" / "talk_s1.wav").frames == 8000
