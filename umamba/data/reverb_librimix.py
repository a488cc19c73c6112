"""A static noisy-reverberant Libri2Mix, built from Libri2Mix and a bank of RIRs.

For each mixture of a split (in the order of the sorted mixture IDs), one
room of the bank is chosen from a hash of ``(seed, mixture_ID)``, so the
choice does not depend on the other mixtures. Each source of Libri2Mix
(``s1``, ``s2``: already at their LibriMix levels) is convolved with its own
RIR of that room (channel 1 and 2 of the bank's multichannel files), and with
the matching direct path for the anechoic target; both results start at the
direct-path peak and keep the original length, so the anechoic target is the
source up to a sub-sample delay, aligned sample-exactly with its reverberant
version. The noise (WHAM!, a real recording) is added unchanged. If any of
the signals peaks above 0.9, all of them are scaled by the same factor, as
LibriMix does.

New folders beside the LibriMix ones, in ``wav{8k,16k}/{min,max}/<split>/``:

- ``mix_both_reverb`` = ``s1_reverb + s2_reverb + noise_reverb``;
- ``mix_clean_reverb`` = ``s1_reverb + s2_reverb``;
- ``s1_reverb``, ``s2_reverb``: the reverberant sources;
- ``s1_anechoic``, ``s2_anechoic``: the anechoic targets (the default targets);
- ``noise_reverb``: the noise as it is in ``mix_both_reverb`` (the Libri2Mix
  noise, rescaled with the rest when the mixture would clip; not reverberant).

and in ``metadata/``: ``mixture_<split>_mix_both_reverb.csv`` and
``mixture_<split>_mix_clean_reverb.csv`` (LibriMix schema, anechoic sources),
``reverb_<split>.csv`` (the room of each mixture, its target and measured T60)
and ``reverb_<split>.json`` (the build settings). Files are 16-bit PCM, like
LibriMix. :func:`umamba.data.librimix.prepare_librimix` reads the result with
``mix_folder="mix_both_reverb"`` and ``source_folders=("s1_anechoic",
"s2_anechoic")`` (or ``("s1_reverb", "s2_reverb")`` for reverberant targets).

Authors
 * U-Mamba-Net contributors 2025
"""

import csv
import hashlib
import os
import shutil
from typing import Dict, Optional, Sequence

import numpy as np
from scipy.signal import fftconvolve

from speechbrain.utils.logger import get_logger
from umamba.data.audio import AudioError, audio_info, read_audio, write_audio
from umamba.data.librimix import (
    METADATA_COLUMNS,
    NOISE_FOLDER,
    LibriMixNotFoundError,
    read_metadata,
    find_root,
    metadata_path,
    rate_folder,
    read_json,
    write_csv,
    write_json,
)
from umamba.data.rir import parallel_imap, read_rir, rir_paths

logger = get_logger(__name__)

SOURCE_FOLDERS = ("s1", "s2")
REVERB_FOLDERS = {
    "mix_both": "mix_both_reverb",
    "mix_clean": "mix_clean_reverb",
    "s1": "s1_reverb",
    "s2": "s2_reverb",
    "s1_anechoic": "s1_anechoic",
    "s2_anechoic": "s2_anechoic",
    "noise": "noise_reverb",
}
"""The folder of each written signal."""
MAX_PEAK = 0.9
# Bumped whenever the generated audio changes, so older sets are rebuilt.
_VERSION = 1


def choose_room(mixture_id: str, room_ids: Sequence[str], seed: int = 0) -> str:
    """The room of a mixture: a hash of ``(seed, mixture_id)`` picks one of ``room_ids``.

    Example
    -------
    >>> rooms = ["room_00000", "room_00001", "room_00002"]
    >>> choose_room("19-198-0001_26-495-0002", rooms) in rooms
    True
    >>> choose_room("a", rooms, seed=1) == choose_room("a", rooms, seed=1)
    True
    """
    digest = hashlib.sha256(f"{seed}/{mixture_id}".encode("utf-8")).digest()
    return room_ids[int.from_bytes(digest[:8], "little") % len(room_ids)]


def reverberate_mixture(
    sources: np.ndarray, noise: np.ndarray, rirs: np.ndarray, direct: np.ndarray
) -> Dict[str, np.ndarray]:
    """Reverberates the sources of one mixture and builds every signal of the set.

    Arguments
    ---------
    sources : numpy.ndarray
        The dry sources at their mixture levels, shape [2, time].
    noise : numpy.ndarray
        The noise, shape [time].
    rirs : numpy.ndarray
        One RIR per source, shape [>= 2, rir_time] (extra channels are ignored).
    direct : numpy.ndarray
        Their direct paths, shape [>= 2, direct_time].

    Returns
    -------
    dict
        The keys of :data:`REVERB_FOLDERS` -> signals of shape [time], all
        scaled by the same factor if any of them peaks above 0.9.

    Example
    -------
    >>> sources = np.random.default_rng(0).uniform(-0.1, 0.1, (2, 100))
    >>> direct = np.zeros((2, 5)); direct[:, 2] = 1.0  # direct path peaks at 2
    >>> rirs = direct.copy(); rirs[:, 4] = 0.5  # one echo, 2 samples later
    >>> out = reverberate_mixture(sources, np.zeros(100), rirs, direct)
    >>> bool(np.allclose(out["s1_anechoic"], sources[0]))
    True
    >>> bool(np.allclose(out["s2"][2:], sources[1][2:] + 0.5 * sources[1][:-2]))
    True
    """
    n_src, length = sources.shape
    if rirs.shape[0] < n_src or direct.shape[0] < n_src:
        raise ValueError(
            f"{n_src} sources need as many RIRs, got {rirs.shape[0]} RIRs and "
            f"{direct.shape[0]} direct paths"
        )
    signals = {}
    for k in range(n_src):
        start = int(np.argmax(np.abs(direct[k])))
        signals[f"s{k + 1}"] = fftconvolve(sources[k], rirs[k])[start : start + length]
        signals[f"s{k + 1}_anechoic"] = fftconvolve(sources[k], direct[k])[start : start + length]
    signals["mix_clean"] = sum(signals[f"s{k + 1}"] for k in range(n_src))
    signals["mix_both"] = signals["mix_clean"] + noise
    signals["noise"] = np.asarray(noise, dtype=float)
    peak = max(np.abs(signal).max() for signal in signals.values())
    if peak > MAX_PEAK:
        signals = {name: signal * (MAX_PEAK / peak) for name, signal in signals.items()}
    return signals


def make_reverb_librimix(
    librimix_folder: str,
    rir_bank: str,
    sample_rate: int = 8000,
    mode: str = "min",
    splits: Sequence[str] = ("train-360", "dev", "test"),
    seed: int = 0,
    jobs: Optional[int] = None,
) -> Dict[str, str]:
    """Builds (or completes) the noisy-reverberant copy of Libri2Mix splits.

    See the module docstring for what is written. The build is deterministic
    (same inputs and arguments: identical files, whatever ``jobs``) and
    resumable: a mixture whose files all exist with the right length is
    skipped, unless the settings recorded in ``reverb_<split>.json`` (seed,
    version, the bank's CSVs) changed, in which case the split's reverberant
    folders are deleted and rebuilt.

    Arguments
    ---------
    librimix_folder : str
        The folder holding ``Libri2Mix``, or the ``Libri2Mix`` folder itself,
        with the ``s1``, ``s2`` and ``noise`` folders and the ``mix_both`` metadata.
    rir_bank : str
        A bank from :func:`umamba.data.rir.make_rir_bank` with ``sample_rate``.
    sample_rate : int
        Selects ``wav8k`` or ``wav16k``.
    mode : str
        "min" or "max".
    splits : sequence of str
        The splits to build.
    seed : int
        Seeds the choice of the rooms.
    jobs : int, optional
        Worker processes (default: all CPUs).

    Returns
    -------
    dict
        Split -> its ``mixture_<split>_mix_both_reverb.csv``.

    Example
    -------
    >>> import tempfile
    >>> from umamba.data.demo_corpus import make_demo_corpus
    >>> from umamba.data.rir import make_rir_bank
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> root = make_demo_corpus(tmp_dir.name, n_train=1, n_valid=1, n_test=1, seconds=1.0,
    ...                         voices="synthetic")
    >>> bank = os.path.join(tmp_dir.name, "bank")
    >>> _ = make_rir_bank(bank, n_rooms=2, sample_rates=[8000], jobs=1)
    >>> csvs = make_reverb_librimix(root, bank, splits=["dev"], jobs=1)
    >>> folders = os.listdir(os.path.join(root, "wav8k", "min", "dev"))
    >>> sorted(f for f in folders if f.endswith(("_reverb", "_anechoic")))
    ... # doctest: +NORMALIZE_WHITESPACE
    ['mix_both_reverb', 'mix_clean_reverb', 'noise_reverb', 's1_anechoic', 's1_reverb',
     's2_anechoic', 's2_reverb']
    >>> tmp_dir.cleanup()
    """
    root = find_root(librimix_folder, 2, sample_rate, mode)
    base = os.path.join(root, rate_folder(sample_rate), mode)
    bank_csv = os.path.join(rir_bank, f"rirs_{sample_rate}.csv")
    rooms = _read_rooms(rir_bank, bank_csv, sample_rate)
    settings = {
        "version": _VERSION,
        "seed": seed,
        "sample_rate": sample_rate,
        "mode": mode,
        "bank": {
            name: _sha256(os.path.join(rir_bank, name))
            for name in (os.path.basename(bank_csv), "rooms.csv")
        },
    }
    room_ids = sorted(rooms)
    outputs = {}
    for split in splits:
        metadata = metadata_path(root, sample_rate, mode, split, "mix_both")
        if not os.path.isfile(metadata):
            raise LibriMixNotFoundError(f"Metadata file '{metadata}' not found")
        mixtures = read_metadata(metadata)
        folder = os.path.join(base, split)
        marker = os.path.join(base, "metadata", f"reverb_{split}.json")
        if read_json(marker) != settings:
            for name in REVERB_FOLDERS.values():
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            write_json(marker, settings)
        tasks = []
        for mixture_id, length in mixtures:
            outputs_of = _output_paths(folder, mixture_id)
            if not _is_done(outputs_of.values(), length, sample_rate):
                inputs = {
                    name: os.path.join(folder, name, f"{mixture_id}.wav")
                    for name in SOURCE_FOLDERS + (NOISE_FOLDER,)
                }
                room = choose_room(mixture_id, room_ids, seed)
                rirs = rir_paths(rir_bank, room, sample_rate)
                tasks.append((inputs, rirs, outputs_of, length, sample_rate))
        logger.info(
            "%s: %d mixtures to reverberate, %d done", split, len(tasks), len(mixtures) - len(tasks)
        )
        for _ in parallel_imap(_build_mixture, tasks, jobs, desc=f"Reverberating {split}"):
            pass
        outputs[split] = _write_metadata(root, split, sample_rate, mode, mixtures, rooms, seed)
    return outputs


def _output_paths(folder: str, mixture_id: str) -> Dict[str, str]:
    """The files written for one mixture, by key of :data:`REVERB_FOLDERS`."""
    return {
        name: os.path.join(folder, sub, f"{mixture_id}.wav") for name, sub in REVERB_FOLDERS.items()
    }


def _build_mixture(task: tuple) -> None:
    """Reads, reverberates and writes one mixture."""
    inputs, (rir_path, direct_path), outputs, length, sample_rate = task
    signals = []
    for name in SOURCE_FOLDERS + (NOISE_FOLDER,):
        signal = read_audio(inputs[name], sample_rate).numpy().astype(float)
        if signal.size != length:
            raise AudioError(
                f"'{inputs[name]}' has {signal.size} samples, its metadata says {length}"
            )
        signals.append(signal)
    rirs, direct = read_rir(rir_path, sample_rate), read_rir(direct_path, sample_rate)
    try:
        result = reverberate_mixture(np.stack(signals[:2]), signals[2], rirs, direct)
    except ValueError as err:
        raise AudioError(f"Cannot use the RIRs '{rir_path}' and '{direct_path}': {err}") from err
    for name, signal in result.items():
        write_audio(outputs[name], signal, sample_rate, subtype="PCM_16")


def _is_done(paths, length: int, sample_rate: int) -> bool:
    """True if every file exists, is readable and has ``length`` samples at ``sample_rate``."""
    for path in paths:
        try:
            info = audio_info(path)
        except AudioError:
            return False
        if (info.frames, info.sample_rate) != (length, sample_rate):
            return False
    return True


def _sha256(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"RIR bank file '{path}' not found (build the bank with make_rir_bank)"
        )
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_rooms(rir_bank: str, bank_csv: str, sample_rate: int) -> Dict[str, dict]:
    """Room ID -> its row of the bank's ``rooms.csv``, for the rooms in ``rirs_<sr>.csv``."""
    if not os.path.isfile(bank_csv):
        raise FileNotFoundError(
            f"RIR bank '{rir_bank}' has no '{os.path.basename(bank_csv)}': no RIRs at "
            f"{sample_rate} Hz (build it with --sample-rates {sample_rate})"
        )
    rooms_csv = os.path.join(rir_bank, "rooms.csv")
    with open(bank_csv, newline="", encoding="utf-8") as f:
        ids = [row["ID"] for row in csv.DictReader(f)]
    with open(rooms_csv, newline="", encoding="utf-8") as f:
        rooms = {row["room_id"]: row for row in csv.DictReader(f)}
    missing = sorted(set(ids) - set(rooms))
    if not ids or missing:
        raise ValueError(
            f"RIR bank '{rir_bank}': '{bank_csv}' lists no rooms or rooms missing from "
            f"'{rooms_csv}' ({', '.join(missing[:5])})"
        )
    return {room: rooms[room] for room in ids}


def _write_metadata(
    root: str,
    split: str,
    sample_rate: int,
    mode: str,
    mixtures: Sequence[tuple],
    rooms: Dict[str, dict],
    seed: int,
) -> str:
    """Writes the LibriMix metadata of the reverberant mixtures and ``reverb_<split>.csv``."""
    base = os.path.join(root, rate_folder(sample_rate), mode)
    room_ids = sorted(rooms)
    tables = {"mix_both": [], "mix_clean": []}
    reverb = []
    for mixture_id, length in mixtures:
        path = _output_paths(os.path.join(base, split), mixture_id)
        row = {
            "mixture_ID": mixture_id,
            "source_1_path": path["s1_anechoic"],
            "source_2_path": path["s2_anechoic"],
            "noise_path": path["noise"],
            "length": length,
        }
        for mixture_type, table in tables.items():
            row["mixture_path"] = path[mixture_type]
            table.append({column: row[column] for column in METADATA_COLUMNS[mixture_type]})
        room = rooms[choose_room(mixture_id, room_ids, seed)]
        reverb.append(
            {
                "mixture_ID": mixture_id,
                "room_id": room["room_id"],
                "rt60_target": room["rt60_target"],
                "rt60_src1": room[f"rt60_{sample_rate}_src1"],
                "rt60_src2": room[f"rt60_{sample_rate}_src2"],
                "distance_1": room["distance_1"],
                "distance_2": room["distance_2"],
            }
        )
    for mixture_type, table in tables.items():
        write_csv(
            metadata_path(root, sample_rate, mode, split, REVERB_FOLDERS[mixture_type]),
            METADATA_COLUMNS[mixture_type],
            table,
        )
    write_csv(os.path.join(base, "metadata", f"reverb_{split}.csv"), list(reverb[0]), reverb)
    return metadata_path(root, sample_rate, mode, split, REVERB_FOLDERS["mix_both"])
