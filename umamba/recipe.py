"""The steps of ``train.py``: data preparation (Libri2Mix or the demo corpus) and datasets."""

import logging
import os
from dataclasses import dataclass

from speechbrain.utils.distributed import run_on_main

from umamba.data.datasets import separation_dataset
from umamba.data.demo_corpus import make_demo_corpus
from umamba.data.librimix import find_root, prepare_librimix

logger = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "No data_folder given: using the built-in SYNTHETIC demo corpus in %s. It shows the recipe "
    "working end to end; its scores are NOT Libri2Mix scores and are not comparable with published "
    "results. Pass --data_folder /path/to/Libri2Mix for real training."
)


@dataclass
class PreparedData:
    """Where the prepared CSVs are and what ``$data_root`` stands for in them."""

    csvs: dict
    data_root: str
    synthetic: bool


def prepare_data(hparams: dict) -> PreparedData:
    """Prepare Libri2Mix CSVs for the train/valid/test splits named in ``hparams``.

    With ``data_folder`` null, the demo corpus is built first (once, cached) in ``demo_folder``
    and the run is shortened to ``demo_N_epochs`` epochs. Preparation runs on the main process
    only (DDP-safe).
    """
    synthetic = not hparams["data_folder"]
    data_folder = hparams["data_folder"]
    if synthetic:
        data_folder = hparams["demo_folder"]
        logger.warning(SYNTHETIC_WARNING, os.path.abspath(data_folder))
        run_on_main(
            make_demo_corpus,
            kwargs=dict(
                root=data_folder,
                sample_rate=hparams["sample_rate"],
                n_train=hparams["demo_n_train"],
                n_valid=hparams["demo_n_valid"],
                n_test=hparams["demo_n_test"],
                seconds=hparams["demo_seconds"],
                mode=hparams["librimix_mode"],
                voices=hparams["demo_voices"],
                seed=hparams["seed"],
            ),
        )
        hparams["epoch_counter"].limit = hparams["demo_N_epochs"]
    splits = [hparams["train_split"], hparams["valid_split"], hparams["test_split"]]
    kwargs = dict(
        data_folder=data_folder,
        save_folder=hparams["save_folder"],
        splits=splits,
        sample_rate=hparams["sample_rate"],
        mode=hparams["librimix_mode"],
        mixture_type=hparams["mixture_type"],
        n_spks=hparams["num_spks"],
        skip_prep=hparams["skip_prep"],
    )
    run_on_main(prepare_librimix, kwargs=kwargs)
    csvs = prepare_librimix(**{**kwargs, "skip_prep": True})
    root = find_root(data_folder, hparams["num_spks"], hparams["sample_rate"], hparams["librimix_mode"])
    return PreparedData(csvs=csvs, data_root=root, synthetic=synthetic)


def make_datasets(hparams: dict, data: PreparedData):
    """Train (randomly cropped to ``segment_seconds``), valid and test datasets."""
    common = dict(data_root=data.data_root, num_spks=hparams["num_spks"], sample_rate=hparams["sample_rate"])
    train = separation_dataset(
        data.csvs[hparams["train_split"]], segment_seconds=hparams["segment_seconds"], **common
    )
    valid = separation_dataset(data.csvs[hparams["valid_split"]], **common)
    test = separation_dataset(data.csvs[hparams["test_split"]], **common)
    return train, valid, test
