"""Export of a trained run, loading it with SpeechBrain interfaces, and chunked file separation."""

import glob
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml
from scipy.signal import resample_poly
from speechbrain.inference.separation import SepformerSeparation

from umamba.data.audio import read_audio, write_audio
from umamba.export import ExportError, export_model, main as export_main
from umamba.inference import UMambaSeparation, chunk_bounds, stitch_chunks
from umamba.metrics import si_snr
from umamba.models.separator import separate
from helpers import REPO, TINY_UMAMBA, as_cli


# As tests/test_recipe.py, with the pure-PyTorch scan (fast for a tiny model, no JIT compilation).
TINY_MODEL = as_cli({**TINY_UMAMBA, "scan_backend": "torch"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real training run of train.py: 2 epochs of a tiny model on a tiny synthetic corpus."""
    tmp = tmp_path_factory.mktemp("run")
    cmd = [
        sys.executable, "train.py", "hparams/umamba.yaml", "--output_folder", str(tmp / "out"), "--device", "cpu",
        *TINY_MODEL, "--demo_folder", str(tmp / "demo"), "--demo_n_train", "4", "--demo_n_valid", "2",
        "--demo_n_test", "2", "--demo_seconds", "1.0", "--demo_voices", "synthetic", "--batch_size", "2",
        "--segment_seconds", "0.5", "--n_audio_to_save", "0", "--demo_N_epochs", "2",
        "--compute_pesq", "False", "--compute_stoi", "False",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return str(tmp / "out")


@pytest.fixture(scope="module")
def model_dir(run_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "model")
    export_model(run_dir, path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return UMambaSeparation.from_hparams(source=model_dir, savedir=None)


def _checkpoints(run_dir):
    ckpts = {}
    for ckpt_dir in glob.glob(os.path.join(run_dir, "save", "CKPT+*")):
        with open(os.path.join(ckpt_dir, "CKPT.yaml")) as f:
            ckpts[ckpt_dir] = yaml.safe_load(f)
    return ckpts


def _same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def _mixture(seconds, sample_rate=8000, seed=0):
    """Two distinct speech-like sources (modulated harmonics and noise) summed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    s1 = np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.5 * np.sin(2 * np.pi * 360 * t)
    s2 = rng.standard_normal(t.size) * (np.sin(2 * np.pi * 1.3 * t) > 0)
    return (0.1 * (s1 + s2)).astype(np.float32)


def test_export_writes_an_inference_only_folder_with_a_model_card(run_dir, model_dir):
    assert sorted(os.listdir(model_dir)) == ["README.md", "decoder.ckpt", "encoder.ckpt", "hyperparams.yaml",
                                             "masknet.ckpt"]
    text = open(os.path.join(model_dir, "hyperparams.yaml")).read()
    hparams = load_hyperpyyaml(text)
    assert set(hparams) == {"sample_rate", "num_spks", "Encoder", "MaskNet", "Decoder", "modules", "pretrainer"}
    assert hparams["sample_rate"] == 8000 and hparams["num_spks"] == 2
    assert hparams["modules"]["masknet"] is hparams["MaskNet"]
    assert hparams["pretrainer"].loadables == hparams["modules"]
    assert "out_channels: 16" in text and "num_blocks: 2" in text  # the run's overrides, resolved

    card = open(os.path.join(model_dir, "README.md")).read()
    assert "SYNTHETIC demo corpus" in card
    total = sum(p.numel() for m in hparams["modules"].values() for p in m.parameters())
    assert f"| total | | {total:,} |" in card
    with open(os.path.join(run_dir, "test_results", "summary.csv")) as f:
        si_snri_row = next(line for line in f if line.startswith("si_snri,"))
    assert "| " + " | ".join(si_snri_row.strip().split(",")) + " |" in card


def test_export_takes_the_best_checkpoint_by_default_and_others_on_request(run_dir, model_dir, tmp_path):
    ckpts = _checkpoints(run_dir)
    best = min(ckpts, key=lambda c: ckpts[c]["neg_si_snr"])
    last = max(ckpts, key=lambda c: ckpts[c]["unixtime"])
    for name in ("encoder", "masknet", "decoder"):
        assert _same_bytes(os.path.join(model_dir, f"{name}.ckpt"), os.path.join(best, f"{name}.ckpt"))
    for choice, expected in (("last", last), (best, best)):
        out = tmp_path / os.path.basename(choice)
        assert export_model(run_dir, str(out), ckpt=choice).path.name == os.path.basename(expected)
        assert _same_bytes(out / "masknet.ckpt", os.path.join(expected, "masknet.ckpt"))


def test_exported_model_computes_what_the_brain_computes(run_dir, model):
    # The Brain's modules, as train.py --test_only restores them: the run's yaml and best checkpoint.
    with open(os.path.join(run_dir, "hyperparams.yaml")) as f:
        hparams = load_hyperpyyaml(f)
    hparams["checkpointer"].recover_if_possible(min_key="neg_si_snr")
    mods = [hparams[k].eval() for k in ("Encoder", "MaskNet", "Decoder")]
    mix = torch.randn(2, 3000)
    with torch.no_grad():
        expected = separate(*mods, mix)
    assert torch.allclose(model.separate_batch(mix), expected, atol=1e-6)


def test_speechbrain_sepformer_interface_loads_the_folder_and_agrees(model_dir, model, tmp_path):
    sb_model = SepformerSeparation.from_hparams(source=model_dir, savedir=str(tmp_path / "sb"))
    mix = torch.randn(1, 2500)
    est = sb_model.separate_batch(mix)
    assert est.shape == (1, 2500, 2)
    assert torch.allclose(est, model.separate_batch(mix), atol=1e-5)


def test_export_errors_name_the_run(run_dir, tmp_path, capsys):
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "hyperparams.yaml").write_text(open(os.path.join(run_dir, "hyperparams.yaml")).read())
    with pytest.raises(ExportError, match="no checkpoint folder"):
        export_model(str(empty_run), str(tmp_path / "m1"))
    (empty_run / "save").mkdir()
    assert export_main([str(empty_run), str(tmp_path / "m2")]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and str(empty_run) in err and "Traceback" not in err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()

    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_model(run_dir, str(target))
    assert (target / "notes.txt").read_text() == "keep me"
    export_model(run_dir, str(target), overwrite=True)
    assert sorted(os.listdir(target))[-1] == "masknet.ckpt" and not (target / "notes.txt").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".") or ".old-" in p] == []  # no leftovers


def test_chunk_bounds_cover_the_signal_with_full_overlapping_chunks():
    for num_samples in range(1, 80):
        bounds = chunk_bounds(num_samples, 20, 5)
        assert bounds[0][0] == 0 and bounds[-1][1] == num_samples
        assert all(e - s == min(20, num_samples) for s, e in bounds)
        assert all(5 <= e0 - s1 < 20 for (_, e0), (s1, _) in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError):
        chunk_bounds(100, 20, 20)


@pytest.mark.parametrize("num_samples", [1000, 1234, 2999])
def test_stitching_keeps_each_speaker_on_the_same_output_across_chunk_borders(num_samples):
    # Model-free: each chunk returns the true sources in another order; the stitched output must
    # put every speaker back on the output the first chunk gave it.
    sources = torch.randn(num_samples, 3)
    bounds = chunk_bounds(num_samples, 400, 100)
    orders = itertools.cycle(itertools.permutations(range(3)))
    chunks = [sources[s:e, list(next(orders))] for s, e in bounds]
    assert len(chunks) >= 3
    stitched = torch.cat(list(stitch_chunks(chunks, bounds)))
    assert stitched.shape == sources.shape
    assert torch.allclose(stitched, sources, atol=1e-6)


def test_chunked_separation_agrees_with_whole_file_separation(model, tmp_path):
    mix = _mixture(7.0)
    write_audio(tmp_path / "mix.wav", mix, 8000)
    whole = model.separate_file(str(tmp_path / "mix.wav"), chunk_seconds=10.0)
    assert torch.equal(whole, model.separate_batch(torch.from_numpy(mix)[None])[0])
    chunked = model.separate_file(str(tmp_path / "mix.wav"), chunk_seconds=3.0, overlap_seconds=1.0)
    assert chunked.shape == whole.shape == (mix.size, 2)
    agreement = si_snr(chunked.T, whole.T)
    assert (agreement > 20).all(), agreement


def test_separate_file_writes_one_wav_per_speaker(model, tmp_path):
    write_audio(tmp_path / "in" / "talk.wav", _mixture(2.0), 8000)
    est = model.separate_file(str(tmp_path / "in" / "talk.wav"), out_dir=str(tmp_path / "out"), chunk_seconds=1.0,
                              overlap_seconds=0.25)
    assert sorted(os.listdir(tmp_path / "out")) == ["talk_s1.wav", "talk_s2.wav"]
    for k in range(2):
        written = read_audio(tmp_path / "out" / f"talk_s{k + 1}.wav", sample_rate=8000)
        assert torch.equal(written, est[:, k])
    paths = model.separate_to_files(str(tmp_path / "in" / "talk.wav"), str(tmp_path / "out2"), 1.0, 0.25, name="x")
    assert [os.path.basename(p) for p in paths] == ["x_s1.wav", "x_s2.wav"]
    assert torch.equal(read_audio(paths[1]), est[:, 1])


@pytest.mark.parametrize("file_rate", [16000, 44100])
def test_other_sample_rates_are_resampled_exactly_chunk_by_chunk(model, tmp_path, file_rate):
    mix = _mixture(2.6, sample_rate=file_rate)
    write_audio(tmp_path / "hi.wav", mix, file_rate)
    resampled = resample_poly(mix, 8000, file_rate).astype(np.float32)  # the whole file at once
    write_audio(tmp_path / "lo.wav", resampled, 8000)
    est = model.separate_file(str(tmp_path / "hi.wav"), chunk_seconds=1.0, overlap_seconds=0.3)
    assert est.shape == (len(resampled), 2)
    expected = model.separate_file(str(tmp_path / "lo.wav"), chunk_seconds=1.0, overlap_seconds=0.3)
    assert torch.allclose(est, expected, atol=1e-5)


def test_stereo_input_is_averaged_with_a_warning(model, tmp_path, caplog):
    left, right = _mixture(1.5, seed=1), _mixture(1.5, seed=2)[::-1].copy()
    write_audio(tmp_path / "stereo.wav", np.stack([left, right], 1), 8000)
    write_audio(tmp_path / "mono.wav", (left + right) / 2, 8000)
    with caplog.at_level("WARNING"):
        est = model.separate_file(str(tmp_path / "stereo.wav"))
    assert any("2 channels" in r.getMessage() and "stereo.wav" in r.getMessage() for r in caplog.records)
    assert torch.allclose(est, model.separate_file(str(tmp_path / "mono.wav")), atol=1e-5)


def test_bad_chunk_settings_are_refused(model, tmp_path):
    write_audio(tmp_path / "a.wav", _mixture(1.0), 8000)
    for chunk, overlap in ((1.0, 0.0), (1.0, 1.0), (0.01, 0.005)):
        with pytest.raises(ValueError, match="overlap_seconds"):
            model.separate_file(str(tmp_path / "a.wav"), chunk_seconds=chunk, overlap_seconds=overlap)
