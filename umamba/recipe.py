"""The steps of ``train.py``: data preparation (Libri2Mix or the demo corpus, plain or
reverberant), the datasets, and the training augmentation."""

import logging
import os
from dataclasses import dataclass

from speechbrain.utils.distributed import run_on_main

from umamba.data.datasets import separation_dataset, source_keys
from umamba.data.demo_corpus import make_demo_corpus
from umamba.data.dynamic_mixing import (
    DynamicMixingDataset,
    audio_files,
    librimix_noises,
    librimix_utterances,
    librispeech_utterances,
)
from umamba.data.librimix import find_root, prepare_librimix
from umamba.data.reverb_librimix import make_reverb_librimix
from umamba.data.rir import make_rir_bank

logger = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "No data_folder given: using the built-in SYNTHETIC demo corpus in %s. It shows the recipe "
    "working end to end; its scores are NOT Libri2Mix scores and are not comparable with published "
    "results. Pass --data_folder /path/to/Libri2Mix for real training."
)
REVERB_TARGETS = ("anechoic", "reverberant")


@dataclass
class PreparedData:
    """Where the prepared CSVs are, what ``$data_root`` stands for in them, and the RIR bank."""

    csvs: dict  # split -> CSV of the evaluated condition
    data_root: str
    synthetic: bool
    train_csv: str  # the CSV the training set reads (dry when reverberation is done on the fly)
    rir_csv: str | None = None  # the bank's SpeechBrain CSV (paths under $rir_root)
    rir_folder: str | None = None


def prepare_data(hparams: dict) -> PreparedData:
    """Prepare the CSVs of the train/valid/test splits named in ``hparams``.

    With ``data_folder`` null, the synthetic demo corpus is built first (once, cached) in
    ``demo_folder`` and the run is shortened to ``demo_N_epochs`` epochs. With ``reverb``, a
    RIR bank and the reverberant copies of the splits are built when missing (resumable).
    Every building step runs on the main process only (DDP-safe).
    """
    if hparams["reverb_targets"] not in REVERB_TARGETS:
        raise ValueError(f"reverb_targets must be one of {REVERB_TARGETS}, got {hparams['reverb_targets']!r}")
    synthetic = not hparams["data_folder"]
    data_folder = hparams["data_folder"]
    sample_rate, mode = hparams["sample_rate"], hparams["librimix_mode"]
    splits = [hparams["train_split"], hparams["valid_split"], hparams["test_split"]]
    if synthetic:
        data_folder = hparams["demo_folder"]
        logger.warning(SYNTHETIC_WARNING, os.path.abspath(data_folder))
        run_on_main(
            make_demo_corpus,
            kwargs=dict(
                root=data_folder,
                sample_rate=sample_rate,
                n_train=hparams["demo_n_train"],
                n_valid=hparams["demo_n_valid"],
                n_test=hparams["demo_n_test"],
                seconds=hparams["demo_seconds"],
                mode=mode,
                voices=hparams["demo_voices"],
                seed=hparams["seed"],
            ),
        )
        hparams["epoch_counter"].limit = hparams["demo_N_epochs"]
    root = find_root(data_folder, hparams["num_spks"], sample_rate, mode)

    common = dict(
        data_folder=data_folder,
        save_folder=hparams["save_folder"],
        sample_rate=sample_rate,
        mode=mode,
        mixture_type=hparams["mixture_type"],
        n_spks=hparams["num_spks"],
        skip_prep=hparams["skip_prep"],
    )
    dry = dict(common, splits=splits)
    # The dry Libri2Mix first: it checks every folder and file before anything long is built.
    run_on_main(prepare_librimix, kwargs=dry)
    rir_csv = rir_folder = None
    if hparams["reverb"]:
        rir_folder = hparams["rir_folder"] or os.path.join(data_folder, "rir_bank")
        n_rooms = hparams["demo_rir_rooms"] if synthetic else hparams["rir_rooms"]
        if not hparams["skip_prep"]:
            run_on_main(make_rir_bank, kwargs=dict(out_folder=rir_folder, n_rooms=n_rooms, sample_rates=[sample_rate],
                                                   n_src=hparams["num_spks"], seed=hparams["seed"]))
            run_on_main(make_reverb_librimix, kwargs=dict(librimix_folder=root, rir_bank=rir_folder,
                                                          sample_rate=sample_rate, mode=mode, splits=splits,
                                                          seed=hparams["seed"]))
        rir_csv = os.path.join(rir_folder, f"rirs_{sample_rate}.csv")
        suffix = "anechoic" if hparams["reverb_targets"] == "anechoic" else "reverb"
        evaluated = dict(
            common,
            splits=splits,
            mix_folder=f"{hparams['mixture_type']}_reverb",
            source_folders=[f"{k}_{suffix}" for k in source_keys(hparams["num_spks"])],
            noise_folder="noise_reverb",
        )
        run_on_main(prepare_librimix, kwargs=evaluated)
    else:
        evaluated = dry
    csvs = prepare_librimix(**{**evaluated, "skip_prep": True})
    train_csv = csvs[hparams["train_split"]]
    if hparams["on_the_fly_reverb"] or hparams["dynamic_mixing"]:
        # Training starts from the dry mixtures; reverberation is added to each batch.
        train_csv = prepare_librimix(**{**dry, "skip_prep": True})[hparams["train_split"]]
    return PreparedData(csvs=csvs, data_root=root, synthetic=synthetic, train_csv=train_csv,
                        rir_csv=rir_csv, rir_folder=rir_folder)


def make_augmentation(hparams: dict, data: PreparedData):
    """The training augmentation of the yaml, completed with the RIR bank and the targets."""
    reverb = hparams["on_the_fly_reverb"]
    if reverb and not data.rir_csv:
        raise ValueError("on_the_fly_reverb needs the RIR bank: set reverb True (and rir_folder if it exists)")
    return hparams["augmentation"](
        rir_csv=data.rir_csv if reverb else None,
        rir_replacements={"rir_root": data.rir_folder} if reverb else None,
        reverberant_targets=reverb and hparams["reverb_targets"] == "reverberant",
        direct_path_targets=reverb and hparams["reverb_targets"] == "anechoic",
    )


def _dynamic_mixing_dataset(hparams: dict, data: PreparedData) -> DynamicMixingDataset:
    noisy = hparams["mixture_type"] == "mix_both"
    if hparams["dm_librispeech_folder"]:
        speech = librispeech_utterances(hparams["dm_librispeech_folder"], hparams["dm_librispeech_splits"])
    else:
        speech = librimix_utterances(data.train_csv, data.data_root, hparams["num_spks"])
    noises = None
    if noisy:
        noises = (audio_files(hparams["dm_noise_folder"]) if hparams["dm_noise_folder"]
                  else librimix_noises(data.train_csv, data.data_root))
    return DynamicMixingDataset(
        speech, noises, hparams["sample_rate"], resample=True, num_spks=hparams["num_spks"],
        segment_seconds=hparams["segment_seconds"], mixtures_per_epoch=hparams["dm_mixtures_per_epoch"],
        seed=hparams["seed"],
    )


def make_datasets(hparams: dict, data: PreparedData):
    """Train (dynamic mixing, or random crops of ``segment_seconds``), valid and test datasets."""
    common = dict(data_root=data.data_root, num_spks=hparams["num_spks"], sample_rate=hparams["sample_rate"])
    if hparams["dynamic_mixing"]:
        train = _dynamic_mixing_dataset(hparams, data)
    else:
        # The noise comes along so that augmentation can rebuild the mixture from its parts.
        train = separation_dataset(
            data.train_csv, segment_seconds=hparams["segment_seconds"],
            with_noise=hparams["mixture_type"] == "mix_both", **common,
        )
    valid = separation_dataset(data.csvs[hparams["valid_split"]], **common)
    test = separation_dataset(data.csvs[hparams["test_split"]], **common)
    return train, valid, test
