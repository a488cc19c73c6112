#!/usr/bin/env python3
"""Train and evaluate a speech separator (U-Mamba-Net, SepFormer, DPRNN, ...) with SpeechBrain.

Usage::

    python train.py hparams/umamba.yaml                        # synthetic demo corpus, short run
    python train.py hparams/umamba.yaml --data_folder /data    # Libri2Mix under /data
    python train.py hparams/umamba.yaml --data_folder /data --test_only
    torchrun --nproc_per_node=2 train.py hparams/umamba.yaml --data_folder /data   # add --distributed_backend gloo on CPU

Any yaml value can be overridden on the command line (``--batch_size 2``), and SpeechBrain's
run options work as usual (``--device``, ``--precision``, ``--debug``). The pieces live in
``umamba/``: the Brain in ``umamba.brain``, data preparation in ``umamba.recipe`` and
``umamba.data``, metrics in ``umamba.metrics``.
"""

import sys

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

from umamba.brain import Separation
from umamba.recipe import make_augmentation, make_datasets, prepare_data

if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )

    data = prepare_data(hparams)  # Libri2Mix (+ reverberation) CSVs, or the synthetic demo corpus
    train_data, valid_data, test_data = make_datasets(hparams, data)
    hparams["augmentation"] = make_augmentation(hparams, data)  # on-the-fly reverb, speed, noise

    separator = Separation(
        modules=hparams["modules"],
        opt_class=hparams["optimizer"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    separator.fit(  # returns at once with --test_only
        separator.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=hparams["dataloader_opts"],
        valid_loader_kwargs=hparams["test_dataloader_opts"],
    )
    separator.evaluate(test_data, min_key="neg_si_snr", test_loader_kwargs=hparams["test_dataloader_opts"])
