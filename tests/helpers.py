"""What several test files share: the repository root and a tiny U-Mamba-Net."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hparams/umamba.yaml overrides for a model of about 11 k parameters (seconds to train on CPU).
TINY_UMAMBA = {"N_encoder_out": 32, "F": 16, "hidden_channels": 32, "num_blocks": 2, "upsampling_depth": 3, "d_state": 4}


def as_cli(overrides: dict) -> list[str]:
    """``{"key": value}`` -> ``["--key", "value", ...]``, train.py's yaml overrides."""
    return [str(item) for key, value in overrides.items() for item in (f"--{key}", value)]
