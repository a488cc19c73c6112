"""The switch of the fused CPU inference kernels, for callers that need the PyTorch modules to run.

In CPU float32 inference, numba kernels stand in for some PyTorch modules: everything between
the two 1x1 convolutions of a ``UBlock`` (:mod:`umamba.models.ublock_cpu`), the LayerNorm of a
``MambaLayer`` (:mod:`umamba.models.layer_norm_cpu`), the Mamba block's causal convolution + SiLU
(:mod:`umamba.mamba.conv_cpu`) and its ``dt_proj`` (applied by the scan as it loads the step
sizes); and the masknet's input gLN is folded into the 1x1 convolution after it. The results
are the same up to float32 rounding. Whoever needs those modules called (forward hooks that
count MACs, as :func:`umamba.complexity.count_macs`; a profiler; a comparison of both paths)
runs the model inside :func:`module_path`. A module with a forward hook is always called as a
module.

Authors
 * U-Mamba-Net contributors
"""

import contextlib

import torch

__all__ = ["enabled", "has_hooks", "may_stand_in", "module_path"]

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


def has_hooks(module: torch.nn.Module) -> bool:
    """True when ``module`` has forward hooks or pre-hooks: it must then be called as a module.

    Example
    -------
    >>> conv = torch.nn.Conv1d(2, 2, 1)
    >>> has_hooks(conv)
    False
    >>> handle = conv.register_forward_hook(lambda *args: None)
    >>> has_hooks(conv)
    True
    """
    return bool(module._forward_hooks or module._forward_pre_hooks)


def may_stand_in(x: torch.Tensor, modules, dtypes=(torch.float32,)) -> bool:
    """Whether a fused CPU kernel may compute, from ``x``, what ``modules`` would.

    True when :func:`module_path` is not in force, ``x`` is a CPU tensor of one of ``dtypes``
    (float32 by default), no gradient is needed (grad mode off, or neither ``x`` nor the modules'
    own parameters require one), none of the modules has hooks (:func:`has_hooks`), and no
    tracing or compilation is in progress. The caller checks what its kernel supports (shapes,
    settings) and that numba imports.

    Example
    -------
    >>> norm = torch.nn.GroupNorm(1, 4)
    >>> with torch.no_grad():
    ...     may_stand_in(torch.randn(1, 4, 8), [norm])
    True
    >>> may_stand_in(torch.randn(1, 4, 8), [norm])  # training: the weights need a gradient
    False
    """
    if not _enabled or x.device.type != "cpu" or x.dtype not in dtypes:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters(recurse=False))
    ):
        return False
    if any(has_hooks(m) for m in modules):
        return False
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())
