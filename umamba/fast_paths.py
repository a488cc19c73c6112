"""The switch of the fused CPU inference kernels, for callers that need the PyTorch modules to run.

In CPU float32 inference, numba kernels stand in for some PyTorch modules: everything between
the two 1x1 convolutions of a ``UBlock`` (:mod:`umamba.models.ublock_cpu`) and the Mamba block's
causal convolution + SiLU (:mod:`umamba.mamba.conv_cpu`). The results are the same up to float32
rounding. Whoever needs those modules called (forward hooks that count MACs, as
:func:`umamba.complexity.count_macs`; a profiler; a comparison of both paths) runs the model
inside :func:`module_path`. A module with a forward hook is always called as a module.

Authors
 * U-Mamba-Net contributors
"""

import contextlib

__all__ = ["enabled", "module_path"]

_enabled = True


def enabled() -> bool:
    """False inside :func:`module_path`: the fused kernels must not stand in for modules.

    Example
    -------
    >>> enabled()
    True
    """
    return _enabled


@contextlib.contextmanager
def module_path():
    """Context manager inside which every module runs as PyTorch modules (no fused CPU kernels).

    Example
    -------
    >>> with module_path():
    ...     enabled()
    False
    """
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous
