#!/usr/bin/env python3
"""Builds a static noisy-reverberant Libri2Mix from Libri2Mix and a RIR bank.

Usage::

    python recipes/make_reverb_librimix.py LIBRIMIX_ROOT RIR_BANK --sample-rate 8000 \\
        --mode min --splits dev test

Writes ``mix_both_reverb``, ``mix_clean_reverb``, ``s1_reverb``, ``s2_reverb``,
``s1_anechoic``, ``s2_anechoic`` and ``noise_reverb`` beside the Libri2Mix folders
of each split, and their metadata. Rerunning completes an interrupted build.
See ``umamba/data/reverb_librimix.py`` and recipes/README.md.
"""

import argparse
import logging
import sys

from umamba.data.reverb_librimix import make_reverb_librimix


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("librimix", help="the folder holding Libri2Mix, or Libri2Mix itself")
    parser.add_argument("rir_bank", help="a bank from recipes/make_rir_bank.py")
    parser.add_argument("--sample-rate", type=int, default=8000, help="8000 or 16000")
    parser.add_argument("--mode", default="min", choices=["min", "max"], help="LibriMix mode")
    parser.add_argument(
        "--splits", nargs="+", default=["train-360", "dev", "test"], help="the splits to build"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of the rooms")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: all CPUs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        outputs = make_reverb_librimix(
            args.librimix,
            args.rir_bank,
            sample_rate=args.sample_rate,
            mode=args.mode,
            splits=args.splits,
            seed=args.seed,
            jobs=args.jobs,
        )
    except (OSError, ValueError) as err:  # bad input: the message names the file
        sys.exit(f"error: {err}")
    for split, path in outputs.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
