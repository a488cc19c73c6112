"""``umamba-separate``: separate audio files with an exported model.

Usage::

    umamba-separate IN.wav [IN2.wav ...] --model MODEL_DIR --out OUT_DIR
                    [--device cpu|cuda] [--chunk-seconds 10] [--overlap-seconds 1]

(or ``python -m umamba.cli ...``). ``MODEL_DIR`` is a folder written by ``python -m umamba.export``.
Each input ``<stem>.<ext>`` gives ``OUT_DIR/<stem>_s1.wav``, ``<stem>_s2.wav``, ... (32-bit float,
at the model's sample rate). Inputs that share a stem (``a/mix.wav``, ``b/mix.wav``) are numbered
(``mix-1_s1.wav``, ``mix-2_s1.wav``) so that no output overwrites another. Files are separated in
overlapping chunks, so their length is not limited by memory, and at any sample rate.

A file that cannot be separated (missing, empty, unreadable, too short, with NaN samples, ...)
gets a one-line message naming it on stderr, and no output; the other files are still separated.
The exit status is 1 if any file failed, 0 otherwise (2 for a usage error).

Authors
 * U-Mamba-Net contributors
"""

import argparse
import collections
import logging
import os
import sys
from typing import Sequence

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from umamba.allocator import keep_freed_memory
from umamba.data.audio import AudioError
from umamba.inference import UMambaSeparation


def output_names(paths: Sequence[str]) -> list:
    """Output name stems for input files, unique even where inputs share a file name.

    A file keeps its stem when no other input has it (compared case-insensitively, for
    case-insensitive file systems); files that share one get ``<stem>-1``, ``<stem>-2``, ...,
    skipping names already taken.

    Arguments
    ---------
    paths : sequence of str
        The input files.

    Returns
    -------
    list of str
        One name per input, in order, all different.

    Example
    -------
    >>> output_names(["a/mix.wav", "b/mix.wav", "c/mix-1.flac", "talk.wav"])
    ['mix-2', 'mix-3', 'mix-1', 'talk']
    """
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    counts = collections.Counter(stem.casefold() for stem in stems)
    taken = {stem.casefold() for stem in stems}
    names = []
    for stem in stems:
        if counts[stem.casefold()] == 1:
            names.append(stem)
            continue
        k = 1
        while f"{stem}-{k}".casefold() in taken:
            k += 1
        names.append(f"{stem}-{k}")
        taken.add(names[-1].casefold())
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umamba-separate",
        description="Separate the talkers of audio files with a model exported by `python -m umamba.export`. "
                    "Writes <out>/<stem>_s1.wav, <stem>_s2.wav, ... for each input.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IN", help="audio files (any sample rate, mono or not)")
    parser.add_argument("--model", required=True, help="exported model folder (hyperparams.yaml + *.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--chunk-seconds", type=float, default=10.0,
                        help="length of the chunks the model sees (default 10)")
    parser.add_argument("--overlap-seconds", type=float, default=1.0,
                        help="overlap of consecutive chunks, where they are matched and cross-faded (default 1)")
    return parser


def main(argv=None) -> int:
    """Runs ``umamba-separate`` with ``argv`` (``sys.argv[1:]`` by default); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.chunk_seconds >= UMambaSeparation.MIN_SECONDS or not 0 < args.overlap_seconds < args.chunk_seconds:
        parser.error(f"need --chunk-seconds >= {UMambaSeparation.MIN_SECONDS} and "
                     "0 < --overlap-seconds < --chunk-seconds")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if not os.path.isfile(os.path.join(args.model, "hyperparams.yaml")):
        parser.error(f"--model '{args.model}' has no hyperparams.yaml (export a training run with "
                     "`python -m umamba.export RUN_DIR MODEL_DIR`)")
    console = logging.StreamHandler()
    console.addFilter(lambda record: record.levelno >= logging.WARNING)  # SpeechBrain's loggers are at INFO
    logging.basicConfig(format="%(levelname)s: %(message)s", handlers=[console])
    keep_freed_memory()  # reuse freed tensors' memory instead of faulting in fresh pages (faster on the CPU)
    try:
        model = UMambaSeparation.from_hparams(source=args.model, savedir=None, run_opts={"device": args.device})
    except Exception as err:  # any failure to build or load the model ends the run, with its reason
        print(f"error: cannot load the model in '{args.model}': {type(err).__name__}: {err}".splitlines()[0],
              file=sys.stderr)
        return 2

    names = output_names(args.inputs)
    with logging_redirect_tqdm():
        failed = sum(_separate_one(model, path, name, args) for path, name in
                     zip(tqdm(args.inputs, desc="Separating", unit="file"), names))
    print(f"Separated {len(args.inputs) - failed} of {len(args.inputs)} files into {args.out}")
    return 1 if failed else 0


def _separate_one(model: UMambaSeparation, path: str, name: str, args: argparse.Namespace) -> bool:
    """Separates one file into ``args.out``; returns whether it failed (after saying why on stderr)."""
    try:
        outputs = model.separate_to_files(path, args.out, args.chunk_seconds, args.overlap_seconds, name=name)
    except AudioError as err:
        message = str(err)
    except RuntimeError as err:  # e.g. out of memory on a device: the next file may still fit
        message = f"Cannot separate '{path}': {type(err).__name__}: {err}"
    else:
        if os.path.splitext(os.path.basename(path))[0] != name:
            tqdm.write(f"note: '{path}' -> {', '.join(outputs)} (another input has the same name)")
        return False
    tqdm.write(f"error: {message}".splitlines()[0], file=sys.stderr)
    return True


if __name__ == "__main__":
    sys.exit(main())
