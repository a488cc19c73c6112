"""Separators (masknets) for SpeechBrain's encoder/masknet/decoder triplet."""

from umamba.models.separator import Separator, separate
from umamba.models.umamba_net import MambaLayer, UBlock, UMambaMaskNet

__all__ = ["MambaLayer", "Separator", "UBlock", "UMambaMaskNet", "separate"]
