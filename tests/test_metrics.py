"""Tests of umamba.metrics against independent references (hand formulas, SpeechBrain, mir_eval)."""

import math
import warnings

import numpy as np
import pytest
import torch
from pesq import pesq
from scipy.signal import resample_poly
from speechbrain.nnet.losses import cal_si_snr

from umamba.metrics import (
    best_permutation,
    evaluate_utterance,
    pesq_score,
    sdr_sir_sar,
    si_snr,
    stoi_score,
)


def speech_like(seconds: float, sample_rate: int, f0: float, seed: int) -> torch.Tensor:
    """Voiced-speech stand-in: a gliding harmonic tone in syllable-rate bursts, with pauses.

    PESQ and STOI need energy bursts and silences like speech: white noise would not do.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    envelope = np.clip(np.sin(2 * np.pi * 3 * t + seed), 0, None) ** 2
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    n_harmonics = int(sample_rate / 2 / (1.1 * f0))
    voiced = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, n_harmonics))
    return torch.from_numpy(envelope * voiced + 1e-3 * rng.standard_normal(t.size))


def numpy_si_snr(est: np.ndarray, ref: np.ndarray) -> float:
    """Textbook SI-SNR of two 1-D signals (no epsilon)."""
    est, ref = est - est.mean(), ref - ref.mean()
    target = np.dot(est, ref) / np.dot(ref, ref) * ref
    return 10 * np.log10(np.sum(target**2) / np.sum((est - target) ** 2))


def test_si_snr_hand_computed():
    ref = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    noise = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)  # orthogonal, zero-mean
    # target energy 4, noise energy 0.25 * 4 = 1: 10 log10(4)
    assert si_snr(ref + 0.5 * noise, ref).item() == pytest.approx(10 * math.log10(4), abs=1e-6)


def test_si_snr_batched_matches_numpy_and_speechbrain():
    ref = torch.randn(3, 2, 1000, dtype=torch.float64)
    est = 0.5 * ref + 0.3 * torch.randn(3, 2, 1000, dtype=torch.float64) + 0.2
    values = si_snr(est, ref)
    assert values.shape == (3, 2)
    expected = [[numpy_si_snr(est[b, c].numpy(), ref[b, c].numpy()) for c in range(2)] for b in range(3)]
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-6)
    # SpeechBrain's training-loss formula, layout [T, B, C], returns -SI-SNR
    speechbrain_values = -cal_si_snr(ref.permute(2, 0, 1), est.permute(2, 0, 1).clone())
    np.testing.assert_allclose(values.numpy(), speechbrain_values[0].numpy(), atol=1e-4)


def test_si_snr_scale_and_offset_invariant():
    ref = torch.randn(2, 800, dtype=torch.float64)
    est = ref + 0.5 * torch.randn(2, 800, dtype=torch.float64)
    reference_value = si_snr(est, ref)
    for gain, offset in ((0.01, 0.0), (7.0, 3.0), (-2.0, -1.0)):
        torch.testing.assert_close(si_snr(gain * est + offset, ref), reference_value, atol=1e-4, rtol=0)
        torch.testing.assert_close(si_snr(est, gain * ref + offset), reference_value, atol=1e-4, rtol=0)


def test_si_snr_rejects_different_lengths():
    with pytest.raises(ValueError, match="same length"):
        si_snr(torch.zeros(10), torch.zeros(11))


@pytest.mark.parametrize("order", [(1, 0), (2, 0, 1), (1, 2, 0)])
def test_best_permutation_finds_the_shuffled_order(order):
    ref = torch.randn(len(order), 2000)
    shuffled = torch.empty_like(ref)
    shuffled[list(order)] = ref + 0.3 * torch.randn_like(ref)  # ref[i] lies in shuffled[order[i]]
    perm = best_permutation(shuffled, ref)
    assert perm == order
    assert torch.allclose(shuffled[list(perm)], ref, atol=2.0)  # aligned up to the noise
    assert (si_snr(shuffled[list(perm)], ref) > 5).all()


def test_sdr_sir_sar_agree_with_mir_eval():
    mir_eval_separation = pytest.importorskip("mir_eval.separation")
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        ref = torch.randn(2, 4000, generator=generator, dtype=torch.float64)
        # leakage of the other source, a short echo (inside the 512-tap filter) and noise
        est = ref + 0.3 * ref.flip(0) + 0.5 * torch.roll(ref, 40, dims=1)
        est = est + 0.2 * torch.randn(2, 4000, generator=generator, dtype=torch.float64)
        sdr, sir, sar = sdr_sir_sar(est, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mir_eval's deprecation notices
            expected = mir_eval_separation.bss_eval_sources(
                ref.numpy(), est.numpy(), compute_permutation=False
            )
        for ours, theirs in zip((sdr, sir, sar), expected[:3]):
            np.testing.assert_allclose(ours.numpy(), theirs, atol=0.05)


def test_pesq_silent_reference_is_nan():
    assert math.isnan(pesq_score(speech_like(1, 8000, 120, 0), torch.zeros(8000), 8000))
    assert math.isnan(pesq_score(torch.zeros(16000), torch.zeros(16000), 16000))


def test_pesq_too_short_is_nan():
    signal = speech_like(0.1, 8000, 120, 0)
    assert math.isnan(pesq_score(signal, signal, 8000))


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050])  # nb, wb, resampled to wb
def test_pesq_clean_is_high_and_noise_lowers_it(sample_rate):
    clean = speech_like(2, sample_rate, 120, 0)
    assert pesq_score(clean, clean, sample_rate) > 4
    noisy = clean + 0.3 * clean.std() * torch.randn_like(clean)
    assert pesq_score(noisy, clean, sample_rate) < 3


@pytest.mark.parametrize("sample_rate", [8000, 16000, 11025])
def test_pesq_mode_follows_the_sample_rate(sample_rate):
    clean = speech_like(2, sample_rate, 120, 0)
    noisy = clean + 0.3 * clean.std() * torch.randn_like(clean)
    ref_np, est_np = clean.numpy(), noisy.numpy()
    if sample_rate == 8000:
        expected = pesq(8000, ref_np, est_np, "nb")
    elif sample_rate == 16000:
        expected = pesq(16000, ref_np, est_np, "wb")
    else:  # 16000 / 11025 = 640 / 441
        expected = pesq(16000, resample_poly(ref_np, 640, 441), resample_poly(est_np, 640, 441), "wb")
    assert pesq_score(noisy, clean, sample_rate) == pytest.approx(expected)


def test_stoi_in_unit_range_and_higher_for_cleaner_estimate():
    clean = speech_like(2, 8000, 120, 0)
    noise = clean.std() * torch.randn_like(clean)
    slightly_noisy = stoi_score(clean + 0.1 * noise, clean, 8000)
    very_noisy = stoi_score(clean + 3.0 * noise, clean, 8000)
    assert 0 <= very_noisy < slightly_noisy <= 1
    assert stoi_score(clean, clean, 8000) == pytest.approx(1.0, abs=1e-6)


def test_stoi_too_short_is_nan():
    signal = speech_like(0.2, 8000, 120, 0)
    assert math.isnan(stoi_score(signal, signal, 8000))


def make_utterance(sample_rate: int = 8000, seconds: float = 2.0):
    """Two speech-like sources, their noisy mixture and swapped estimates with small leakage."""
    ref = torch.stack(
        [speech_like(seconds, sample_rate, 120, 1), speech_like(seconds, sample_rate, 210, 2)], dim=1
    )
    mix = ref.sum(dim=1) + 0.05 * torch.randn(ref.shape[0], dtype=torch.float64)
    est = ref.flip(1) + 0.1 * ref + 0.02 * torch.randn_like(ref)
    return mix, est, ref


def test_evaluate_utterance_values_and_improvements():
    mix, est, ref = make_utterance()
    metrics = evaluate_utterance(mix, est, ref, 8000)
    assert list(metrics) == [
        "si_snr", "si_snri", "sdr", "sdri", "sir", "sar",
        "pesq", "pesq_mix", "stoi", "stoi_mix", "permutation",
    ]  # fmt: skip
    assert metrics["permutation"] == (1, 0)
    aligned = est.flip(1)
    expected_si_snr = np.mean([numpy_si_snr(aligned[:, k].numpy(), ref[:, k].numpy()) for k in range(2)])
    mix_si_snr = np.mean([numpy_si_snr(mix.numpy(), ref[:, k].numpy()) for k in range(2)])
    assert metrics["si_snr"] == pytest.approx(expected_si_snr, abs=1e-6)
    assert metrics["si_snri"] == pytest.approx(expected_si_snr - mix_si_snr, abs=1e-6)
    sdr_mix = sdr_sir_sar(mix.expand(2, -1), ref.T)[0].mean().item()
    assert metrics["sdri"] == pytest.approx(metrics["sdr"] - sdr_mix, abs=1e-6)
    assert metrics["si_snri"] > 10 and metrics["sdri"] > 10
    assert metrics["pesq"] > metrics["pesq_mix"] and metrics["stoi"] > metrics["stoi_mix"]
    assert all(isinstance(value, float) for key, value in metrics.items() if key != "permutation")


def test_evaluate_utterance_optional_scores_and_silent_source():
    mix, est, ref = make_utterance()
    metrics = evaluate_utterance(mix, est, ref, 8000, compute_pesq=False, compute_stoi=False)
    assert "pesq" not in metrics and "stoi_mix" not in metrics
    ref[:, 1] = 0.0  # every metric is undefined for that source: NaN, no exception
    metrics = evaluate_utterance(mix, est, ref, 8000, compute_stoi=False)
    for name in ("pesq", "pesq_mix", "sdr", "sdri", "sir", "sar", "si_snr", "si_snri"):
        assert math.isnan(metrics[name]), name


@pytest.mark.parametrize("name", ["mix", "est", "ref"])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_evaluate_utterance_rejects_non_finite(name, bad_value):
    signals = dict(zip(("mix", "est", "ref"), make_utterance(seconds=0.5)))
    signals[name] = signals[name].clone()
    signals[name].view(-1)[7] = bad_value
    with pytest.raises(ValueError, match=f"{name} holds 1 NaN or infinite"):
        evaluate_utterance(**signals, sample_rate=8000)


def test_evaluate_utterance_rejects_bad_shapes():
    mix, est, ref = make_utterance(seconds=0.5)
    with pytest.raises(ValueError, match=r"mix \[T\], est \[T, n_src\]"):
        evaluate_utterance(mix, est.T, ref, 8000)
    with pytest.raises(ValueError, match=r"same T"):
        evaluate_utterance(mix[:-1], est, ref, 8000)
