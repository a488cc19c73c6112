"""SeparationAugment: identity when off, per-source reverberation checked against numpy,
speed perturbation, noise added back from the batch or by AddNoise."""

import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.dataio.batch import PaddedBatch

from umamba.augment import SeparationAugment
from umamba.data.audio import AudioError

SR = 8000
DIRECT = 2  # direct-path index of the test RIRs


def write_rir_csv(folder, rooms, name="rirs.csv"):
    """Writes each [time, channels] RIR as a multichannel wav and a SpeechBrain CSV of them."""
    lines = ["ID,duration,wav,wav_format,wav_opts"]
    for i, rir in enumerate(rooms):
        path = folder / f"room{i}.wav"
        sf.write(path, rir, SR, subtype="FLOAT")
        lines.append(f"room{i},{len(rir) / SR},$rir_root/room{i}.wav,wav,")
    csv_path = folder / name
    csv_path.write_text("\n".join(lines) + "\n")
    return str(csv_path)


def decaying_rir(seed, length=7):
    """Two channels (< 1 ms at 8 kHz): small pre-echo, unit direct path at DIRECT, random decaying tail."""
    rng = np.random.default_rng(seed)
    rir = np.zeros((length, 2), dtype=np.float32)
    rir[:DIRECT] = rng.uniform(-0.1, 0.1, (DIRECT, 2))
    rir[DIRECT] = 1.0
    tail = np.arange(1, length - DIRECT)[:, None]
    rir[DIRECT + 1 :] = rng.uniform(-0.6, 0.6, (length - DIRECT - 1, 2)) * np.exp(-tail / 2.0)
    return rir


def reference_reverb(dry, h):
    """Linear convolution with the direct path kept in place, rescaled to the dry mean |x|."""
    wet = np.convolve(dry, h)[DIRECT : DIRECT + dry.size]
    return wet * np.abs(dry).mean() / np.abs(wet).mean()


def make_batch(targets, noise=None, mix=None):
    """A real PaddedBatch as the Brain gets it, with mix = sum of sources (+ noise)."""
    if mix is None:
        mix = targets.sum(-1) + (0 if noise is None else noise)
    examples = []
    for b in range(targets.shape[0]):
        example = {"id": f"utt{b}", "mix_sig": mix[b]}
        for k in range(targets.shape[-1]):
            example[f"s{k + 1}_sig"] = targets[b, :, k]
        if noise is not None:
            example["noise_sig"] = noise[b]
        examples.append(example)
    batch = PaddedBatch(examples)
    return batch.mix_sig.data, targets, batch


def test_all_options_off_is_identity():
    targets = torch.randn(3, 400, 2)
    mix, targets, batch = make_batch(targets, noise=0.1 * torch.randn(3, 400))
    new_mix, new_targets = SeparationAugment(SR)(mix, targets, batch)
    assert new_mix is mix and new_targets is targets


def test_reverb_is_per_channel_linear_convolution_with_direct_path_in_place(tmp_path):
    rir = decaying_rir(0)
    csv_path = write_rir_csv(tmp_path, [rir])
    targets = torch.randn(3, 300, 2)
    targets[0, -3:, 0] = 5.0  # a loud end: a circular convolution would spill it onto the start
    mix, _, batch = make_batch(targets)
    augment = SeparationAugment(SR, rir_csv=csv_path, rir_replacements={"rir_root": str(tmp_path)},
                                reverberant_targets=True)
    new_mix, wet = augment(mix, targets, batch)
    assert wet.shape == targets.shape
    for b in range(3):
        for k in range(2):
            expected = reference_reverb(targets[b, :, k].numpy().astype(np.float64), rir[:, k])
            np.testing.assert_allclose(wet[b, :, k].numpy(), expected, atol=1e-4)
            # source k went through channel k, not through the other channel
            other = reference_reverb(targets[b, :, k].numpy().astype(np.float64), rir[:, 1 - k])
            assert np.abs(wet[b, :, k].numpy() - other).max() > 0.05
    torch.testing.assert_close(new_mix, wet.sum(-1))


def test_targets_stay_dry_unless_reverberant_targets(tmp_path):
    rir = decaying_rir(1)
    csv_path = write_rir_csv(tmp_path, [rir])
    targets = torch.randn(2, 300, 2)
    mix, _, batch = make_batch(targets)
    augment = SeparationAugment(SR, rir_csv=csv_path, rir_replacements={"rir_root": str(tmp_path)})
    new_mix, new_targets = augment(mix, targets, batch)
    assert torch.equal(new_targets, targets)
    expected = sum(reference_reverb(targets[0, :, k].numpy().astype(np.float64), rir[:, k]) for k in range(2))
    np.testing.assert_allclose(new_mix[0].numpy(), expected, atol=1e-4)
    assert (new_mix - mix).abs().max() > 0.1


def test_pure_direct_path_leaves_the_sources_unchanged(tmp_path):
    rir = np.zeros((8, 2), dtype=np.float32)
    rir[5] = [1.0, 0.5]  # direct path only, late in the file: the output must not be delayed
    csv_path = write_rir_csv(tmp_path, [rir])
    targets = torch.randn(2, 200, 2)
    mix, _, batch = make_batch(targets)
    augment = SeparationAugment(SR, rir_csv=csv_path, rir_replacements={"rir_root": str(tmp_path)},
                                reverberant_targets=True)
    new_mix, wet = augment(mix, targets, batch)
    torch.testing.assert_close(wet, targets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_mix, mix, atol=1e-5, rtol=1e-5)


def test_one_room_per_mixture(tmp_path):
    rooms = [decaying_rir(2), decaying_rir(3)]
    csv_path = write_rir_csv(tmp_path, rooms)
    targets = torch.randn(12, 200, 2)
    mix, _, batch = make_batch(targets)
    augment = SeparationAugment(SR, rir_csv=csv_path, rir_replacements={"rir_root": str(tmp_path)},
                                reverberant_targets=True)
    _, wet = augment(mix, targets, batch)
    used = []
    for b in range(12):
        matches = []
        for r, rir in enumerate(rooms):
            expected = [reference_reverb(targets[b, :, k].numpy().astype(np.float64), rir[:, k]) for k in range(2)]
            if all(np.abs(wet[b, :, k].numpy() - expected[k]).max() < 1e-4 for k in range(2)):
                matches.append(r)
        assert len(matches) == 1  # both sources of a mixture are in the same, single room
        used.append(matches[0])
    assert set(used) == {0, 1}  # rooms differ across the batch


def test_direct_path_targets_are_aligned_with_the_reverberant_sources(tmp_path):
    taps = np.arange(7) - DIRECT - 0.3  # a direct sound 0.3 sample after DIRECT: a truncated sinc
    direct = np.sinc(taps)[:, None] * np.array([[1.0, 0.8]])
    tail = np.zeros_like(direct)
    tail[DIRECT + 1 :] = 0.3 * decaying_rir(5)[DIRECT + 1 :]
    for i, rir in enumerate([direct, direct + tail]):
        csv_path = write_rir_csv(tmp_path, [rir.astype(np.float32)], name=f"rirs{i}.csv")
        sf.write(tmp_path / "room0_direct.wav", direct.astype(np.float32), SR, subtype="FLOAT")
        targets = torch.randn(2, 300, 2)
        mix, _, batch = make_batch(targets)
        augment = SeparationAugment(SR, rir_csv=csv_path, rir_replacements={"rir_root": str(tmp_path)},
                                    direct_path_targets=True)
        new_mix, new_targets = augment(mix, targets, batch)
        for b in range(2):
            for k in range(2):
                dry = targets[b, :, k].numpy().astype(np.float64)
                np.testing.assert_allclose(new_targets[b, :, k].numpy(), reference_reverb(dry, direct[:, k]),
                                           atol=1e-4)
        expected = sum(reference_reverb(targets[0, :, k].numpy().astype(np.float64), rir[:, k]) for k in range(2))
        np.testing.assert_allclose(new_mix[0].numpy(), expected, atol=1e-4)
        if i == 0:  # a room without reflections: the mixture is exactly the sum of the targets ...
            torch.testing.assert_close(new_mix, new_targets.sum(-1), atol=1e-5, rtol=1e-5)
            assert (new_targets - targets).abs().max() > 0.1  # ... which are not the dry sources
    (tmp_path / "room0_direct.wav").unlink()
    with pytest.raises(AudioError, match="room0_direct.wav"):
        SeparationAugment(SR, rir_csv=csv_path, rir_replacements={"rir_root": str(tmp_path)},
                          direct_path_targets=True)
    with pytest.raises(ValueError, match="not both"):
        SeparationAugment(SR, rir_csv=csv_path, reverberant_targets=True, direct_path_targets=True)


def peak_frequency(signal):
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(signal.size)))
    return np.argmax(spectrum) * SR / signal.size


@pytest.mark.parametrize("independent", [True, False])
def test_speed_perturbation_mixture_is_sum_of_targets_plus_noise(independent):
    time = torch.arange(SR) / SR
    targets = torch.stack([torch.sin(2 * np.pi * 400 * time + phase) for phase in (0.0, 1.0)], dim=-1)
    targets = targets.repeat(6, 1, 1)
    noise = 0.1 * torch.randn(6, SR)
    mix, targets, batch = make_batch(targets, noise=noise)
    augment = SeparationAugment(SR, speeds=[95, 105], independent_speeds=independent)
    new_mix, new_targets = augment(mix, targets, batch)
    length = new_mix.shape[1]
    assert new_targets.shape == (6, length, 2) and length < SR
    torch.testing.assert_close(new_mix, new_targets.sum(-1) + noise[:, :length])
    # 400 Hz played 5 % slower or faster: 380 or 420 Hz
    ratios = np.array([[peak_frequency(new_targets[b, :, k].numpy()) / 400 for k in range(2)] for b in range(6)])
    assert set(np.unique(ratios.round(2))) == {0.95, 1.05}
    same_speed = np.isclose(ratios[:, 0], ratios[:, 1])
    assert same_speed.all() if not independent else not same_speed.all()


def test_noise_from_the_batch_is_added_back_with_gain_jitter():
    targets = torch.randn(8, 400, 2)
    noise = torch.randn(8, 400)
    mix, targets, batch = make_batch(targets, noise=noise)
    new_mix, new_targets = SeparationAugment(SR, noise_gain_db=6.0)(mix, targets, batch)
    assert torch.equal(new_targets, targets)
    added = new_mix - targets.sum(-1)
    gains = (added * noise).sum(1, keepdim=True) / noise.pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(added, gains * noise, atol=1e-5, rtol=1e-5)  # one gain per mixture
    gains_db = 20 * torch.log10(gains[:, 0])
    assert (gains_db.abs() <= 6.0 + 1e-4).all() and gains_db.std() > 0.5


def test_add_noise_from_csv_when_the_batch_has_none(tmp_path):
    noise_file = np.random.default_rng(0).standard_normal(600).astype(np.float32)
    sf.write(tmp_path / "noise.wav", noise_file, SR, subtype="FLOAT")
    csv_path = tmp_path / "noise.csv"
    csv_path.write_text("ID,duration,wav,wav_format,wav_opts\nn0,0.075,$noise_root/noise.wav,wav,\n")
    targets = torch.randn(3, 400, 2)
    mix, targets, batch = make_batch(targets)
    augment = SeparationAugment(SR, noise_csv=str(csv_path), noise_replacements={"noise_root": str(tmp_path)},
                                snr_low=5.0, snr_high=5.0)
    new_mix, new_targets = augment(mix, targets, batch)
    assert torch.equal(new_targets, targets)
    speech_scale = 1 - 1 / (10 ** (5.0 / 20) + 1)  # AddNoise keeps the sum at the clean level
    speech = speech_scale * mix
    added = (new_mix - speech).numpy()
    for b in range(3):
        snr = 20 * np.log10(speech[b].pow(2).mean().sqrt().item() / np.sqrt(np.mean(added[b] ** 2)))
        assert snr == pytest.approx(5.0, abs=0.05)
        # the added noise is a scaled window of the noise file
        windows = np.lib.stride_tricks.sliding_window_view(noise_file, 400)
        correlation = windows @ added[b] / (np.linalg.norm(windows, axis=1) * np.linalg.norm(added[b]))
        assert correlation.max() > 0.999


def test_changing_sources_of_a_noisy_mixture_without_its_noise_is_an_error():
    targets = torch.randn(2, 400, 2)
    mix, targets, batch = make_batch(targets, mix=targets.sum(-1) + 0.5 * torch.randn(2, 400))
    with pytest.raises(ValueError, match=r"utt0.*noise_sig"):
        SeparationAugment(SR, speeds=[95])(mix, targets, batch)


def test_bad_rir_bank_names_the_file(tmp_path):
    mono = tmp_path / "mono.wav"
    sf.write(mono, np.ones(8, dtype=np.float32), SR)
    csv_path = tmp_path / "rirs.csv"
    csv_path.write_text(f"ID,duration,wav,wav_format,wav_opts\nr0,0.001,{mono},wav,\n")
    with pytest.raises(AudioError, match=r"mono\.wav.*1 channel.*at least 2"):
        SeparationAugment(SR, rir_csv=str(csv_path))
    csv_path.write_text(f"ID,duration,wav,wav_format,wav_opts\nr0,0.001,{tmp_path}/missing.wav,wav,\n")
    with pytest.raises(AudioError, match="missing.wav"):
        SeparationAugment(SR, rir_csv=str(csv_path))
    with pytest.raises(ValueError, match="rir_csv"):
        SeparationAugment(SR, reverberant_targets=True)
