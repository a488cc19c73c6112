"""SpeechBrain datasets for separation: the prepared CSVs, read with clear errors, cropped for training."""

import csv
import os
import random
from collections.abc import Sequence

import torch
from speechbrain.dataio.dataio import load_data_csv
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.data_pipeline import provides, takes

from umamba.data.audio import read_audio


def source_keys(num_spks: int) -> list[str]:
    """CSV columns of the target sources.

    Example
    -------
    >>> source_keys(3)
    ['s1', 's2', 's3']
    """
    return [f"s{i + 1}" for i in range(num_spks)]


def load_csv(csv_path: str | os.PathLike, replacements: dict, columns: Sequence[str] = ()) -> dict:
    """SpeechBrain's ``load_data_csv`` (rows by ID, ``$name`` replaced), with errors naming the CSV.

    The CSV is checked first: it must have the columns ``ID`` and ``columns``, and each row as
    many fields as the header and a value in each of ``columns``; a ValueError names the CSV, the
    line and the column otherwise (SpeechBrain would fail later, deep in its data pipeline).

    Example
    -------
    >>> csv_path = getfixture("tmp_path") / "rirs.csv"
    >>> _ = csv_path.write_text("ID,wav\\nroom1,$rir_root/room1.wav\\n")
    >>> load_csv(csv_path, {"rir_root": "/rirs"}, columns=["wav"])
    {'room1': {'wav': '/rirs/room1.wav'}}
    >>> _ = csv_path.write_text("ID,wav,channels\\nroom1,$rir_root/room1.wav\\n")
    >>> load_csv(csv_path, {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Cannot read CSV '...rirs.csv': line 2 has 2 fields, the header has 3
    """
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file '{csv_path}' does not exist")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, skipinitialspace=True)  # as SpeechBrain reads it
        header = next(reader, [])
        missing = [column for column in ["ID", *columns] if column not in header]
        if missing:
            raise ValueError(
                f"Cannot read CSV '{csv_path}': no column {', '.join(missing)} (header: {','.join(header)})"
            )
        for row in filter(None, reader):  # SpeechBrain skips blank lines
            if len(row) != len(header):
                raise ValueError(
                    f"Cannot read CSV '{csv_path}': line {reader.line_num} has {len(row)} fields, "
                    f"the header has {len(header)}"
                )
            empty = [column for column in columns if not row[header.index(column)]]
            if empty:
                raise ValueError(f"Cannot read CSV '{csv_path}': line {reader.line_num} has no {', '.join(empty)}")
    try:
        return load_data_csv(csv_path, replacements)
    except (KeyError, ValueError) as err:
        raise ValueError(f"Cannot read CSV '{csv_path}': {err}") from err


def crop_together(signals: list[torch.Tensor], segment: int | None, rng=random) -> list[torch.Tensor]:
    """Cut the same random window of ``segment`` samples out of equally long signals.

    Signals no longer than ``segment`` (or ``segment`` None/0) are returned whole.

    Example
    -------
    >>> a = torch.arange(10.0); b = -a
    >>> x, y = crop_together([a, b], 4)
    >>> len(x), bool((x == -y).all())
    (4, True)
    """
    length = signals[0].shape[-1]
    if not segment or length <= segment:
        return signals
    start = rng.randint(0, length - segment)
    return [s[..., start : start + segment] for s in signals]


def separation_dataset(
    csv_path: str,
    data_root: str,
    num_spks: int,
    sample_rate: int,
    segment_seconds: float | None = None,
    with_noise: bool = False,
) -> DynamicItemDataset:
    """A dataset of ``mix_sig``, ``s1_sig`` .. ``sN_sig`` (and ``noise_sig``) from a prepared CSV.

    Every wav goes through :func:`umamba.data.audio.read_audio`, so a missing, corrupt, empty,
    wrongly sampled or non-finite file raises an error that names it. With ``segment_seconds``
    each item is a random window of that length, the same for the mixture and its sources.

    Arguments
    ---------
    csv_path : str
        CSV written by :func:`umamba.data.librimix.prepare_librimix`.
    data_root : str
        Replaces ``$data_root`` in the CSV paths.
    num_spks : int
        Number of sources.
    sample_rate : int
        Every file must have this rate.
    segment_seconds : float, optional
        Random crop length (training); whole utterances when None or 0.
    with_noise : bool
        Also provide ``noise_sig`` (the CSV needs a ``noise_wav`` column).
    """
    keys = ["mix"] + source_keys(num_spks) + (["noise"] if with_noise else [])
    segment = int(segment_seconds * sample_rate) if segment_seconds else None

    @takes(*[f"{k}_wav" for k in keys])
    @provides(*[f"{k}_sig" for k in keys])
    def audio_pipeline(*paths):
        signals = [read_audio(p, sample_rate=sample_rate) for p in paths]
        lengths = {s.shape[-1] for s in signals}
        if len(lengths) != 1:
            listing = ", ".join(f"{p} ({s.shape[-1]} samples)" for p, s in zip(paths, signals))
            raise ValueError(f"mixture and sources differ in length: {listing}")
        yield from crop_together(signals, segment)

    rows = load_csv(csv_path, {"data_root": data_root}, columns=[f"{k}_wav" for k in keys])
    dataset = DynamicItemDataset(rows)
    dataset.add_dynamic_item(audio_pipeline)
    dataset.set_output_keys(["id"] + [f"{k}_sig" for k in keys])
    return dataset
