"""The one place the project reads and writes audio files.

Every failure is reported as an :class:`AudioError` that names the file and
what is wrong with it, instead of a bare traceback from inside libsndfile.
Writes are atomic: a temporary file is written next to the target and then
moved over it, so an interrupted run never leaves a half-written file behind.

Authors
 * U-Mamba-Net contributors 2025
"""

import contextlib
import os
import uuid
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import soundfile as sf
import torch

from speechbrain.utils.logger import get_logger

logger = get_logger(__name__)

PathLike = Union[str, os.PathLike]

# Files whose channels were already reported as averaged (warn once per file).
_DOWNMIX_WARNED = set()


class AudioError(ValueError):
    """An audio file is missing, unreadable or not what the caller expects.

    The message always names the file and says what is wrong with it.
    """


class AudioInfo(NamedTuple):
    """Header information of an audio file."""

    frames: int
    sample_rate: int
    channels: int
    duration: float


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[str]:
    """Yields a temporary path to write to, moved over ``path`` on success.

    The temporary file lives in the same folder (created if needed) and keeps
    the extension of ``path``, so format detection by extension still works.
    If the body raises, the temporary file is removed and ``path`` is left
    untouched. Used for audio here and for the CSV and JSON files of the
    data preparation.

    Arguments
    ---------
    path : str or os.PathLike
        The final file.

    Yields
    ------
    str
        The temporary path to write to.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> target = os.path.join(tmp_dir.name, "sub", "notes.txt")
    >>> with atomic_output(target) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("done")
    >>> open(target).read()
    'done'
    >>> os.listdir(os.path.dirname(target))
    ['notes.txt']
    >>> tmp_dir.cleanup()
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    extension = os.path.splitext(name)[1]
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp{extension}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _open(path: str) -> sf.SoundFile:
    """Opens ``path`` for reading, turning every failure into an AudioError."""
    if not os.path.exists(path):
        raise AudioError(f"Cannot read audio '{path}': no such file")
    if not os.path.isfile(path):
        raise AudioError(f"Cannot read audio '{path}': not a regular file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"Cannot read audio '{path}': the file is empty (0 bytes)")
    try:
        return sf.SoundFile(path)
    except sf.SoundFileRuntimeError as err:
        reason = getattr(err, "error_string", str(err))
        raise AudioError(
            f"Cannot read audio '{path}': unreadable or corrupt file ({reason})"
        ) from err


def audio_info(path: PathLike) -> AudioInfo:
    """Reads the header of an audio file without loading the samples.

    Arguments
    ---------
    path : str or os.PathLike
        The audio file.

    Returns
    -------
    AudioInfo
        Frames, sample rate, channels and duration in seconds.

    Raises
    ------
    AudioError
        If the file is missing, empty, unreadable or corrupt.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "a.wav")
    >>> write_audio(path, np.zeros(8000), 16000)
    >>> audio_info(path)
    AudioInfo(frames=8000, sample_rate=16000, channels=1, duration=0.5)
    >>> tmp_dir.cleanup()
    """
    path = os.fspath(path)
    with _open(path) as f:
        return AudioInfo(f.frames, f.samplerate, f.channels, f.frames / f.samplerate)


def read_channels(path: PathLike, sample_rate: Optional[int] = None) -> torch.Tensor:
    """Reads every channel of an audio file (multichannel RIRs, stereo noise) as float32.

    Arguments
    ---------
    path : str or os.PathLike
        The audio file.
    sample_rate : int, optional
        The sample rate the file must have; no check when None. Files are
        never resampled silently.

    Returns
    -------
    torch.Tensor
        The samples, shape [time, channels].

    Raises
    ------
    AudioError
        If the file is missing, empty, unreadable or corrupt, has no samples,
        the wrong sample rate, or NaN or infinite samples.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "stereo.wav")
    >>> write_audio(path, np.array([[0.5, -0.5], [0.25, 0.0]]), 8000)
    >>> read_channels(path, sample_rate=8000)
    tensor([[ 0.5000, -0.5000],
            [ 0.2500,  0.0000]])
    >>> tmp_dir.cleanup()
    """
    path = os.fspath(path)
    with _open(path) as f:
        if sample_rate is not None and f.samplerate != sample_rate:
            raise AudioError(
                f"Cannot read audio '{path}': wrong sample rate, expected "
                f"{sample_rate} Hz but found {f.samplerate} Hz"
            )
        try:
            data = f.read(dtype="float32", always_2d=True)
        except sf.SoundFileRuntimeError as err:
            raise AudioError(
                f"Cannot read audio '{path}': corrupt sample data ({err})"
            ) from err
    if data.shape[0] == 0:
        raise AudioError(f"Cannot read audio '{path}': the file has no samples (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(f"Cannot read audio '{path}': it contains NaN or infinite samples")
    return torch.from_numpy(data)


def read_audio(
    path: PathLike, sample_rate: Optional[int] = None, downmix: bool = False
) -> torch.Tensor:
    """Reads a mono audio file into a float32 tensor.

    Arguments
    ---------
    path : str or os.PathLike
        The audio file.
    sample_rate : int, optional
        The sample rate the file must have; no check when None. Files are
        never resampled silently.
    downmix : bool
        If True, a multichannel file is averaged to mono (with one warning
        per file); if False, a multichannel file is an error.

    Returns
    -------
    torch.Tensor
        The samples, shape [time], float32.

    Raises
    ------
    AudioError
        If the file is missing, empty, unreadable or corrupt, has no samples,
        the wrong sample rate, several channels (with ``downmix=False``), or
        NaN or infinite samples.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "a.wav")
    >>> write_audio(path, torch.full((4,), 0.5), 8000)
    >>> read_audio(path, sample_rate=8000)
    tensor([0.5000, 0.5000, 0.5000, 0.5000])
    >>> tmp_dir.cleanup()
    """
    path = os.fspath(path)
    channels = audio_info(path).channels
    if channels > 1 and not downmix:
        raise AudioError(
            f"Cannot read audio '{path}': expected mono but found "
            f"{channels} channels (pass downmix=True to average them)"
        )
    data = read_channels(path, sample_rate)
    if data.shape[1] > 1:
        if path not in _DOWNMIX_WARNED:
            _DOWNMIX_WARNED.add(path)
            logger.warning("Averaging the %d channels of '%s' to mono", data.shape[1], path)
        return data.mean(dim=1)
    return data[:, 0].contiguous()


def write_audio(
    path: PathLike,
    signal: Union[torch.Tensor, np.ndarray],
    sample_rate: int,
    subtype: str = "FLOAT",
) -> None:
    """Writes a signal atomically, creating the parent folders.

    The format follows the extension of ``path`` (``.wav``, ``.flac``, ...).

    Arguments
    ---------
    path : str or os.PathLike
        The file to write; replaced if it exists.
    signal : torch.Tensor or numpy.ndarray
        The samples, shape [time] (mono) or [time, channels].
    sample_rate : int
        The sample rate in Hz.
    subtype : str
        The soundfile subtype, e.g. "FLOAT" or "PCM_16" (which clips to [-1, 1]).

    Raises
    ------
    AudioError
        If the signal is not 1-D/2-D or not finite, the sample rate is not a
        positive integer, or the extension and subtype are not a known format.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "new", "b.wav")
    >>> write_audio(path, np.array([0.0, 0.25, -0.25]), 8000, subtype="PCM_16")
    >>> audio_info(path).frames
    3
    >>> tmp_dir.cleanup()
    """
    path = os.fspath(path)
    if isinstance(signal, torch.Tensor):
        signal = signal.detach().cpu().numpy()
    signal = np.asarray(signal)
    if signal.ndim not in (1, 2):
        raise AudioError(
            f"Cannot write audio '{path}': expected [time] or [time, channels], got shape {signal.shape}"
        )
    if not np.isfinite(signal).all():
        raise AudioError(f"Cannot write audio '{path}': the signal has NaN or infinite samples")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise AudioError(f"Cannot write audio '{path}': invalid sample rate {sample_rate}")
    audio_format = os.path.splitext(path)[1][1:].upper()
    if audio_format not in sf.available_formats():
        raise AudioError(
            f"Cannot write audio '{path}': unknown audio file extension "
            f"(known: {', '.join(sorted(sf.available_formats())).lower()})"
        )
    if not sf.check_format(audio_format, subtype):
        raise AudioError(
            f"Cannot write audio '{path}': subtype '{subtype}' is not valid for {audio_format}"
        )
    try:
        with atomic_output(path) as tmp:
            sf.write(tmp, signal, sample_rate, subtype=subtype, format=audio_format)
    except (sf.SoundFileError, ValueError, TypeError) as err:
        raise AudioError(
            f"Cannot write audio '{path}' (sample rate {sample_rate}, subtype {subtype}): {err}"
        ) from err
