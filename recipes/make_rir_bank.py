#!/usr/bin/env python3
"""Simulates a bank of room impulse responses (pyroomacoustics, WHAMR!-style rooms).

Usage::

    python recipes/make_rir_bank.py OUT --n-rooms 1000 --sample-rates 8000 16000 \\
        --n-src 2 --seed 0 --jobs 2

Writes ``OUT/rirs/<sr>/<room_id>.wav`` (one channel per source),
``OUT/rirs/<sr>/<room_id>_direct.wav`` (their direct paths), ``OUT/rirs_<sr>.csv``
(SpeechBrain CSV, paths under ``$rir_root``) and ``OUT/rooms.csv``. Rerunning
completes an interrupted build. See ``umamba/data/rir.py`` and recipes/README.md.
"""

import argparse
import logging
import sys

from umamba.data.rir import make_rir_bank


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the bank folder")
    parser.add_argument("--n-rooms", type=int, default=1000, help="number of rooms")
    parser.add_argument(
        "--sample-rates", type=int, nargs="+", default=[8000, 16000], help="sample rates (Hz)"
    )
    parser.add_argument("--n-src", type=int, default=2, help="sources per room")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: all CPUs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        csvs = make_rir_bank(
            args.out,
            n_rooms=args.n_rooms,
            sample_rates=args.sample_rates,
            n_src=args.n_src,
            seed=args.seed,
            jobs=args.jobs,
        )
    except (OSError, ValueError) as err:  # bad input: the message names the file
        sys.exit(f"error: {err}")
    for sample_rate, path in csvs.items():
        print(f"{sample_rate} Hz: {path}")


if __name__ == "__main__":
    main()
