"""Separating speech with an exported model: batches, and files of any length and sample rate.

:class:`UMambaSeparation` is a SpeechBrain ``Pretrained`` interface for the folders written by
``python -m umamba.export`` (any Encoder/MaskNet/Decoder separator), loaded with
``UMambaSeparation.from_hparams(source=MODEL_DIR)``. It computes the same as SpeechBrain's
``SepformerSeparation.separate_batch`` and adds what long recordings need:

- the file is read and separated in overlapping chunks (10 s with 1 s of overlap by default), so
  memory stays bounded whatever its length; the output is written to disk as it comes;
- the sources of each chunk are put in the order of the previous chunk's (the permutation with the
  best SI-SNR on their overlap), then the two chunks are cross-faded over the overlap;
- files at another sample rate are resampled to the model's (polyphase, chunk by chunk, with the
  same result as resampling the whole file) and multichannel files are averaged to mono;
- bad files raise :class:`umamba.data.audio.AudioError`, whose message names the file.

Unlike SpeechBrain's ``separate_file``, nothing is fetched or cached by file name (two files with
the same name in different folders are two files) and the estimates are not peak-normalised.

Authors
 * U-Mamba-Net contributors
"""

import contextlib
import math
import os
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.logger import get_logger

from umamba.data.audio import AudioError, atomic_output, audio_info
from umamba.metrics import best_permutation
from umamba.models.separator import separate

logger = get_logger(__name__)


def chunk_bounds(num_samples: int, chunk: int, overlap: int) -> list:
    """Start and end samples of overlapping chunks of ``chunk`` samples that cover a signal.

    Consecutive chunks overlap by at least ``overlap`` samples. Every chunk has ``chunk``
    samples: the last one ends at the end of the signal (and may overlap its predecessor more).
    A signal no longer than ``chunk`` is one chunk.

    Arguments
    ---------
    num_samples : int
        Length of the signal.
    chunk : int
        Chunk length in samples.
    overlap : int
        Minimum overlap of consecutive chunks, ``0 < overlap < chunk``.

    Returns
    -------
    list of (int, int)
        ``(start, end)`` of each chunk, in order.

    Example
    -------
    >>> chunk_bounds(25, 10, 2)
    [(0, 10), (8, 18), (15, 25)]
    >>> chunk_bounds(7, 10, 2)
    [(0, 7)]
    """
    if chunk <= 0 or not 0 < overlap < chunk:
        raise ValueError(f"chunk_bounds: need 0 < overlap < chunk, got chunk {chunk} and overlap {overlap}")
    if num_samples <= chunk:
        return [(0, num_samples)]
    starts = list(range(0, num_samples - chunk, chunk - overlap))
    starts.append(num_samples - chunk)
    return [(start, start + chunk) for start in starts]


def stitch_chunks(chunks: Iterable[torch.Tensor], bounds: Sequence) -> Iterator[torch.Tensor]:
    """Joins separated overlapping chunks into one separated signal, block by block.

    The sources of each chunk are reordered to match the previous chunk's on their overlap (the
    permutation of :func:`umamba.metrics.best_permutation`, by SI-SNR), then the overlap is
    cross-faded with ``sin^2`` / ``cos^2`` fades, which sum to one. Only the previous chunk's
    overlap is kept in memory. Which source comes first is decided by the first chunk.

    Arguments
    ---------
    chunks : iterable of torch.Tensor
        The estimates of each chunk, ``[end - start, n_src]``, in the order of ``bounds``.
    bounds : sequence of (int, int)
        ``(start, end)`` of each chunk, as :func:`chunk_bounds` gives them.

    Yields
    ------
    torch.Tensor
        Finished consecutive blocks ``[n, n_src]``; together ``[bounds[-1][1], n_src]``.

    Example
    -------
    >>> sources = torch.randn(25, 2)
    >>> bounds = chunk_bounds(25, 10, 4)
    >>> swapped = [sources[s:e].flip(1) if k % 2 else sources[s:e] for k, (s, e) in enumerate(bounds)]
    >>> torch.allclose(torch.cat(list(stitch_chunks(swapped, bounds))), sources)
    True
    """
    previous = None  # the previous chunk's estimates, aligned, from the current chunk's start on
    for k, (estimates, (start, end)) in enumerate(zip(chunks, bounds)):
        if estimates.shape[0] != end - start:
            raise ValueError(f"stitch_chunks: chunk {k} has {estimates.shape[0]} samples, expected {end - start}")
        if previous is not None:
            n = previous.shape[0]
            estimates = estimates[:, list(best_permutation(estimates[:n].T, previous.T))]
            fade_in = torch.sin(0.5 * math.pi * (torch.arange(n, dtype=estimates.dtype) + 0.5) / n)[:, None] ** 2
            estimates = torch.cat([previous * (1 - fade_in) + estimates[:n] * fade_in, estimates[n:]])
        next_start = bounds[k + 1][0] if k + 1 < len(bounds) else end
        yield estimates[: next_start - start]
        previous = estimates[next_start - start :]


class _MixtureReader:
    """Reads spans of an audio file as mono float32 at another sample rate, without reading it all.

    Resampling is scipy's ``resample_poly`` on the span plus a margin longer than its filter on
    each side, so any span equals the same samples of the whole file resampled at once.
    """

    def __init__(self, path: str, sample_rate: int, min_seconds: float):
        self.path = path
        info = audio_info(path)  # AudioError naming the file: missing, empty, unreadable
        if info.frames == 0:
            raise AudioError(f"Cannot separate '{path}': the file has no samples (0 frames)")
        if info.duration < min_seconds:
            raise AudioError(
                f"Cannot separate '{path}': too short ({info.duration:.3f} s, at least {min_seconds} s needed)"
            )
        if info.channels > 1:
            logger.warning("Averaging the %d channels of '%s' to mono", info.channels, path)
        self.frames, self.file_rate = info.frames, info.sample_rate
        gcd = math.gcd(info.sample_rate, sample_rate)
        self.up, self.down = sample_rate // gcd, info.sample_rate // gcd
        self.num_samples = -(-self.frames * self.up // self.down)  # len(resample_poly(whole file))
        filter_half_length = 10 * max(self.up, self.down) // self.up + 1  # in input samples
        self.margin = -(-filter_half_length // self.down) * self.down
        self.file = sf.SoundFile(path)

    def close(self):
        self.file.close()

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``[start, stop)`` at the target rate, ``[stop - start]``."""
        if self.up == self.down:
            return torch.from_numpy(self._read_frames(start, stop))
        first = max(0, (start * self.down // self.up - self.margin) // self.down * self.down)
        last = min(self.frames, -(-stop * self.down // self.up) + self.margin)
        offset = first * self.up // self.down  # exact: first is a multiple of down
        resampled = resample_poly(self._read_frames(first, last), self.up, self.down)
        return torch.from_numpy(resampled[start - offset : stop - offset].astype("float32"))

    def _read_frames(self, first: int, last: int):
        try:
            self.file.seek(first)
            data = self.file.read(last - first, dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as err:
            raise AudioError(f"Cannot read audio '{self.path}': corrupt sample data ({err})") from err
        if data.shape[0] != last - first:
            raise AudioError(
                f"Cannot read audio '{self.path}': truncated, {data.shape[0]} frames read from frame {first} "
                f"where the header announces {self.frames}"
            )
        if not np.isfinite(data).all():
            raise AudioError(
                f"Cannot separate '{self.path}': NaN or infinite samples between "
                f"{first / self.file_rate:.2f} s and {last / self.file_rate:.2f} s"
            )
        return data.mean(axis=1)


class UMambaSeparation(Pretrained):
    """Ready-to-use separator loaded from an exported model folder (``python -m umamba.export``).

    ``from_hparams(source=MODEL_DIR, savedir=None)`` builds the modules from the folder's
    ``hyperparams.yaml`` and loads ``encoder.ckpt``, ``masknet.ckpt`` and ``decoder.ckpt``;
    ``run_opts={"device": "cuda"}`` selects the device.

    Example
    -------
    >>> from speechbrain.lobes.models.dual_path import Decoder, Encoder
    >>> from umamba.models import UMambaMaskNet
    >>> modules = {
    ...     "encoder": Encoder(kernel_size=16, out_channels=16),
    ...     "masknet": UMambaMaskNet(16, 8, 16, num_blocks=1, d_state=4, backend="torch"),
    ...     "decoder": Decoder(in_channels=16, out_channels=1, kernel_size=16, stride=8, bias=False),
    ... }
    >>> model = UMambaSeparation(modules, {"sample_rate": 8000, "num_spks": 2})
    >>> model.separate_batch(torch.randn(3, 1000)).shape
    torch.Size([3, 1000, 2])
    """

    HPARAMS_NEEDED = ["sample_rate", "num_spks"]
    MODULES_NEEDED = ["encoder", "masknet", "decoder"]
    MIN_SECONDS = 0.1
    """Shortest input accepted by the file methods (shorter ones are almost surely not a recording)."""

    def separate_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """Separates a batch of mixtures at the model's sample rate.

        Arguments
        ---------
        mix : torch.Tensor
            Mixtures ``[B, T]``.

        Returns
        -------
        torch.Tensor
            Estimated sources ``[B, T, n_src]``, on the model's device.
        """
        with torch.no_grad():
            return separate(self.mods.encoder, self.mods.masknet, self.mods.decoder, mix.to(self.device))

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`separate_batch`."""
        return self.separate_batch(mix)

    def iter_separate_file(
        self, path: str, chunk_seconds: float = 10.0, overlap_seconds: float = 1.0
    ) -> Iterator[torch.Tensor]:
        """Separates an audio file chunk by chunk: an iterator over the result as it is finished.

        The file is checked when this is called; it is read and separated as the iterator is consumed.

        Arguments
        ---------
        path : str
            Audio file of any sample rate (resampled to the model's) and any number of channels
            (averaged, with a warning), at least ``MIN_SECONDS`` long.
        chunk_seconds : float
            Length of the chunks the model sees; a file no longer than that is one chunk.
        overlap_seconds : float
            Minimum overlap of consecutive chunks (where their sources are matched and cross-faded).

        Returns
        -------
        iterator of torch.Tensor
            Consecutive blocks of estimates ``[n, n_src]`` at the model's sample rate, on the CPU.

        Raises
        ------
        umamba.data.audio.AudioError
            If the file is missing, empty, unreadable or too short; while iterating, if a chunk has
            NaN or infinite samples.
        """
        sample_rate = self.hparams.sample_rate
        chunk, overlap = round(chunk_seconds * sample_rate), round(overlap_seconds * sample_rate)
        if chunk_seconds < self.MIN_SECONDS or not 0 < overlap < chunk:
            raise ValueError(
                f"Need chunk_seconds >= {self.MIN_SECONDS} and 0 < overlap_seconds < chunk_seconds, got "
                f"{chunk_seconds} and {overlap_seconds}"
            )
        reader = _MixtureReader(os.fspath(path), sample_rate, self.MIN_SECONDS)  # bad files fail here, at once
        return self._separate_chunks(reader, chunk_bounds(reader.num_samples, chunk, overlap))

    def _separate_chunks(self, reader: _MixtureReader, bounds: list) -> Iterator[torch.Tensor]:
        with contextlib.closing(reader):
            chunks = (self.separate_batch(reader.read(start, end)[None])[0].cpu() for start, end in bounds)
            yield from stitch_chunks(chunks, bounds)

    def separate_file(
        self,
        path: str,
        out_dir: Optional[str] = None,
        chunk_seconds: float = 10.0,
        overlap_seconds: float = 1.0,
        name: Optional[str] = None,
    ) -> torch.Tensor:
        """Separates an audio file in chunks (see :meth:`iter_separate_file`); optionally writes wavs.

        Arguments
        ---------
        path : str
            Audio file, any sample rate and number of channels.
        out_dir : str, optional
            If given, one 32-bit float wav per source is written there, at the model's sample rate,
            as ``<name>_s1.wav``, ``<name>_s2.wav``, ...: incrementally, and atomically (no file
            appears unless the whole file was separated).
        chunk_seconds : float
            Length of the chunks the model sees.
        overlap_seconds : float
            Minimum overlap of consecutive chunks.
        name : str, optional
            Output file name stem; the input's by default.

        Returns
        -------
        torch.Tensor
            Estimated sources ``[T, n_src]`` at the model's sample rate (``T`` is the file's
            length at that rate).
        """
        blocks = self.iter_separate_file(path, chunk_seconds, overlap_seconds)
        if out_dir is not None:
            blocks = self._write_blocks(blocks, self._paths(path, out_dir, name))
        return torch.cat(list(blocks))

    def separate_to_files(
        self,
        path: str,
        out_dir: str,
        chunk_seconds: float = 10.0,
        overlap_seconds: float = 1.0,
        name: Optional[str] = None,
    ) -> list:
        """Like :meth:`separate_file` with ``out_dir``, without keeping the estimates in memory.

        Returns
        -------
        list of str
            The files written, one per source.
        """
        paths = self._paths(path, out_dir, name)
        for _ in self._write_blocks(self.iter_separate_file(path, chunk_seconds, overlap_seconds), paths):
            pass
        return paths

    def _paths(self, path, out_dir, name):
        stem = name if name is not None else os.path.splitext(os.path.basename(os.fspath(path)))[0]
        return [os.path.join(out_dir, f"{stem}_s{k + 1}.wav") for k in range(self.hparams.num_spks)]

    def _write_blocks(self, blocks: Iterable[torch.Tensor], paths: Sequence[str]) -> Iterator[torch.Tensor]:
        """Passes ``blocks`` through while appending source ``k`` to ``paths[k]``; moved into place at the end."""
        with contextlib.ExitStack() as stack:
            files = []
            for path in paths:
                tmp = stack.enter_context(atomic_output(path))
                try:
                    files.append(stack.enter_context(
                        sf.SoundFile(tmp, "w", samplerate=self.hparams.sample_rate, channels=1, subtype="FLOAT")
                    ))
                except (sf.SoundFileError, RuntimeError) as err:
                    raise AudioError(f"Cannot write audio '{path}': {err}") from err
            for block in blocks:
                for k, (path, f) in enumerate(zip(paths, files)):
                    try:
                        f.write(block[:, k].contiguous().numpy())
                    except (sf.SoundFileError, RuntimeError) as err:
                        raise AudioError(f"Cannot write audio '{path}': {err}") from err
                yield block
