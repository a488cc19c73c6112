"""What several test files share: the repository root and a tiny U-Mamba-Net."""

import os

from hyperpyyaml import load_hyperpyyaml, resolve_references

from umamba.export import export_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hparams/umamba.yaml overrides for a model of about 11 k parameters (seconds to train on CPU).
TINY_UMAMBA = {"N_encoder_out": 32, "F": 16, "hidden_channels": 32, "num_blocks": 2, "upsampling_depth": 3, "d_state": 4}


def as_cli(overrides: dict) -> list[str]:
    """``{"key": value}`` -> ``["--key", "value", ...]``, train.py's yaml overrides."""
    return [str(item) for key, value in overrides.items() for item in (f"--{key}", value)]


def export_untrained_tiny_model(folder) -> str:
    """A pretrained folder (``folder/model``) of an untrained tiny U-Mamba-Net with the torch scan.

    The run folder it is exported from (``folder/run``) is what train.py leaves, without training.
    """
    run = os.path.join(folder, "run")
    with open(os.path.join(REPO, "hparams", "umamba.yaml"), encoding="utf-8") as f:
        overrides = {"output_folder": run, **TINY_UMAMBA, "scan_backend": "torch"}
        resolved = resolve_references(f, overrides).getvalue()
    os.makedirs(run)
    with open(os.path.join(run, "hyperparams.yaml"), "w", encoding="utf-8") as f:
        f.write(resolved)
    load_hyperpyyaml(resolved)["checkpointer"].save_checkpoint(meta={"neg_si_snr": 0.0})
    export_model(run, os.path.join(folder, "model"))
    return os.path.join(folder, "model")
