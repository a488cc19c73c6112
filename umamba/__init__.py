"""U-Mamba-Net: a U-Net + Mamba separator for noisy and reverberant speech, as SpeechBrain recipes.

Layout
------
- ``umamba.mamba``: the Mamba (selective state-space) block and its scan backends.
- ``umamba.models``: separators (masknets) for SpeechBrain's encoder/masknet/decoder triplet.
- ``umamba.data``: audio I/O, Libri2Mix preparation, the synthetic demo corpus, reverberation.
- ``umamba.complexity``: parameters, MACs and CPU time of any separator yaml.
"""

__version__ = "0.1.0"

from umamba.mamba import Mamba  # noqa: E402,F401
from umamba.models.umamba_net import UMambaMaskNet  # noqa: E402,F401

__all__ = ["Mamba", "UMambaMaskNet", "__version__"]
