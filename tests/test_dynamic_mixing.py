"""Dynamic mixing: speech/noise lists, distinct talkers, LibriMix levels, determinism per
(seed, epoch, index), disjoint DDP ranks, and a batch through SeparationAugment."""

import os

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch
from speechbrain.dataio.batch import PaddedBatch
from torch.utils.data import DataLoader, DistributedSampler

from umamba.augment import SeparationAugment
from umamba.data.audio import AudioError
from umamba.data.demo_corpus import make_demo_corpus
from umamba.data.dynamic_mixing import (
    DynamicMixingDataset,
    Utterance,
    audio_files,
    librimix_noises,
    librimix_utterances,
    librispeech_utterances,
)
from umamba.data.librimix import find_root, prepare_librimix

SR = 8000
SPEAKERS = ("103", "1034", "1040", "1069")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A LibriSpeech-like folder (4 talkers x 2 flac utterances) and WHAM!-like noise (mono + stereo)."""
    root = tmp_path_factory.mktemp("dm")
    rng = np.random.default_rng(0)
    for s, speaker in enumerate(SPEAKERS):
        for index in range(2):
            n = int(rng.uniform(0.6, 1.6) * SR)
            # a talker-specific colour and a syllabic envelope, so that items differ clearly
            speech = np.convolve(rng.standard_normal(n), np.ones(s + 1) / (s + 1), "same")
            speech *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(n) / SR) ** 2
            path = root / "LibriSpeech" / "train-clean-100" / speaker / "200" / f"{speaker}-200-{index:04d}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, 0.1 * speech, SR)
    noise_dir = root / "wham_noise" / "tr"
    noise_dir.mkdir(parents=True)
    sf.write(noise_dir / "long.wav", 0.05 * rng.standard_normal(2 * SR), SR)
    sf.write(noise_dir / "stereo.wav", 0.05 * rng.standard_normal((int(0.7 * SR), 2)), SR)
    return root


def speech(corpus):
    return librispeech_utterances(corpus / "LibriSpeech", ["train-clean-100"])


def loudness(signal):
    return pyloudnorm.Meter(SR).integrated_loudness(signal.numpy().astype(np.float64))


def test_librispeech_listing(corpus):
    utterances = speech(corpus)
    assert len(utterances) == 8
    assert sorted({u.speaker for u in utterances}) == sorted(SPEAKERS)
    assert all(os.path.basename(u.path) == f"{u.utterance_id}.flac" and u.utterance_id.startswith(u.speaker + "-")
               for u in utterances)
    with pytest.raises(FileNotFoundError, match="train-other-500"):
        librispeech_utterances(corpus / "LibriSpeech", ["train-other-500"])
    assert [os.path.basename(p) for p in audio_files(corpus / "wham_noise")] == ["long.wav", "stereo.wav"]


def test_librimix_csv_listing(tmp_path):
    make_demo_corpus(tmp_path, n_train=3, n_valid=1, n_test=1, seconds=0.6, voices="synthetic")
    csvs = prepare_librimix(tmp_path, tmp_path / "save", splits=["train-360"], sample_rate=SR)
    data_root = find_root(str(tmp_path), 2, SR, "min")
    utterances = librimix_utterances(csvs["train-360"], data_root, 2)
    assert len(utterances) == 6
    for s1, s2 in zip(utterances[::2], utterances[1::2]):
        assert s1.speaker != s2.speaker  # the demo corpus mixes two talkers
        assert "/s1/" in s1.path and "/s2/" in s2.path and os.path.isfile(s1.path)
        assert os.path.basename(s1.path) == f"{s1.utterance_id}_{s2.utterance_id}.wav"
    noises = librimix_noises(csvs["train-360"], data_root)
    assert len(noises) == 3 and all(os.path.isfile(p) for p in noises)
    dataset = DynamicMixingDataset(utterances, noises, SR, segment_seconds=0.5, mixtures_per_epoch=2)
    assert dataset[0]["noise_sig"].shape == (SR // 2,)


@pytest.mark.parametrize("num_spks", [2, 3])
def test_distinct_talkers_segment_and_peak(corpus, num_spks):
    dataset = DynamicMixingDataset(speech(corpus), audio_files(corpus / "wham_noise"), SR, num_spks=num_spks,
                                   segment_seconds=1.0, mixtures_per_epoch=12, seed=3)
    for index in range(len(dataset)):
        item = dataset[index]
        speakers = [u.split("-")[0] for u in item["id"].split("_")]
        assert len(set(speakers)) == num_spks
        sources = [item[f"s{k + 1}_sig"] for k in range(num_spks)]
        assert all(s.shape == (SR,) and s.dtype == torch.float32 for s in sources)
        torch.testing.assert_close(item["mix_sig"], sum(sources) + item["noise_sig"])
        assert item["mix_sig"].abs().max() <= 0.9 + 1e-6


def check_levels(dataset, index):
    """Measured minus drawn loudness: the same offset for every signal; returns it and the peak."""
    plan, item = dataset.plan(index), dataset[index]
    offsets = [loudness(item[f"s{k + 1}_sig"]) - plan.speech_lufs[k] for k in range(2)]
    offsets.append(loudness(item["noise_sig"]) - plan.noise_lufs)
    assert max(offsets) - min(offsets) < 0.05
    return np.mean(offsets), item["mix_sig"].abs().max().item()


def test_librimix_loudness_rules(corpus):
    dataset = DynamicMixingDataset(speech(corpus), audio_files(corpus / "wham_noise"), SR,
                                   segment_seconds=1.0, mixtures_per_epoch=6)
    for index in range(6):
        offset, peak = check_levels(dataset, index)
        assert abs(offset) < 0.05 and peak < 0.9  # no peak rescaling at these levels
    loud = DynamicMixingDataset(speech(corpus), audio_files(corpus / "wham_noise"), SR, segment_seconds=1.0,
                                mixtures_per_epoch=3, speech_lufs=(-4.0, -2.0), noise_lufs=(-6.0, -4.0))
    for index in range(3):
        offset, peak = check_levels(loud, index)  # levels kept relative to each other ...
        assert offset < -1.0 and peak == pytest.approx(0.9, abs=1e-5)  # ... all scaled down to a 0.9 peak


def test_short_segments_fall_back_to_rms(corpus):
    dataset = DynamicMixingDataset(speech(corpus), None, SR, segment_seconds=0.3, mixtures_per_epoch=3)
    for index in range(3):
        plan, item = dataset.plan(index), dataset[index]
        assert "noise_sig" not in item
        for k in range(2):
            rms_db = 20 * np.log10(item[f"s{k + 1}_sig"].pow(2).mean().sqrt().item())
            assert rms_db == pytest.approx(plan.speech_lufs[k], abs=0.05)


def test_stereo_noise_gives_its_first_channel(corpus):
    path = str(corpus / "wham_noise" / "tr" / "stereo.wav")
    dataset = DynamicMixingDataset(speech(corpus), [path], SR, segment_seconds=1.0, mixtures_per_epoch=1)
    noise = dataset[0]["noise_sig"].numpy()
    expected = np.resize(sf.read(path)[0][:, 0], SR)  # 0.7 s repeated to fill 1 s
    assert np.corrcoef(noise, expected)[0, 1] > 0.9999


def test_items_depend_only_on_seed_epoch_index(corpus):
    def item(seed, epoch, index):
        dataset = DynamicMixingDataset(speech(corpus), audio_files(corpus / "wham_noise"), SR,
                                       segment_seconds=1.0, mixtures_per_epoch=8, seed=seed)
        dataset.set_epoch(epoch)
        return dataset[index]

    first = item(0, 1, 5)
    again = item(0, 1, 5)
    assert first["id"] == again["id"]
    assert all(torch.equal(first[key], again[key]) for key in ("mix_sig", "s1_sig", "s2_sig", "noise_sig"))
    for other in (item(0, 2, 5), item(1, 1, 5), item(0, 1, 4)):
        assert not torch.equal(first["mix_sig"], other["mix_sig"])


def test_distributed_ranks_see_disjoint_mixtures(corpus):
    dataset = DynamicMixingDataset(speech(corpus), None, SR, segment_seconds=0.5, mixtures_per_epoch=10)
    dataset.set_epoch(1)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        seen.append(list(sampler))
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(10))
    assert not torch.equal(dataset[seen[0][0]]["mix_sig"], dataset[seen[1][0]]["mix_sig"])


def test_batches_feed_the_augmentation(corpus):
    dataset = DynamicMixingDataset(speech(corpus), audio_files(corpus / "wham_noise"), SR,
                                   segment_seconds=0.5, mixtures_per_epoch=4)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=PaddedBatch)))
    targets = torch.stack([batch.s1_sig.data, batch.s2_sig.data], dim=-1)
    mix, new_targets = SeparationAugment(SR, speeds=[95, 105], noise_gain_db=3.0)(batch.mix_sig.data, targets, batch)
    added = mix - new_targets.sum(-1)
    noise = batch.noise_sig.data[:, : mix.shape[1]]
    gains = (added * noise).sum(1, keepdim=True) / noise.pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(added, gains * noise, atol=1e-6, rtol=1e-5)


def test_missing_speech_file_is_named(corpus, tmp_path):
    utterances = speech(corpus)
    utterances[0] = utterances[0]._replace(path=str(tmp_path / "gone.flac"))
    dataset = DynamicMixingDataset(utterances[:1] + utterances[2:3], None, SR, segment_seconds=0.5,
                                   mixtures_per_epoch=1)
    with pytest.raises(AudioError, match="gone.flac"):
        dataset[0]
    with pytest.raises(ValueError, match="at least 2 distinct speakers"):
        DynamicMixingDataset(utterances[:2], None, SR)



def test_other_rates_are_resampled_only_on_request(tmp_path):
    utterances = []
    for speaker, frequency in (("19", 500.0), ("26", 700.0)):
        path = tmp_path / f"{speaker}-1-0000.flac"
        sf.write(path, 0.1 * np.sin(2 * np.pi * frequency * np.arange(16000) / 16000), 16000)
        utterances.append(Utterance(f"{speaker}-1-0000", speaker, str(path)))
    dataset = DynamicMixingDataset(utterances, None, SR, resample=True, segment_seconds=0.5, mixtures_per_epoch=1)
    item = dataset[0]
    for k in range(2):
        source = item[f"s{k + 1}_sig"].numpy()
        assert source.shape == (SR // 2,)
        peak = np.argmax(np.abs(np.fft.rfft(source * np.hanning(source.size)))) * SR / source.size
        speaker = item["id"].split("_")[k].split("-")[0]
        assert peak == pytest.approx(500.0 if speaker == "19" else 700.0, abs=2.0)
    strict = DynamicMixingDataset(utterances, None, SR, segment_seconds=0.5, mixtures_per_epoch=1)
    with pytest.raises(AudioError, match=r"-1-0000\.flac.*expected 8000 Hz but found 16000 Hz"):
        strict[0]
