"""U-Mamba-Net: a U-Net + Mamba separator for noisy and reverberant speech, as SpeechBrain recipes.

Layout
------
- ``umamba.mamba``: the Mamba (selective state-space) block and its scan backends.
- ``umamba.models``: separators (masknets) for SpeechBrain's encoder/masknet/decoder triplet.
- ``umamba.data``: audio I/O, Libri2Mix preparation, the synthetic demo corpus, reverberation.
- ``umamba.brain``: the SpeechBrain Brain; ``umamba.recipe``: the steps of ``train.py``.
- ``umamba.complexity``: parameters, MACs and CPU time of any separator yaml.

``Mamba`` and ``UMambaMaskNet`` are imported on first use, so that data scripts which import
``umamba.data`` do not load the models.
"""

__version__ = "0.1.0"

__all__ = ["Mamba", "UMambaMaskNet", "__version__"]


def __getattr__(name):
    if name == "Mamba":
        from umamba.mamba import Mamba

        return Mamba
    if name == "UMambaMaskNet":
        from umamba.models import UMambaMaskNet

        return UMambaMaskNet
    raise AttributeError(f"module 'umamba' has no attribute {name!r}")
