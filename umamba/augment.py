"""On-the-fly training augmentation for separation: speed perturbation, reverberation, noise.

The Brain calls ``augmentation(mix, targets, batch)`` on every training batch (under
``torch.no_grad()``) when the yaml defines ``augmentation``. :class:`SeparationAugment`
changes the sources and rebuilds the mixture from them, in this order: speed perturbation
(SpeechBrain's ``SpeedPerturb``), reverberation with one room per mixture, then noise (the
batch's own ``noise_sig``, or SpeechBrain's ``AddNoise`` from a noise CSV). With every option
off it returns its inputs unchanged.

Why not SpeechBrain's ``AddReverb`` (checked on SpeechBrain 1.1.2): its ``reverberate`` takes
the direct-path index as the argmax over time of *every* RIR channel, a tensor that
``convolve1d`` cannot use as a slice, so a multichannel RIR raises a ``TypeError``; it draws a
single RIR per call, so a whole batch would share one room; and its FFT convolution has no
zero padding, so the reverberant tail of the end of a crop wraps around onto its start. Here
SpeechBrain's ``convolve1d`` is given that padding (an exact linear convolution, direct path
kept in place), channel k of the mixture's RIR convolves source k, and SpeechBrain's
``compute_amplitude``/``rescale`` keep each source's average amplitude (``AddReverb``'s
``rescale_amp="avg"``). The targets stay the dry sources, or become the reverberant sources,
or the sources through the direct path of the room (aligned to a fraction of a sample).

Authors
 * U-Mamba-Net contributors 2025
"""

import os
from typing import List, Optional, Sequence, Tuple

import torch
from scipy.fft import next_fast_len
from speechbrain.augment.time_domain import AddNoise, SpeedPerturb
from speechbrain.processing.signal_processing import compute_amplitude, convolve1d, rescale
from tqdm import tqdm

from umamba.data.audio import AudioError, audio_info, read_channels
from umamba.data.datasets import load_csv

# Above this energy ratio (-30 dB) a mixture holds more than the sum of its sources.
_RESIDUAL_LIMIT = 1e-3


class SeparationAugment(torch.nn.Module):
    """Augments a batch of (mixture, sources) and rebuilds the mixture from the new sources.

    Arguments
    ---------
    sample_rate : int
        Sample rate of the batches; every RIR and noise file must have it.
    num_spks : int
        Sources per mixture; every RIR file needs at least this many channels.
    rir_csv : str, optional
        SpeechBrain CSV of a RIR bank (columns ``ID,duration,wav,wav_format,wav_opts``). Each
        wav is one room: channel k is the RIR of source k (extra channels are ignored). Every
        mixture gets a random room; its sources are convolved with their channel and rescaled to
        their dry average amplitude; the direct path (the largest sample of each channel) stays
        at the position of the dry signal, to the nearest sample. None: no reverberation.
    rir_replacements : dict, optional
        Replacements of ``$name`` in the RIR CSV paths, e.g. ``{"rir_root": "/data/rirs"}``.
    reverberant_targets : bool
        False (default): the targets stay the dry (anechoic) sources. True: the targets are the
        reverberant sources (needs ``rir_csv``).
    direct_path_targets : bool
        True: the targets are the dry sources convolved with the direct path of their room
        (``<room>_direct.wav`` next to ``<room>.wav``, as :mod:`umamba.data.rir` writes them),
        shifted and rescaled like the reverberant sources. Where the direct sound arrives
        between two samples, the reverberant source is the dry one delayed by up to half a
        sample, which alone caps the SI-SNR of a dry target (near 8-14 dB for the synthetic
        demo voices at 8 kHz); the direct-path target is aligned exactly (the anechoic target
        of WHAMR!). Needs ``rir_csv``; excludes ``reverberant_targets``.
    speeds : sequence of float, optional
        Speed factors in percent for SpeechBrain's ``SpeedPerturb``, e.g. ``[95, 100, 105]``,
        drawn uniformly. Applied before reverberation; the sources are then cut to the
        shortest one (never longer than the batch) and the targets follow. None or empty: off.
    independent_speeds : bool
        True (default, as SpeechBrain's WSJ0-Mix recipes): every source of every mixture draws
        its own speed. False: the sources of a mixture share one speed (they stay aligned).
    noise_gain_db : float
        When the batch has ``noise_sig``, the noise is scaled by a gain drawn per mixture from
        U[-noise_gain_db, noise_gain_db] dB before it is added back. 0: no jitter.
    noise_csv : str, optional
        SpeechBrain CSV of mono noise files (columns ``ID,duration,wav,wav_format,wav_opts``)
        for SpeechBrain's ``AddNoise``, used only for batches without ``noise_sig``. AddNoise
        scales the speech by ``1 - f`` and adds the noise so that the speech-to-noise ratio is
        drawn from U[snr_low, snr_high] dB (the targets are not rescaled: the SI-SNR loss does
        not see that factor). None: no added noise.
    noise_replacements : dict, optional
        Replacements of ``$name`` in the noise CSV paths.
    snr_low, snr_high : float
        SNR range (dB) of ``AddNoise``.

    Raises
    ------
    ValueError
        For inconsistent options, an unreadable CSV, or a RIR or noise file with the wrong
        sample rate or number of channels (the message names the file).

    Example
    -------
    >>> augment = SeparationAugment(8000, speeds=[110])  # 10 % faster: 8000 -> 7273 samples
    >>> targets = torch.randn(2, 8000, 2)
    >>> mix, new_targets = augment(targets.sum(-1), targets)
    >>> mix.shape, new_targets.shape
    (torch.Size([2, 7273]), torch.Size([2, 7273, 2]))
    >>> torch.allclose(mix, new_targets.sum(-1))
    True
    """

    def __init__(
        self,
        sample_rate: int,
        num_spks: int = 2,
        rir_csv: Optional[str] = None,
        rir_replacements: Optional[dict] = None,
        reverberant_targets: bool = False,
        direct_path_targets: bool = False,
        speeds: Optional[Sequence[float]] = None,
        independent_speeds: bool = True,
        noise_gain_db: float = 0.0,
        noise_csv: Optional[str] = None,
        noise_replacements: Optional[dict] = None,
        snr_low: float = 0.0,
        snr_high: float = 10.0,
    ):
        super().__init__()
        if (reverberant_targets or direct_path_targets) and rir_csv is None:
            raise ValueError("reverberant_targets or direct_path_targets needs a rir_csv")
        if reverberant_targets and direct_path_targets:
            raise ValueError("choose reverberant_targets or direct_path_targets, not both")
        if noise_gain_db < 0 or snr_low > snr_high:
            raise ValueError(
                f"need noise_gain_db >= 0 and snr_low <= snr_high, got {noise_gain_db}, "
                f"{snr_low}, {snr_high}"
            )
        self.sample_rate = sample_rate
        self.num_spks = num_spks
        self.rooms = []  # per room: its RIR file (and direct-path file)
        if rir_csv:
            rirs = _checked_wavs(rir_csv, rir_replacements, sample_rate, num_spks, None)
            if direct_path_targets:
                directs = [_check_direct(p, sample_rate, num_spks) for p in tqdm(rirs, desc="Checking direct paths")]
                self.rooms = list(zip(rirs, directs))
            else:
                self.rooms = [(p,) for p in rirs]
        self.reverberant_targets = reverberant_targets
        self.speed_perturb = SpeedPerturb(orig_freq=sample_rate, speeds=list(speeds)) if speeds else None
        self.independent_speeds = independent_speeds
        self.noise_gain_db = noise_gain_db
        self.add_noise = None
        if noise_csv:
            _checked_wavs(noise_csv, noise_replacements, sample_rate, 1, 1)
            self.add_noise = AddNoise(
                csv_file=noise_csv,
                snr_low=snr_low,
                snr_high=snr_high,
                pad_noise=True,
                replacements=noise_replacements or {},
                noise_sample_rate=sample_rate,
                clean_sample_rate=sample_rate,
            )

    def forward(self, mix: torch.Tensor, targets: torch.Tensor, batch=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augmented (mixture [B, T'], targets [B, T', n_src]), T' <= T.

        Arguments
        ---------
        mix : torch.Tensor
            The mixtures, [B, T].
        targets : torch.Tensor
            The dry sources, [B, T, n_src].
        batch : speechbrain.dataio.batch.PaddedBatch, optional
            The batch: ``noise_sig`` (its noise), ``mix_sig.lengths`` and ``id`` are used.

        Returns
        -------
        tuple of torch.Tensor
            The new mixture and targets.

        Raises
        ------
        ValueError
            If the sources are changed but a mixture holds more than its sources (e.g. WHAM!
            noise) while the batch has no ``noise_sig``: the noise would be silently dropped.
        """
        noise = getattr(batch, "noise_sig", None)
        noise = None if noise is None else noise.data
        change_sources = self.speed_perturb is not None or bool(self.rooms)
        if change_sources and noise is None:
            _check_no_residual(mix, targets, batch)
        length = mix.shape[1]
        sources = targets
        if self.speed_perturb is not None:
            sources = self._perturb_speed(sources)
        targets = sources
        if self.rooms:
            filtered = self._reverberate(sources)
            sources = filtered[0]
            if self.reverberant_targets:
                targets = sources
            elif len(filtered) == 2:
                targets = filtered[1]
        if noise is not None and (change_sources or self.noise_gain_db > 0):
            gain_db = (2 * torch.rand(mix.shape[0], 1, device=mix.device) - 1) * self.noise_gain_db
            mix = sources.sum(-1) + 10 ** (gain_db / 20) * noise[:, : sources.shape[1]]
        elif change_sources:
            mix = sources.sum(-1)
        if noise is None and self.add_noise is not None:
            lengths = torch.ones(mix.shape[0], device=mix.device) if batch is None else batch.mix_sig.lengths
            mix = self.add_noise(mix, (lengths * length / mix.shape[1]).clamp(max=1.0))
        return mix, targets

    def _perturb_speed(self, sources: torch.Tensor) -> torch.Tensor:
        """Speed-perturbs every mixture (every source, with ``independent_speeds``), cut to the shortest."""
        self.speed_perturb.device = sources.device  # resample where the batch is
        batch_size, length, n_src = sources.shape
        if self.independent_speeds:
            perturbed = [
                [self.speed_perturb(sources[b : b + 1, :, k])[0] for k in range(n_src)]
                for b in range(batch_size)
            ]
        else:
            perturbed = [list(self.speed_perturb(sources[b : b + 1])[0].unbind(-1)) for b in range(batch_size)]
        length = min([length] + [s.shape[0] for mixture in perturbed for s in mixture])
        return torch.stack([torch.stack([s[:length] for s in mixture], dim=-1) for mixture in perturbed])

    def _reverberate(self, sources: torch.Tensor) -> List[torch.Tensor]:
        """The sources in a random room per mixture (and through its direct path), same levels."""
        batch_size, length, n_src = sources.shape
        if n_src > self.num_spks:
            raise ValueError(f"{n_src} sources per mixture but the RIRs were checked for num_spks={self.num_spks}")
        outputs = [torch.empty_like(sources) for _ in self.rooms[0]]
        for b, room in enumerate(torch.randint(len(self.rooms), (batch_size,)).tolist()):
            filters = [read_channels(path, self.sample_rate)[:, :n_src].to(sources) for path in self.rooms[room]]
            # zeros for the tail: a linear, not circular, convolution
            pad = next_fast_len(length + max(f.shape[0] for f in filters) - 1) - length
            for k in range(n_src):
                direct_index = int(filters[0][:, k].abs().argmax())  # the direct path stays in place
                for output, rir in zip(outputs, filters):
                    output[b, :, k] = convolve1d(
                        sources[b, :, k].reshape(1, length, 1),
                        rir[:, k].reshape(1, -1, 1),
                        padding=(0, pad),
                        use_fft=True,
                        rotation_index=direct_index,
                    )[0, :length, 0]
        level = compute_amplitude(sources, amp_type="avg")
        return [rescale(output, None, level, amp_type="avg") for output in outputs]


def _checked_wavs(
    csv_path: str,
    replacements: Optional[dict],
    sample_rate: int,
    min_channels: int,
    max_channels: Optional[int],
) -> List[str]:
    """The ``wav`` paths of a SpeechBrain CSV, each checked to exist with the right rate and channels."""
    rows = load_csv(os.fspath(csv_path), replacements or {})
    if not rows:
        raise ValueError(f"'{csv_path}' lists no file")
    wanted = f"{min_channels}" if max_channels == min_channels else f"at least {min_channels}"
    paths = []
    for row_id, row in tqdm(rows.items(), desc=f"Checking {os.path.basename(csv_path)}", dynamic_ncols=True):
        if "wav" not in row:
            raise ValueError(f"'{csv_path}' has no wav column")
        info = audio_info(row["wav"])
        wrong_channels = info.channels < min_channels or (max_channels is not None and info.channels > max_channels)
        if info.sample_rate != sample_rate or wrong_channels:
            raise AudioError(
                f"'{row['wav']}' (row {row_id} of '{csv_path}') has {info.sample_rate} Hz and "
                f"{info.channels} channel(s); expected {sample_rate} Hz and {wanted} channel(s)"
            )
        paths.append(row["wav"])
    return paths


def _check_direct(rir_path: str, sample_rate: int, num_spks: int) -> str:
    """The direct-path file of a room, ``<room>_direct.wav`` beside ``<room>.wav``, checked."""
    stem, extension = os.path.splitext(rir_path)
    path = f"{stem}_direct{extension}"
    info = audio_info(path)  # names the file when it is missing
    if info.sample_rate != sample_rate or info.channels < num_spks:
        raise AudioError(
            f"Direct-path file '{path}' has {info.sample_rate} Hz and {info.channels} channel(s); "
            f"expected {sample_rate} Hz and at least {num_spks} channel(s)"
        )
    return path


def _check_no_residual(mix: torch.Tensor, targets: torch.Tensor, batch) -> None:
    """Raises when a mixture is more than the sum of its sources (noise that would be lost)."""
    residual = (mix - targets.sum(-1)).pow(2).sum(1)
    ratio = residual / mix.pow(2).sum(1).clamp(min=1e-12)
    bad = (ratio > _RESIDUAL_LIMIT).nonzero().flatten().tolist()
    if bad:
        ids = [batch.id[i] for i in bad] if batch is not None else bad
        raise ValueError(
            f"Mixtures {ids} hold more than their sources (residual up to "
            f"{10 * torch.log10(ratio.max()).item():.1f} dB of the mixture, e.g. WHAM! noise) but "
            "the batch has no noise_sig: rebuilding them from augmented sources would drop it. "
            "Load the noise with the training set (separation_dataset(..., with_noise=True)) or "
            "train on mix_clean."
        )
