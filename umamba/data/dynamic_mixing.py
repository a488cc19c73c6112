"""Dynamic mixing: new two- (or three-) talker noisy mixtures drawn on the fly every epoch.

Speech comes from LibriSpeech (:func:`librispeech_utterances`) or from the sources of a
prepared Libri2Mix CSV (:func:`librimix_utterances`), noise from WHAM!-style files
(:func:`audio_files`, :func:`librimix_noises`). :class:`DynamicMixingDataset` follows the
LibriMix level rules: every source at U[-33, -25] LUFS, the noise at U[-38, -30] LUFS, all
scaled down together when the mixture peaks above 0.9. Reverberation is not done here but by
:class:`umamba.augment.SeparationAugment` on the batch, so the two are never applied twice.

The mixtures depend only on (seed, epoch, index): with a ``DistributedSampler`` every rank
builds different mixtures, and a resumed run builds the same ones again. Give the dataset to
``Brain.fit`` as it is (with ``collate_fn=PaddedBatch``): SpeechBrain then adds the
``DistributedSampler`` itself under DDP.

Authors
 * U-Mamba-Net contributors 2025
"""

import glob
import math
import os
from collections import defaultdict
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyloudnorm
import torch
from scipy.signal import resample_poly

from umamba.data.audio import PathLike, audio_info, read_audio, read_channels
from umamba.data.datasets import load_csv, source_keys
from umamba.data.demo_corpus import set_loudness

SPEECH_LUFS = (-33.0, -25.0)
NOISE_LUFS = (-38.0, -30.0)
MAX_PEAK = 0.9


class Utterance(NamedTuple):
    """One speech file and its talker."""

    utterance_id: str
    speaker: str
    path: str


class MixturePlan(NamedTuple):
    """Every random choice behind one mixture, drawn before any file is read.

    ``speech_offsets`` and ``noise_offset`` are fractions in [0, 1) of the free room: the
    crop start in a longer file, or where a shorter utterance sits in the zero-padded segment.
    """

    utterances: List[Utterance]
    speech_offsets: List[float]
    speech_lufs: List[float]
    noise: Optional[str]
    noise_offset: float
    noise_lufs: float


def librispeech_utterances(root: PathLike, splits: Sequence[str]) -> List[Utterance]:
    """The utterances of LibriSpeech splits: ``<root>/<split>/<spk>/<chapter>/<spk>-<chapter>-<idx>.flac``.

    Arguments
    ---------
    root : str or os.PathLike
        The LibriSpeech folder.
    splits : sequence of str
        Its split folders, e.g. ``["train-clean-100", "train-clean-360"]``.

    Returns
    -------
    list of Utterance
        Sorted by path; the speaker is the first field of the file name.

    Raises
    ------
    FileNotFoundError
        If a split folder is missing or holds no utterance.

    Example
    -------
    >>> import tempfile
    >>> from umamba.data.audio import write_audio
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "dev-clean", "84", "121123", "84-121123-0000.flac")
    >>> os.makedirs(os.path.dirname(path))
    >>> write_audio(path, np.zeros(800), 8000, subtype="PCM_16")
    >>> [u[:2] for u in librispeech_utterances(tmp_dir.name, ["dev-clean"])]
    [('84-121123-0000', '84')]
    >>> tmp_dir.cleanup()
    """
    utterances = []
    for split in splits:
        folder = os.path.join(os.fspath(root), split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"LibriSpeech split folder '{folder}' does not exist")
        paths = sorted(glob.glob(os.path.join(folder, "*", "*", "*.flac")))
        if not paths:
            raise FileNotFoundError(
                f"No <speaker>/<chapter>/*.flac utterance in LibriSpeech split folder '{folder}'"
            )
        for path in paths:
            utterance_id = os.path.splitext(os.path.basename(path))[0]
            utterances.append(Utterance(utterance_id, utterance_id.split("-")[0], path))
    return utterances


def librimix_utterances(csv_path: PathLike, data_root: PathLike, num_spks: int) -> List[Utterance]:
    """The sources of a prepared LibriMix CSV as utterances with their talkers.

    A LibriMix mixture ID is ``<utt1>_<utt2>[_<utt3>]``; source k is utterance k, whose
    speaker is the part of its ID before the first '-'.

    Arguments
    ---------
    csv_path : str or os.PathLike
        CSV written by :func:`umamba.data.librimix.prepare_librimix`.
    data_root : str or os.PathLike
        Replaces ``$data_root`` in its paths.
    num_spks : int
        Sources per mixture (columns ``s1_wav`` .. ``sN_wav``).

    Returns
    -------
    list of Utterance
        One per source of every mixture, in CSV order.

    Raises
    ------
    ValueError
        If a column is missing or a mixture ID does not name ``num_spks`` utterances.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> csv_path = os.path.join(tmp_dir.name, "train.csv")
    >>> with open(csv_path, "w") as f:
    ...     _ = f.write("ID,duration,s1_wav,s2_wav\\n19-198-0001_26-495-0004,3.0,"
    ...                 "$data_root/s1/a.wav,$data_root/s2/a.wav\\n")
    >>> [u.speaker for u in librimix_utterances(csv_path, "/data", 2)]
    ['19', '26']
    >>> tmp_dir.cleanup()
    """
    csv_path = os.fspath(csv_path)
    keys = [f"{k}_wav" for k in source_keys(num_spks)]
    rows = load_csv(csv_path, {"data_root": os.fspath(data_root)}, columns=keys)
    utterances = []
    for mixture_id, row in rows.items():
        utterance_ids = mixture_id.split("_")
        if len(utterance_ids) != num_spks:
            raise ValueError(
                f"Mixture ID '{mixture_id}' in '{csv_path}' does not name {num_spks} utterances "
                "joined by '_' (expected <utt1>_<utt2>, each <speaker>-<chapter>-<index>)"
            )
        for utterance_id, key in zip(utterance_ids, keys):
            utterances.append(Utterance(utterance_id, utterance_id.split("-")[0], row[key]))
    return utterances


def librimix_noises(csv_path: PathLike, data_root: PathLike) -> List[str]:
    """The noise files of a prepared ``mix_both`` LibriMix CSV (column ``noise_wav``).

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> csv_path = os.path.join(tmp_dir.name, "train.csv")
    >>> with open(csv_path, "w") as f:
    ...     _ = f.write("ID,noise_wav\\na_b,$data_root/noise/a_b.wav\\n")
    >>> librimix_noises(csv_path, "/data")
    ['/data/noise/a_b.wav']
    >>> tmp_dir.cleanup()
    """
    rows = load_csv(csv_path, {"data_root": os.fspath(data_root)}, columns=["noise_wav"])
    return [row["noise_wav"] for row in rows.values()]


def audio_files(folder: PathLike) -> List[str]:
    """Every .wav and .flac file under ``folder`` (e.g. WHAM!'s ``tr`` noise folder), sorted.

    Example
    -------
    >>> import tempfile
    >>> from umamba.data.audio import write_audio
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> write_audio(os.path.join(tmp_dir.name, "n.wav"), np.zeros(80), 8000)
    >>> [os.path.basename(p) for p in audio_files(tmp_dir.name)]
    ['n.wav']
    >>> tmp_dir.cleanup()
    """
    folder = os.fspath(folder)
    paths = sorted(
        path
        for extension in ("wav", "flac")
        for path in glob.glob(os.path.join(folder, "**", f"*.{extension}"), recursive=True)
    )
    if not paths:
        raise FileNotFoundError(f"No .wav or .flac file under '{folder}'")
    return paths


class DynamicMixingDataset(torch.utils.data.Dataset):
    """Mixtures of distinct talkers (+ noise) drawn anew for every (seed, epoch, index).

    Item ``index`` picks ``num_spks`` distinct speakers (a speaker with more utterances is
    picked more often, so every utterance is about equally likely) and one utterance of each,
    cuts a random ``segment_seconds`` window (a shorter utterance sits at a random place in
    zeros), draws a noise file and a window of it (repeated when too short), sets the levels by
    the LibriMix rules with pyloudnorm (RMS for signals under pyloudnorm's 400 ms block or with
    no block above its gates) and scales everything down when the mixture peaks above 0.9.

    Arguments
    ---------
    speech : sequence of Utterance
        The speech pool, from :func:`librispeech_utterances` or :func:`librimix_utterances`.
    noises : sequence of str, optional
        Noise files (:func:`audio_files`, :func:`librimix_noises`); multichannel files (WHAM!)
        give their first channel, like LibriMix. None or empty: clean mixtures, no
        ``noise_sig``.
    sample_rate : int
        The rate of the mixtures.
    resample : bool
        False (default): every file must have ``sample_rate``. True: files at another rate
        (e.g. 16 kHz LibriSpeech for 8 kHz mixtures) are resampled with scipy's
        ``resample_poly`` when read.
    num_spks : int
        Talkers per mixture.
    segment_seconds : float
        Length of every mixture.
    mixtures_per_epoch : int
        The dataset length.
    seed : int
        Base of the random generator of every item.
    speech_lufs, noise_lufs : tuple of float
        Uniform ranges of the source and noise loudness (LUFS).
    max_peak : float
        Highest absolute sample of the mixture.

    Example
    -------
    >>> import tempfile
    >>> from umamba.data.audio import write_audio
    >>> from speechbrain.dataio.batch import PaddedBatch
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> speech = []
    >>> for speaker in ("19", "26", "32"):
    ...     path = os.path.join(tmp_dir.name, f"{speaker}.wav")
    ...     write_audio(path, np.random.default_rng(int(speaker)).standard_normal(8000) * 0.1, 8000)
    ...     speech.append(Utterance(f"{speaker}-1-0000", speaker, path))
    >>> dataset = DynamicMixingDataset(speech, None, 8000, segment_seconds=0.5, mixtures_per_epoch=4)
    >>> dataset.set_epoch(1)
    >>> batch = PaddedBatch([dataset[0], dataset[1]])
    >>> batch.mix_sig.data.shape, batch.s2_sig.data.shape
    (torch.Size([2, 4000]), torch.Size([2, 4000]))
    >>> tmp_dir.cleanup()
    """

    def __init__(
        self,
        speech: Sequence[Utterance],
        noises: Optional[Sequence[str]],
        sample_rate: int,
        resample: bool = False,
        num_spks: int = 2,
        segment_seconds: float = 4.0,
        mixtures_per_epoch: int = 50800,
        seed: int = 0,
        speech_lufs: Tuple[float, float] = SPEECH_LUFS,
        noise_lufs: Tuple[float, float] = NOISE_LUFS,
        max_peak: float = MAX_PEAK,
    ):
        super().__init__()
        by_speaker = defaultdict(list)
        for utterance in speech:
            by_speaker[utterance.speaker].append(utterance)
        if len(by_speaker) < num_spks:
            raise ValueError(
                f"Dynamic mixing needs at least {num_spks} distinct speakers, the speech list has "
                f"{len(by_speaker)} ({len(speech)} utterances)"
            )
        if segment_seconds <= 0 or mixtures_per_epoch < 1:
            raise ValueError("segment_seconds must be > 0 and mixtures_per_epoch >= 1")
        self.speakers = sorted(by_speaker)
        self.by_speaker = {speaker: by_speaker[speaker] for speaker in self.speakers}
        counts = np.array([len(self.by_speaker[s]) for s in self.speakers], dtype=float)
        self.speaker_weights = counts / counts.sum()
        self.noises = list(noises or [])
        self.sample_rate = sample_rate
        self.resample = resample
        self.num_spks = num_spks
        self.segment = int(round(segment_seconds * sample_rate))
        self.mixtures_per_epoch = mixtures_per_epoch
        self.seed = seed
        self.speech_lufs = speech_lufs
        self.noise_lufs = noise_lufs
        self.max_peak = max_peak
        self.meter = pyloudnorm.Meter(sample_rate)
        self.epoch = 0

    def __len__(self) -> int:
        return self.mixtures_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Selects the mixtures of ``epoch``; call it before iterating over every epoch."""
        self.epoch = epoch

    def plan(self, index: int) -> MixturePlan:
        """Every random choice of item ``index`` of the current epoch (no file is read).

        Example
        -------
        >>> speech = [Utterance("1-1-0", "1", "a.wav"), Utterance("2-1-0", "2", "b.wav")]
        >>> dataset = DynamicMixingDataset(speech, ["n.wav"], 8000, segment_seconds=1.0)
        >>> plan = dataset.plan(0)
        >>> sorted(u.speaker for u in plan.utterances), plan.noise
        (['1', '2'], 'n.wav')
        >>> plan == dataset.plan(0)
        True
        """
        rng = np.random.default_rng([self.seed, self.epoch, index])
        positions = rng.choice(len(self.speakers), self.num_spks, replace=False, p=self.speaker_weights)
        utterances = []
        for position in positions:
            pool = self.by_speaker[self.speakers[position]]
            utterances.append(pool[rng.integers(len(pool))])
        noise = self.noises[rng.integers(len(self.noises))] if self.noises else None
        return MixturePlan(
            utterances=utterances,
            speech_offsets=rng.random(self.num_spks).tolist(),
            speech_lufs=rng.uniform(*self.speech_lufs, self.num_spks).tolist(),
            noise=noise,
            noise_offset=float(rng.random()),
            noise_lufs=float(rng.uniform(*self.noise_lufs)),
        )

    def __getitem__(self, index: int) -> dict:
        """``id``, ``mix_sig``, ``s1_sig`` .. ``sN_sig`` (and ``noise_sig``), float32 [segment]."""
        plan = self.plan(index)
        sources = [
            set_loudness(self.meter, self._speech_window(u.path, offset), lufs)
            for u, offset, lufs in zip(plan.utterances, plan.speech_offsets, plan.speech_lufs)
        ]
        mix = np.sum(sources, axis=0)
        if plan.noise is not None:
            noise = set_loudness(self.meter, self._noise_window(plan.noise, plan.noise_offset), plan.noise_lufs)
            mix = mix + noise
        gain = min(1.0, self.max_peak / max(float(np.abs(mix).max()), 1e-12))
        item = {"id": "_".join(u.utterance_id for u in plan.utterances), "mix_sig": _tensor(gain * mix)}
        for key, source in zip(source_keys(self.num_spks), sources):
            item[f"{key}_sig"] = _tensor(gain * source)
        if plan.noise is not None:
            item["noise_sig"] = _tensor(gain * noise)
        return item

    def _speech_window(self, path: str, offset: float) -> np.ndarray:
        """``segment`` samples of an utterance: a window of a longer one, a shorter one in zeros."""
        speech = self._read(path, first_channel=False)
        room = abs(speech.size - self.segment)
        start = int(offset * (room + 1))
        if speech.size >= self.segment:
            return speech[start : start + self.segment]
        return np.pad(speech, (start, room - start))

    def _noise_window(self, path: str, offset: float) -> np.ndarray:
        """``segment`` samples of a noise file's first channel, repeated when it is too short."""
        noise = self._read(path, first_channel=True)
        room = noise.size - self.segment
        if room < 0:
            return np.resize(noise, self.segment)
        start = int(offset * (room + 1))
        return noise[start : start + self.segment]


    def _read(self, path: str, first_channel: bool) -> np.ndarray:
        """A mono file, or the first channel of any file, at ``sample_rate`` (float64)."""
        rate = audio_info(path).sample_rate if self.resample else self.sample_rate
        if first_channel:
            signal = read_channels(path, sample_rate=rate)[:, 0]
        else:
            signal = read_audio(path, sample_rate=rate)
        signal = signal.numpy().astype(np.float64)
        if rate == self.sample_rate:
            return signal
        divisor = math.gcd(rate, self.sample_rate)
        return resample_poly(signal, self.sample_rate // divisor, rate // divisor)


def _tensor(signal: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(signal.astype(np.float32))
