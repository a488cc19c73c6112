"""Prepares LibriMix (Libri2Mix, Libri3Mix) for SpeechBrain: one CSV per split.

The LibriMix layout is::

    <Libri2Mix>/wav{8k,16k}/{min,max}/<split>/<folder>/<mixture_ID>.wav
    <Libri2Mix>/wav{8k,16k}/{min,max}/metadata/mixture_<split>_<mixture_type>.csv

The metadata columns are read by name (some LibriMix versions add an
``original_mixture_ID`` column). Its paths are absolute paths of the machine
that generated the corpus, so they are ignored: every path is rebuilt from the
layout, and written relative to ``$data_root`` (the Libri2Mix folder) so the
CSVs keep working when the data moves::

    DynamicItemDataset.from_csv(csv, replacements={"data_root": libri2mix_folder})

Authors
 * U-Mamba-Net contributors 2025
"""

import csv
import json
import os
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

from speechbrain.utils.logger import get_logger
from umamba.data.audio import atomic_output, audio_info

logger = get_logger(__name__)

MIXTURE_TYPES = ("mix_clean", "mix_both", "mix_single")
MODES = ("min", "max")
# The columns of the LibriMix metadata files, per mixture type.
METADATA_COLUMNS = {
    "mix_clean": ("mixture_ID", "mixture_path", "source_1_path", "source_2_path", "length"),
    "mix_both": (
        "mixture_ID",
        "mixture_path",
        "source_1_path",
        "source_2_path",
        "noise_path",
        "length",
    ),
    "mix_single": ("mixture_ID", "mixture_path", "source_1_path", "noise_path", "length"),
}
NOISE_FOLDER = "noise"
# Bumped whenever the CSV content changes, so older CSVs are rewritten.
_CSV_VERSION = 1


class LibriMixError(Exception):
    """Base class of the LibriMix preparation errors."""


class LibriMixNotFoundError(LibriMixError, FileNotFoundError):
    """A folder, metadata file or audio file of LibriMix is missing."""


class LibriMixFormatError(LibriMixError, ValueError):
    """A metadata file or an audio file of LibriMix is malformed."""


def corpus_name(n_spks: int) -> str:
    """The LibriMix folder name for ``n_spks`` speakers.

    Example
    -------
    >>> corpus_name(2)
    'Libri2Mix'
    """
    return f"Libri{n_spks}Mix"


def rate_folder(sample_rate: int) -> str:
    """The LibriMix folder name for a sample rate.

    Example
    -------
    >>> rate_folder(8000), rate_folder(16000)
    ('wav8k', 'wav16k')
    """
    if sample_rate <= 0 or sample_rate % 1000:
        raise ValueError(
            f"sample_rate must be a positive multiple of 1000 Hz (wav8k, wav16k, ...), "
            f"got {sample_rate}"
        )
    return f"wav{sample_rate // 1000}k"


def metadata_path(root: str, sample_rate: int, mode: str, split: str, mixture_type: str) -> str:
    """The metadata CSV of a split inside a LibriMix folder.

    Example
    -------
    >>> metadata_path("Libri2Mix", 8000, "min", "dev", "mix_both").replace(os.sep, "/")
    'Libri2Mix/wav8k/min/metadata/mixture_dev_mix_both.csv'
    """
    return os.path.join(
        root, rate_folder(sample_rate), mode, "metadata", f"mixture_{split}_{mixture_type}.csv"
    )


def prepare_librimix(
    data_folder: str,
    save_folder: str,
    splits: Sequence[str] = ("train-360", "dev", "test"),
    sample_rate: int = 8000,
    mode: str = "min",
    mixture_type: str = "mix_both",
    n_spks: int = 2,
    mix_folder: Optional[str] = None,
    source_folders: Optional[Sequence[str]] = None,
    noise_folder: str = NOISE_FOLDER,
    skip_prep: bool = False,
) -> Dict[str, str]:
    """Writes one SpeechBrain CSV per split of LibriMix.

    Each CSV has the columns ``ID, duration, mix_wav, s1_wav, s2_wav[, s3_wav]``
    and, when the mixtures contain noise (``mix_both``, ``mix_single``),
    ``noise_wav``. Rows are sorted by ID; ``duration`` is the metadata
    ``length`` in seconds; paths start with ``$data_root`` (the LibriMix
    folder). Every file is checked to exist, to be mono and to have
    ``sample_rate`` and the metadata ``length`` (a header read, no samples).

    A split is skipped when its CSV exists and was written with the same
    options from the same metadata file (a JSON sidecar records both).

    Arguments
    ---------
    data_folder : str
        The folder holding ``Libri2Mix`` or the ``Libri2Mix`` folder itself.
    save_folder : str
        Where the CSVs are written.
    splits : sequence of str
        The LibriMix splits: "train-360", "train-100", "dev", "test".
    sample_rate : int
        Selects ``wav8k`` or ``wav16k``.
    mode : str
        "min" (mixtures cut to the shorter source) or "max" (zero-padded).
    mixture_type : str
        "mix_clean", "mix_both" or "mix_single": selects the metadata file.
    n_spks : int
        Number of speakers: 2 for Libri2Mix, 3 for Libri3Mix.
    mix_folder : str, optional
        The folder of the mixtures in each split (default: ``mixture_type``),
        e.g. "mix_both_reverb" for reverberant copies of the mixtures.
    source_folders : sequence of str, optional
        The folders of the targets (default: "s1", "s2"[, "s3"]). Other
        folders are named in the CSV file name, so that CSVs of different
        targets (e.g. anechoic and reverberant) do not overwrite each other.
    noise_folder : str
        The folder of the noise in each split (e.g. "noise_reverb" for the
        noise as mixed into the reverberant mixtures).
    skip_prep : bool
        If True, only return the CSV paths.

    Returns
    -------
    dict
        Split name -> CSV path.

    Raises
    ------
    LibriMixNotFoundError
        If a folder, a metadata file or an audio file is missing.
    LibriMixFormatError
        If a metadata file is malformed, or a file has the wrong sample rate, channels or length.

    Example
    -------
    >>> import tempfile
    >>> from umamba.data.demo_corpus import make_demo_corpus
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> tmp = tmp_dir.name
    >>> root = make_demo_corpus(tmp, n_train=2, n_valid=1, n_test=1, seconds=1.0,
    ...                         voices="synthetic")
    >>> csvs = prepare_librimix(tmp, os.path.join(tmp, "csv"), splits=["dev"])
    >>> os.path.basename(csvs["dev"])
    'dev_mix_both_8000_min.csv'
    >>> data = DynamicItemDataset.from_csv(csvs["dev"], replacements={"data_root": root})
    >>> sorted(data.data[data.data_ids[0]])
    ['duration', 'mix_wav', 'noise_wav', 's1_wav', 's2_wav']
    >>> tmp_dir.cleanup()
    """
    if mixture_type not in MIXTURE_TYPES:
        raise ValueError(f"mixture_type must be one of {MIXTURE_TYPES}, got '{mixture_type}'")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if n_spks < 1:
        raise ValueError(f"n_spks must be at least 1, got {n_spks}")
    mix_folder = mix_folder or mixture_type
    if source_folders is None:
        source_folders = [f"s{i + 1}" for i in range(n_spks)]
    source_folders = list(source_folders)
    if len(source_folders) != n_spks:
        raise ValueError(f"{n_spks} source folders expected, got {source_folders}")
    default_sources = [f"s{i + 1}" for i in range(n_spks)]
    tag = mix_folder if source_folders == default_sources else "-".join([mix_folder] + source_folders)
    csv_paths = {split: os.path.join(save_folder, f"{split}_{tag}_{sample_rate}_{mode}.csv") for split in splits}
    if skip_prep:
        return csv_paths

    root = find_root(data_folder, n_spks, sample_rate, mode)
    folders = [mix_folder] + source_folders
    if mixture_type != "mix_clean":
        folders.append(noise_folder)
    columns = ["mix_wav"] + [f"s{i + 1}_wav" for i in range(n_spks)]
    if mixture_type != "mix_clean":
        columns.append("noise_wav")
    for split in splits:
        metadata = metadata_path(root, sample_rate, mode, split, mixture_type)
        for folder in folders:
            _check_folder(data_folder, root, [rate_folder(sample_rate), mode, split, folder])
        if not os.path.isfile(metadata):
            raise LibriMixNotFoundError(f"Metadata file '{metadata}' not found")
        options = {
            "version": _CSV_VERSION,
            "root": os.path.abspath(root),
            "split": split,
            "sample_rate": sample_rate,
            "mode": mode,
            "mixture_type": mixture_type,
            "folders": folders,
            "metadata_mtime_ns": os.stat(metadata).st_mtime_ns,
            "metadata_size": os.stat(metadata).st_size,
        }
        csv_path = csv_paths[split]
        sidecar = csv_path + ".json"
        if os.path.isfile(csv_path) and read_json(sidecar) == options:
            logger.info("%s is up to date, skipping the preparation", csv_path)
            continue
        rows = read_metadata(metadata)
        rel_folder = "/".join([rate_folder(sample_rate), mode, split])
        table = []
        for mixture_id, length in tqdm(rows, desc=f"Checking {split}", dynamic_ncols=True):
            row = {"ID": mixture_id, "duration": f"{length / sample_rate:.6f}"}
            for column, folder in zip(columns, folders):
                rel_path = f"{rel_folder}/{folder}/{mixture_id}.wav"
                path = os.path.join(root, *rel_path.split("/"))
                _check_wav(path, sample_rate, length, mixture_id, metadata)
                row[column] = f"$data_root/{rel_path}"
            table.append(row)
        write_csv(csv_path, ["ID", "duration"] + columns, table)
        write_json(sidecar, options)
        logger.info("Wrote %s (%d mixtures)", csv_path, len(table))
    return csv_paths


def find_root(data_folder: str, n_spks: int, sample_rate: int, mode: str) -> str:
    """The LibriMix folder (what ``$data_root`` stands for in the CSVs).

    Arguments
    ---------
    data_folder : str
        The folder holding ``Libri2Mix`` or the ``Libri2Mix`` folder itself.
    n_spks : int
        Number of speakers (2: ``Libri2Mix``, 3: ``Libri3Mix``).
    sample_rate : int
        Selects ``wav8k`` or ``wav16k``.
    mode : str
        "min" or "max".

    Returns
    -------
    str
        ``data_folder`` if it holds ``wav8k/min`` (for 8 kHz, "min"),
        else ``data_folder/Libri2Mix``.

    Raises
    ------
    LibriMixNotFoundError
        If neither holds it; the message lists the folders that do exist.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> os.makedirs(os.path.join(tmp_dir.name, "Libri2Mix", "wav8k", "min"))
    >>> find_root(tmp_dir.name, 2, 8000, "min") == os.path.join(tmp_dir.name, "Libri2Mix")
    True
    >>> find_root(tmp_dir.name, 2, 16000, "min")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    umamba.data.librimix.LibriMixNotFoundError: No Libri2Mix/wav16k/min under ... wav8k)
    >>> tmp_dir.cleanup()
    """
    if not os.path.isdir(data_folder):
        raise LibriMixNotFoundError(f"LibriMix data_folder '{data_folder}' does not exist")
    if os.path.isdir(os.path.join(data_folder, rate_folder(sample_rate), mode)):
        return data_folder
    name = corpus_name(n_spks)
    _check_folder(data_folder, data_folder, [name, rate_folder(sample_rate), mode])
    return os.path.join(data_folder, name)


def _check_folder(data_folder: str, root: str, parts: List[str]) -> None:
    """Raises LibriMixNotFoundError for a missing ``root/parts``, listing what exists instead."""
    path = os.path.join(root, *parts)
    if os.path.isdir(path):
        return
    existing = root
    for part in parts:
        if not os.path.isdir(os.path.join(existing, part)):
            break
        existing = os.path.join(existing, part)
    wanted = "/".join(os.path.relpath(path, data_folder).split(os.sep))
    found = sorted(
        entry for entry in os.listdir(existing) if os.path.isdir(os.path.join(existing, entry))
    )
    where = "/".join(os.path.relpath(existing, data_folder).split(os.sep))
    where = "it" if where == "." else where
    holds = f"{where} holds the folders: {', '.join(found)}" if found else f"{where} has no folders"
    raise LibriMixNotFoundError(f"No {wanted} under '{data_folder}' ({holds})")


def read_metadata(metadata: str) -> List[tuple]:
    """Reads (mixture_ID, length) pairs from a LibriMix metadata CSV, columns by name."""
    with open(metadata, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("mixture_ID", "length") if c not in (reader.fieldnames or [])]
        if missing:
            raise LibriMixFormatError(
                f"Metadata file '{metadata}' has no column {', '.join(missing)} "
                f"(header: {reader.fieldnames})"
            )
        rows, seen = [], set()
        for row in reader:
            where = f"metadata file '{metadata}', line {reader.line_num}"
            if None in row:
                raise LibriMixFormatError(f"Row at {where} has more fields than the header")
            empty = [column for column, value in row.items() if not value]
            if empty:
                raise LibriMixFormatError(
                    f"Row at {where} (mixture '{row['mixture_ID']}') has no value for "
                    f"column {', '.join(empty)}"
                )
            try:
                length = int(row["length"])
            except ValueError:
                length = 0
            if length <= 0:
                raise LibriMixFormatError(
                    f"Row at {where} (mixture '{row['mixture_ID']}') has an invalid length "
                    f"'{row['length']}' (expected a positive number of samples)"
                )
            if row["mixture_ID"] in seen:
                raise LibriMixFormatError(f"Row at {where} repeats mixture '{row['mixture_ID']}'")
            seen.add(row["mixture_ID"])
            rows.append((row["mixture_ID"], length))
    return sorted(rows)


def _check_wav(path: str, sample_rate: int, length: int, mixture_id: str, metadata: str) -> None:
    """Checks that the file of a mixture exists, is mono and has the sample rate and length of the metadata."""
    if not os.path.isfile(path):
        raise LibriMixNotFoundError(
            f"Mixture '{mixture_id}' (listed in '{metadata}') has no file '{path}'"
        )
    info = audio_info(path)
    if info.sample_rate != sample_rate:
        raise LibriMixFormatError(
            f"'{path}' (mixture '{mixture_id}') has sample rate {info.sample_rate} Hz, "
            f"expected {sample_rate} Hz"
        )
    if info.channels != 1:
        raise LibriMixFormatError(
            f"'{path}' (mixture '{mixture_id}') has {info.channels} channels, expected mono"
        )
    if info.frames != length:  # LibriMix cuts or pads every file of a mixture to its length
        raise LibriMixFormatError(
            f"'{path}' (mixture '{mixture_id}') has {info.frames} samples, but '{metadata}' gives "
            f"the mixture {length} (a truncated or foreign file?)"
        )


def write_csv(path: str, fieldnames: Sequence[str], rows: Sequence[dict]) -> None:
    """Writes a CSV file atomically from a list of dicts.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "t.csv")
    >>> write_csv(path, ["ID", "duration"], [{"ID": "a", "duration": 1.5}])
    >>> open(path).read().split()
    ['ID,duration', 'a,1.5']
    >>> tmp_dir.cleanup()
    """
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


def write_json(path: str, content: dict) -> None:
    """Writes a small JSON file (options, markers) atomically.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "options.json")
    >>> write_json(path, {"mode": "min"})
    >>> read_json(path)
    {'mode': 'min'}
    >>> tmp_dir.cleanup()
    """
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)


def read_json(path: str) -> Optional[dict]:
    """The content of a JSON file, or None if it is missing or unreadable.

    Example
    -------
    >>> read_json("no-such-file.json") is None
    True
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
