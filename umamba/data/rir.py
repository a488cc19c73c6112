"""A bank of simulated room impulse responses (RIRs) for two-talker reverberation.

Each room of the bank is a shoebox with one microphone and ``n_src`` sources
at different positions, drawn like WHAMR!'s rooms:

- room: length and width U[5, 10] m, height U[3, 4] m;
- microphone and sources at heights U[0.9, 1.8] m, at least 0.5 m from the walls;
- source-microphone distance U[0.66, 2] m (3-D), azimuth U[0, 2 pi);
- target T60 U[0.1, 1.0] s; the wall absorption is ``pra.inverse_sabine(rt60, dims)``.
  Where Sabine's formula needs an absorption above 1 (a T60 too short for the
  room; below ~0.11 s in every room of these sizes), the whole room, T60
  included, is drawn again. The T60 is thus uniform over the feasible pairs.

The RIRs are simulated by pyroomacoustics' hybrid method: image sources up to
order :data:`ISM_ORDER` (3) for the early reflections and ray tracing for the
late tail, without air absorption. It takes 0.05-0.5 s per room and sample
rate and about 10 MB of memory, where the full image-source model takes up to
1.6 s and 1 GB at T60 = 1 s, for no better T60 accuracy (pyroomacoustics'
high-pass filter at 10 Hz is kept). Shoebox rooms decay more slowly than
Sabine's formula predicts: the measured T60 (Schroeder backward integration,
T30 extrapolated to 60 dB) is close to the target up to ~0.5 s and grows to
~1.3 s at a 1.0 s target, with both methods. Both values are recorded.

Every RIR is paired with its direct path: the fractional-delay filter that
pyroomacoustics puts at the arrival time of the direct sound (a Hann-windowed
sinc of :data:`FRAC_DELAY_LENGTH` taps, delayed by ``FRAC_DELAY_LENGTH // 2 +
distance / c * fs`` samples), computed here analytically. Both are shifted by
the same integer number of samples, so that the direct path peaks at index
:data:`DIRECT_INDEX`, and scaled by the distance, so that the direct path has
unit gain (pyroomacoustics attenuates it by ``1 / distance``). Hence
``dry * rir`` (the reverberant source) and ``dry * rir_direct`` (the anechoic
target: the dry source, delayed by ``DIRECT_INDEX`` samples plus a fraction in
[-0.5, 0.5)) are aligned sample-exactly.

Bank layout (``make_rir_bank``)::

    <out>/rirs/<sr>/<room_id>.wav         channel k: the RIR of source k (float32)
    <out>/rirs/<sr>/<room_id>_direct.wav  channel k: its direct path
    <out>/rirs_<sr>.csv                   SpeechBrain CSV of the RIRs (for AddReverb)
    <out>/rooms.csv                       geometry, absorption, target and measured T60
    <out>/rooms/<room_id>.json            per-room record, written last (resuming)

Authors
 * U-Mamba-Net contributors 2025
"""

import math
import multiprocessing
import os
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyroomacoustics as pra
from tqdm import tqdm

from speechbrain.utils.logger import get_logger
from umamba.data.audio import AudioError, PathLike, audio_info, read_channels, write_audio
from umamba.data.librimix import read_json, write_csv, write_json

logger = get_logger(__name__)

ROOM_SIZE = ((5.0, 10.0), (5.0, 10.0), (3.0, 4.0))
"""Ranges of the room length, width and height (m)."""
HEIGHT = (0.9, 1.8)
"""Range of the microphone and source heights (m)."""
DISTANCE = (0.66, 2.0)
"""Range of the source-microphone distance (m)."""
RT60 = (0.1, 1.0)
"""Range of the target T60 (s)."""
WALL_MARGIN = 0.5
"""Smallest distance from the microphone and the sources to a wall (m)."""
ISM_ORDER = 3
"""Image-source order of the hybrid simulation; ray tracing models the rest."""
FRAC_DELAY_LENGTH = pra.constants.get("frac_delay_length")
"""Taps of pyroomacoustics' fractional-delay filter (81)."""
DIRECT_INDEX = FRAC_DELAY_LENGTH // 2 + 1
"""Index of the direct-path peak in every RIR of the bank (41)."""
DIRECT_LENGTH = FRAC_DELAY_LENGTH + 1
"""Length of the direct-path RIRs (82): the whole filter, whatever its fractional delay."""
# Bumped whenever the simulated RIRs change, so older rooms are rebuilt.
_VERSION = 1


class Room(NamedTuple):
    """A shoebox room with one microphone and several sources (lengths in m)."""

    room_id: str
    dims: Tuple[float, float, float]
    mic: Tuple[float, float, float]
    sources: Tuple[Tuple[float, float, float], ...]
    rt60: float  # target T60 (s)
    absorption: float  # energy absorption of every wall, from Sabine's formula
    full_ism_order: int  # image-source order a pure ISM would need for the T60
    seed: int  # seeds the ray tracing

    @property
    def distances(self) -> Tuple[float, ...]:
        """The source-microphone distances (m)."""
        return tuple(float(np.linalg.norm(np.subtract(s, self.mic))) for s in self.sources)


def room_id(index: int) -> str:
    """The ID of room ``index`` of a bank.

    Example
    -------
    >>> room_id(7)
    'room_00007'
    """
    return f"room_{index:05d}"


def sample_room(seed: int, index: int, n_src: int = 2) -> Room:
    """Draws room ``index`` of the bank with seed ``seed`` (see the module docstring).

    The room depends only on ``(seed, index, n_src)``, so rooms can be drawn
    in any order and in parallel.

    Arguments
    ---------
    seed : int
        The seed of the bank (non-negative).
    index : int
        The room number (non-negative).
    n_src : int
        Number of sources.

    Returns
    -------
    Room

    Example
    -------
    >>> room = sample_room(0, 3)
    >>> room.room_id, len(room.sources)
    ('room_00003', 2)
    >>> all(0.66 <= d <= 2.0 for d in room.distances) and 0.1 <= room.rt60 <= 1.0
    True
    >>> sample_room(0, 3) == room
    True
    """
    if seed < 0 or index < 0 or n_src < 1:
        raise ValueError(
            f"seed and index must be >= 0 and n_src >= 1, got seed={seed}, index={index}, "
            f"n_src={n_src}"
        )
    rng = np.random.default_rng([seed, index])
    low, high = np.array(ROOM_SIZE).T
    while True:
        dims = rng.uniform(low, high)
        rt60 = rng.uniform(*RT60)
        try:
            absorption, full_ism_order = pra.inverse_sabine(rt60, dims)
        except ValueError:  # absorption > 1: the room cannot be that dry
            continue
        break
    mic = np.append(rng.uniform(WALL_MARGIN, dims[:2] - WALL_MARGIN), rng.uniform(*HEIGHT))
    sources = []
    while len(sources) < n_src:
        # Only the height and the azimuth are drawn again when they do not fit,
        # so that the distance stays uniform.
        distance = rng.uniform(*DISTANCE)
        height = rng.uniform(*HEIGHT)
        while abs(height - mic[2]) >= distance:
            height = rng.uniform(*HEIGHT)
        radius = math.sqrt(distance**2 - (height - mic[2]) ** 2)
        xy = np.full(2, -1.0)
        while np.any(xy < WALL_MARGIN) or np.any(xy > dims[:2] - WALL_MARGIN):
            azimuth = rng.uniform(0.0, 2 * np.pi)
            xy = mic[:2] + radius * np.array([math.cos(azimuth), math.sin(azimuth)])
        sources.append(tuple(float(v) for v in np.append(xy, height)))
    return Room(
        room_id=room_id(index),
        dims=tuple(float(v) for v in dims),
        mic=tuple(float(v) for v in mic),
        sources=tuple(sources),
        rt60=float(rt60),
        absorption=float(absorption),
        full_ism_order=int(full_ism_order),
        seed=int(rng.integers(2**63)),
    )


def fractional_delay(delay: float, length: int) -> np.ndarray:
    """pyroomacoustics' fractional-delay filter: a Hann-windowed sinc centred at ``delay``.

    The window has :data:`FRAC_DELAY_LENGTH` taps and starts
    ``FRAC_DELAY_LENGTH // 2`` samples before ``floor(delay)``, as in
    pyroomacoustics' ``rir_builder`` (which interpolates the sinc from a table).

    Arguments
    ---------
    delay : float
        The delay in samples; the filter must fit: ``delay >= FRAC_DELAY_LENGTH // 2``.
    length : int
        Length of the returned filter.

    Returns
    -------
    numpy.ndarray
        The filter, shape [length], float64.

    Example
    -------
    >>> h = fractional_delay(41.0, DIRECT_LENGTH)
    >>> int(np.argmax(h)), float(h[41]), bool(abs(h).sum() - h[41] < 1e-12)  # integer delay
    (41, 1.0, True)
    >>> round(float(fractional_delay(41.3, DIRECT_LENGTH).sum()), 3)  # unit gain at DC
    1.0
    """
    start = math.floor(delay) - FRAC_DELAY_LENGTH // 2
    if start < 0 or start + FRAC_DELAY_LENGTH > length:
        raise ValueError(
            f"A fractional-delay filter at {delay} samples does not fit in {length} samples"
        )
    n = np.arange(length)
    window = np.zeros(length)
    window[start : start + FRAC_DELAY_LENGTH] = np.hanning(FRAC_DELAY_LENGTH)
    return window * np.sinc(n - delay)


def simulate_room(room: Room, sample_rate: int) -> Tuple[np.ndarray, np.ndarray]:
    """The RIRs of the sources of a room and their direct paths, aligned and at unit gain.

    Runs the hybrid simulation (image sources up to :data:`ISM_ORDER`, ray
    tracing) with one pyroomacoustics thread and its random generators seeded
    from ``(room.seed, sample_rate)``, so the result does not depend on the
    machine or on what ran before. This reseeds pyroomacoustics' global
    random generators.

    Arguments
    ---------
    room : Room
        The room.
    sample_rate : int
        The sample rate in Hz.

    Returns
    -------
    rirs : numpy.ndarray
        The RIRs, shape [n_src, time] (zero-padded to the longest), float32,
        direct path at :data:`DIRECT_INDEX` with unit gain.
    direct : numpy.ndarray
        The direct paths, shape [n_src, DIRECT_LENGTH], float32.

    Example
    -------
    >>> rirs, direct = simulate_room(sample_room(0, 0), 8000)
    >>> rirs.shape[0], direct.shape
    (2, (2, 82))
    >>> np.argmax(abs(rirs), axis=1).tolist(), np.argmax(abs(direct), axis=1).tolist()
    ([41, 41], [41, 41])
    """
    threads = pra.constants.get("num_threads")
    pra.constants.set("num_threads", 1)  # the threads' partial sums depend on their number
    try:
        seeds = np.random.SeedSequence([room.seed, sample_rate])
        pra.random.seed(numpy=seeds, libroom=int(seeds.generate_state(1, np.uint64)[0]))
        shoebox = pra.ShoeBox(
            room.dims,
            fs=sample_rate,
            materials=pra.Material(room.absorption),
            max_order=ISM_ORDER,
            ray_tracing=True,
            air_absorption=False,
        )
        shoebox.add_microphone(room.mic)
        for source in room.sources:
            shoebox.add_source(source)
        shoebox.compute_rir()
    finally:
        pra.constants.set("num_threads", threads)
    rirs, direct = [], np.zeros((len(room.sources), DIRECT_LENGTH))
    for k, distance in enumerate(room.distances):
        arrival = FRAC_DELAY_LENGTH // 2 + distance / shoebox.c * sample_rate
        shift = math.floor(arrival + 0.5) - DIRECT_INDEX
        rirs.append(shoebox.rir[0][k][shift:] * distance)
        direct[k] = fractional_delay(arrival - shift, DIRECT_LENGTH)
    length = max(rir.size for rir in rirs)
    rirs = np.stack([np.pad(rir, (0, length - rir.size)) for rir in rirs])
    return rirs.astype(np.float32), direct.astype(np.float32)


def measure_t60(rir: np.ndarray, sample_rate: int) -> float:
    """The T60 of an RIR: Schroeder backward integration, T30 extrapolated to 60 dB.

    Example
    -------
    >>> t = np.arange(8000) / 8000
    >>> rir = np.random.default_rng(0).standard_normal(8000) * 10 ** (-3 * t / 0.5)
    >>> round(measure_t60(rir, 8000), 1)  # exponential decay of 60 dB in 0.5 s
    0.5
    """
    return float(pra.experimental.measure_rt60(rir, fs=sample_rate, decay_db=30))


def write_rir(path: PathLike, rirs: np.ndarray, sample_rate: int) -> None:
    """Writes the RIRs of a room atomically, one channel per source, as float32 wav.

    Arguments
    ---------
    path : str or os.PathLike
        The wav file.
    rirs : numpy.ndarray
        Shape [n_src, time].
    sample_rate : int
        The sample rate in Hz.

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp_dir.name, "r.wav")
    >>> write_rir(path, np.eye(2, 3), 8000)
    >>> read_rir(path, 8000).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    >>> tmp_dir.cleanup()
    """
    rirs = np.asarray(rirs, dtype=np.float32)
    if rirs.ndim != 2:
        raise AudioError(f"Cannot write RIRs '{os.fspath(path)}': expected [n_src, time], got shape {rirs.shape}")
    write_audio(path, rirs.T, sample_rate)


def read_rir(path: PathLike, sample_rate: Optional[int] = None) -> np.ndarray:
    """Reads the RIRs of a room, shape [n_src, time], float32.

    Raises
    ------
    AudioError
        If the file is missing, unreadable, or not at ``sample_rate`` (when given).

    Example
    -------
    See :func:`write_rir`.
    """
    return read_channels(path, sample_rate).numpy().T.copy()


def rir_paths(out_folder: str, room: str, sample_rate: int) -> Tuple[str, str]:
    """The RIR file and the direct-path file of a room in a bank.

    Example
    -------
    >>> [p.replace(os.sep, "/") for p in rir_paths("bank", "room_00000", 8000)]
    ['bank/rirs/8000/room_00000.wav', 'bank/rirs/8000/room_00000_direct.wav']
    """
    folder = os.path.join(out_folder, "rirs", str(sample_rate))
    return os.path.join(folder, f"{room}.wav"), os.path.join(folder, f"{room}_direct.wav")


def parallel_imap(
    function: Callable, tasks: Sequence, jobs: Optional[int], desc: str
) -> Iterator:
    """``map(function, tasks)`` in ``jobs`` processes, in any order, with a progress bar.

    With one job (or one task) everything runs in this process.

    Example
    -------
    >>> sorted(parallel_imap(abs, [-2, 1, -3], jobs=2, desc="abs"))
    [1, 2, 3]
    """
    jobs = min(jobs or os.cpu_count() or 1, len(tasks))
    with tqdm(total=len(tasks), desc=desc, dynamic_ncols=True) as progress:
        if jobs <= 1:
            for task in tasks:
                yield function(task)
                progress.update()
            return
        with multiprocessing.Pool(jobs) as pool:
            for result in pool.imap_unordered(function, tasks):
                yield result
                progress.update()


def make_rir_bank(
    out_folder: str,
    n_rooms: int = 1000,
    sample_rates: Sequence[int] = (8000, 16000),
    n_src: int = 2,
    seed: int = 0,
    jobs: Optional[int] = None,
) -> Dict[int, str]:
    """Simulates (or completes) a bank of rooms; see the module docstring for the layout.

    Room ``i`` depends only on ``(seed, i, n_src)``, so the files are the same
    whatever ``jobs`` is and however often the build was interrupted. Every
    file is written atomically, and a room counts as done only when its JSON
    record (written last) matches the current settings and all its files are
    readable with the recorded shape: a rerun simulates only the missing rooms.

    Arguments
    ---------
    out_folder : str
        The bank folder.
    n_rooms : int
        Number of rooms (``room_00000`` ...).
    sample_rates : sequence of int
        The sample rates (Hz) to simulate, with the same rooms.
    n_src : int
        Sources per room: the channels of each RIR file.
    seed : int
        The random seed.
    jobs : int, optional
        Worker processes (default: all CPUs).

    Returns
    -------
    dict
        Sample rate -> SpeechBrain CSV of the RIRs (``ID, duration, wav,
        wav_format, wav_opts``, paths under ``$rir_root``, the bank folder).

    Example
    -------
    >>> import tempfile
    >>> tmp_dir = tempfile.TemporaryDirectory()
    >>> csvs = make_rir_bank(tmp_dir.name, n_rooms=2, sample_rates=[8000], jobs=1)
    >>> lines = open(csvs[8000]).read().splitlines()
    >>> lines[0], lines[1].split(",")[2]
    ('ID,duration,wav,wav_format,wav_opts', '$rir_root/rirs/8000/room_00000.wav')
    >>> tmp_dir.cleanup()
    """
    sample_rates = sorted(set(int(sr) for sr in sample_rates))
    if n_rooms < 1 or not sample_rates or min(sample_rates) <= 0:
        raise ValueError(
            f"n_rooms must be >= 1 and sample_rates positive, got {n_rooms}, {sample_rates}"
        )
    settings = {
        "version": _VERSION,
        "pyroomacoustics": pra.__version__,
        "seed": seed,
        "n_src": n_src,
        "sample_rates": sample_rates,
    }
    if seed < 0 or n_src < 1:
        raise ValueError(f"seed must be >= 0 and n_src >= 1, got seed={seed}, n_src={n_src}")
    todo = [i for i in range(n_rooms) if _room_record(out_folder, room_id(i), settings) is None]
    logger.info(
        "RIR bank %s: %d rooms to simulate, %d done", out_folder, len(todo), n_rooms - len(todo)
    )
    tasks = [(out_folder, seed, i, settings) for i in todo]
    for _ in parallel_imap(_build_room, tasks, jobs, desc="RIR bank"):
        pass

    records = []
    for i in range(n_rooms):
        record = _room_record(out_folder, room_id(i), settings)
        if record is None:
            raise RuntimeError(f"Room {room_id(i)} of '{out_folder}' is incomplete after its build")
        records.append(record)
    _write_rooms_csv(os.path.join(out_folder, "rooms.csv"), records, sample_rates)
    csvs = {}
    for sr in sample_rates:
        csvs[sr] = os.path.join(out_folder, f"rirs_{sr}.csv")
        rows = [
            {
                "ID": r["room_id"],
                "duration": f"{r['frames'][str(sr)] / sr:.6f}",
                "wav": f"$rir_root/rirs/{sr}/{r['room_id']}.wav",
                "wav_format": "wav",
                "wav_opts": "",
            }
            for r in records
        ]
        write_csv(csvs[sr], ["ID", "duration", "wav", "wav_format", "wav_opts"], rows)
    logger.info("Wrote the RIR bank %s (%d rooms)", out_folder, n_rooms)
    return csvs


def _record_path(out_folder: str, room: str) -> str:
    return os.path.join(out_folder, "rooms", f"{room}.json")


def _build_room(task: tuple) -> str:
    """Simulates one room at every sample rate and writes its files, the JSON record last."""
    out_folder, seed, index, settings = task
    room = sample_room(seed, index, settings["n_src"])
    frames, rt60 = {}, {}
    for sr in settings["sample_rates"]:
        rirs, direct = simulate_room(room, sr)
        rir_path, direct_path = rir_paths(out_folder, room.room_id, sr)
        write_rir(rir_path, rirs, sr)
        write_rir(direct_path, direct, sr)
        frames[str(sr)] = rirs.shape[1]
        rt60[str(sr)] = [measure_t60(rir, sr) for rir in rirs]
    record = dict(room._asdict(), distances=room.distances, frames=frames, rt60_measured=rt60)
    write_json(_record_path(out_folder, room.room_id), {"settings": settings, "room": record})
    return room.room_id


def _room_record(out_folder: str, room: str, settings: dict) -> Optional[dict]:
    """The record of a finished room, or None if it must be (re)built."""
    content = read_json(_record_path(out_folder, room))
    if not content or content.get("settings") != settings:
        return None
    record = content["room"]
    for sr in settings["sample_rates"]:
        expected = [record["frames"][str(sr)], DIRECT_LENGTH]
        for path, frames in zip(rir_paths(out_folder, room, sr), expected):
            try:
                info = audio_info(path)
            except AudioError:
                return None
            if (info.frames, info.sample_rate, info.channels) != (frames, sr, settings["n_src"]):
                return None
    return record


def _write_rooms_csv(path: str, records: List[dict], sample_rates: Iterable[int]) -> None:
    """Writes ``rooms.csv``: one row per room, sources numbered from 1."""
    n_src = len(records[0]["sources"])
    fields = ["room_id", "room_x", "room_y", "room_z", "mic_x", "mic_y", "mic_z"]
    fields += [f"src{k + 1}_{axis}" for k in range(n_src) for axis in "xyz"]
    fields += [f"distance_{k + 1}" for k in range(n_src)]
    fields += ["rt60_target"]
    fields += [f"rt60_{sr}_src{k + 1}" for sr in sample_rates for k in range(n_src)]
    fields += ["absorption", "max_order", "full_ism_order"]
    rows = []
    for r in records:
        values = [r["room_id"], *r["dims"], *r["mic"]]
        values += [v for source in r["sources"] for v in source]
        values += [*r["distances"], r["rt60"]]
        values += [t for sr in sample_rates for t in r["rt60_measured"][str(sr)]]
        values += [r["absorption"], ISM_ORDER, r["full_ism_order"]]
        rows.append(
            {f: (f"{v:.6g}" if isinstance(v, float) else v) for f, v in zip(fields, values)}
        )
    write_csv(path, fields, rows)
