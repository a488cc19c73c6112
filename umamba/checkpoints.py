"""Checkpoint folders that a killed run left half-written: find them, set them aside.

SpeechBrain writes a checkpoint folder in place, so a run killed while saving leaves a folder
that looks like the newest checkpoint but fails to load. The Brain sets such folders aside
before it recovers (:func:`set_aside_incomplete_checkpoints`), and export skips them.
"""

import logging
import os
import pathlib
import zipfile
from collections.abc import Iterable

import yaml
from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, PARAMFILE_EXT, Checkpointer
from speechbrain.utils.distributed import main_process_only

logger = logging.getLogger(__name__)

INCOMPLETE_PREFIX = "incomplete-"
"""Prefix of the checkpoint folders that :func:`set_aside_incomplete_checkpoints` moved away."""


def checkpoint_problem(path: str | os.PathLike, required: Iterable[str]) -> str | None:
    """What is missing or cut short in a SpeechBrain checkpoint folder; None when it is complete.

    SpeechBrain writes a checkpoint folder in place: its ``CKPT.yaml`` first, then one
    ``<name>.ckpt`` file per recoverable. A run killed meanwhile leaves a folder that SpeechBrain
    takes for the newest checkpoint, and fails to load. A folder is complete when its
    ``CKPT.yaml`` reads as a mapping, it has a file for each name in ``required``, and no file is
    cut short: none is empty, and each zip archive (what ``torch.save`` writes) ends with its
    central directory, which is written last. (SpeechBrain's small text files are written in one
    go when closed: empty or whole.)

    Arguments
    ---------
    path : str or os.PathLike
        A ``CKPT+...`` folder.
    required : iterable of str
        Recoverables that must have a file.

    Returns
    -------
    str or None
        The first problem found, e.g. ``"masknet.ckpt is cut short"``.

    Example
    -------
    >>> import torch
    >>> checkpointer = Checkpointer(getfixture("tmp_path"), {"model": torch.nn.Linear(2, 2)})
    >>> path = checkpointer.save_checkpoint(verbosity=logging.DEBUG).path
    >>> print(checkpoint_problem(path, ["model"]))
    None
    >>> checkpoint_problem(path, ["model", "optimizer"])
    'no optimizer.ckpt'
    >>> data = (path / "model.ckpt").read_bytes()
    >>> _ = (path / "model.ckpt").write_bytes(data[: len(data) // 2])
    >>> checkpoint_problem(path, ["model"])
    'model.ckpt is cut short'
    """
    path = pathlib.Path(path)
    try:
        with open(path / METAFNAME, encoding="utf-8") as f:
            meta = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        meta = None
    if not isinstance(meta, dict):
        return f"no readable {METAFNAME}"
    for file in sorted(path.glob(f"*{PARAMFILE_EXT}")):
        if file.stat().st_size == 0:
            return f"{file.name} is empty"
        with open(file, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if is_zip and not zipfile.is_zipfile(file):
            return f"{file.name} is cut short"
    for name in required:
        if not (path / f"{name}{PARAMFILE_EXT}").is_file():
            return f"no {name}{PARAMFILE_EXT}"
    return None


@main_process_only
def set_aside_incomplete_checkpoints(checkpointer: Checkpointer) -> list:
    """Renames the checkpoint folders that a killed run left incomplete, so that nothing loads them.

    Each ``CKPT+...`` folder of ``checkpointer`` with a :func:`checkpoint_problem` (given the
    recoverables that SpeechBrain cannot load without) becomes ``incomplete-CKPT+...``, with a
    warning; SpeechBrain then recovers from the newest complete checkpoint. Runs on the main
    process; under DDP, call it on every process (the others wait for it).

    Arguments
    ---------
    checkpointer : speechbrain.utils.checkpoints.Checkpointer
        Its recoverables must be registered.

    Returns
    -------
    list of str
        The new paths of the folders set aside.

    Example
    -------
    >>> import torch
    >>> checkpointer = Checkpointer(getfixture("tmp_path"), {"model": torch.nn.Linear(2, 2)})
    >>> good = checkpointer.save_checkpoint(verbosity=logging.DEBUG).path
    >>> bad = checkpointer.save_checkpoint(verbosity=logging.DEBUG).path
    >>> (bad / "model.ckpt").unlink()  # killed before writing it
    >>> [os.path.basename(p) for p in set_aside_incomplete_checkpoints(checkpointer)] == [
    ...     "incomplete-" + bad.name]
    True
    >>> checkpointer.find_checkpoint().path == good
    True
    """
    required = [
        name for name in checkpointer.recoverables
        if not (checkpointer.allow_partial_load or checkpointer.optional_recoverables.get(name) or "dataloader" in name)
    ]  # as in Checkpointer._call_load_hooks
    moved = []
    for path in sorted(pathlib.Path(checkpointer.checkpoints_dir).glob(f"{CKPT_PREFIX}*")):
        problem = checkpoint_problem(path, required) if path.is_dir() else None
        if problem:
            target = path.with_name(INCOMPLETE_PREFIX + path.name)
            os.replace(path, target)
            logger.warning("Checkpoint %s is incomplete (%s): a run was probably killed while writing it. "
                           "Moved it to %s, to resume from the previous checkpoint", path, problem, target)
            moved.append(str(target))
    return moved
