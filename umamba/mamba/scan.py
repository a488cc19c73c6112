"""Selective scan (the Mamba SSM recurrence) and the choice of backend that computes it.

All backends compute the same function as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``::

    delta' = softplus(delta + delta_bias)  (or delta + delta_bias without softplus)
    h_t[d, n] = exp(delta'_t[d] * A[d, n]) * h_{t-1}[d, n] + delta'_t[d] * B_t[n] * u_t[d],   h_{-1} = 0
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]
    out       = y * silu(z)  (when z is given)

Backends
--------
- ``"cuda"``: mamba-ssm's CUDA kernel (optional ``gpu`` extra; only for CUDA tensors).
- ``"cpu"``: a streaming numba kernel with its own backward (``umamba.mamba.scan_cpu``), for CPU tensors.
- ``"torch"``: :func:`selective_scan_torch`, pure PyTorch, any device, differentiable by autograd.
- ``"auto"``: the fastest one that imports and suits the input's device.
"""

import functools
import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "cpu", "torch")


def _prepare_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk_size=None
):
    """Selective scan in pure PyTorch with a two-level (chunked) sequential scan.

    The sequence is cut into ``K`` chunks of ``T`` steps (``T * K >= L``, both about ``sqrt(L)``).
    One Python loop of ``T`` steps runs the recurrence inside every chunk at once (from a zero
    state), a second loop of ``K`` steps carries the state across chunk borders, and a last
    vectorised step adds each chunk's incoming state, decayed. That is ``O(L)`` work in
    ``T + K`` small Python steps, exact (decays are products of values in (0, 1], nothing is
    divided or exponentiated outside that range), and autograd derives the backward pass.
    It materialises (batch, dim, L, d_state) tensors: use it as the portable reference and
    fallback; the ``cpu`` and ``cuda`` backends stream instead.

    Arguments
    ---------
    u : torch.Tensor
        Input, (batch, dim, L).
    delta : torch.Tensor
        Step sizes before bias and softplus, (batch, dim, L).
    A : torch.Tensor
        State matrix (diagonal, negative real), (dim, d_state).
    B : torch.Tensor
        Input projection per step, (batch, d_state, L).
    C : torch.Tensor
        Output projection per step, (batch, d_state, L).
    D : torch.Tensor, optional
        Skip connection, (dim,).
    z : torch.Tensor, optional
        Gate, (batch, dim, L): the output is multiplied by ``silu(z)``.
    delta_bias : torch.Tensor, optional
        Added to ``delta``, (dim,).
    delta_softplus : bool
        Apply softplus to ``delta + delta_bias``.
    chunk_size : int, optional
        Steps per chunk; ``ceil(sqrt(L))`` by default.

    Returns
    -------
    torch.Tensor
        (batch, dim, L), in the dtype of ``u``.

    Example
    -------
    >>> u = torch.randn(2, 4, 10); delta = torch.rand(2, 4, 10)
    >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 10); C = torch.randn(2, 3, 10)
    >>> selective_scan_torch(u, delta, A, B, C).shape
    torch.Size([2, 4, 10])
    """
    dtype = u.dtype
    u, delta, A, B, C = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (u, delta, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    d_state = A.shape[1]
    T = chunk_size or max(1, math.ceil(math.sqrt(length)))
    K = math.ceil(length / T)
    pad = K * T - length
    if pad:
        # Zero steps: decay exp(0) = 1 and input 0 leave the state untouched.
        delta_p, u_p = F.pad(delta, (0, pad)), F.pad(u, (0, pad))
        B_p, C_p = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    else:
        delta_p, u_p, B_p, C_p = delta, u, B, C
    # (batch, dim, K, T, d_state)
    decay = torch.exp(delta_p.view(batch, dim, K, T, 1) * A.view(1, dim, 1, 1, d_state))
    drive = (delta_p * u_p).view(batch, dim, K, T, 1) * B_p.view(batch, 1, d_state, K, T).permute(0, 1, 3, 4, 2)

    # 1) Inside every chunk from a zero state; P is the running product of decays.
    # (unbind once: indexing a big tensor inside the loop would make autograd scatter a
    # full-size gradient per step.)
    h = torch.zeros(batch, dim, K, d_state, dtype=decay.dtype, device=decay.device)
    P = torch.ones_like(h)
    hs, Ps = [], []
    for decay_t, drive_t in zip(decay.unbind(3), drive.unbind(3)):
        h = decay_t * h + drive_t
        P = P * decay_t
        hs.append(h)
        Ps.append(P)
    h_local = torch.stack(hs, dim=3)  # (batch, dim, K, T, d_state)
    P = torch.stack(Ps, dim=3)

    # 2) State entering each chunk: the chunk's total decay and zero-state end value are the
    # last entries of the loop above.
    carry = torch.zeros(batch, dim, d_state, dtype=decay.dtype, device=decay.device)
    carries = []
    for P_k, end_k in zip(Ps[-1].unbind(2), hs[-1].unbind(2)):
        carries.append(carry)
        carry = P_k * carry + end_k
    h_in = torch.stack(carries, dim=2)  # (batch, dim, K, d_state)

    # 3) Full state and output.
    states = h_local + P * h_in.unsqueeze(3)
    y = torch.einsum("bdktn,bnkt->bdkt", states, C_p.view(batch, d_state, K, T))
    y = y.reshape(batch, dim, K * T)[..., :length]
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype)


@functools.lru_cache(maxsize=None)
def cuda_kernels_available() -> bool:
    """True when mamba-ssm's compiled kernels import (needs a CUDA build of mamba-ssm)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as err:  # an ImportError, or an OSError/RuntimeError from a broken CUDA build
        logger.debug("mamba-ssm kernels unavailable: %s", err)
        return False
    return True


@functools.lru_cache(maxsize=None)
def cpu_kernel_available() -> bool:
    """True when the numba CPU kernel imports."""
    try:
        from umamba.mamba import scan_cpu
    except ImportError as err:
        logger.debug("numba CPU scan unavailable: %s", err)
        return False
    return scan_cpu.is_available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the scan backend for a tensor on ``device``.

    Arguments
    ---------
    backend : str
        One of ``"auto"``, ``"cuda"``, ``"cpu"``, ``"torch"``. A forced backend that cannot run
        here raises ``RuntimeError`` rather than silently running something else.
    device : torch.device
        Where the input lives.

    Returns
    -------
    str
        ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Example
    -------
    >>> resolve_backend("torch", torch.device("cpu"))
    'torch'
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown scan backend {backend!r}; choose one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if on_cuda and cuda_kernels_available():
            return "cuda"
        if device.type == "cpu" and cpu_kernel_available():
            return "cpu"
        return "torch"
    if backend == "cuda" and not (on_cuda and cuda_kernels_available()):
        raise RuntimeError(
            "scan backend 'cuda' needs a CUDA tensor and mamba-ssm built with CUDA "
            "(pip install -e .[gpu], see README); use backend 'auto' or 'torch'"
        )
    if backend == "cpu" and not (device.type == "cpu" and cpu_kernel_available()):
        raise RuntimeError("scan backend 'cpu' needs a CPU tensor and numba; use backend 'auto' or 'torch'")
    return backend


_announced = set()


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto", delta_proj=None
):
    """Selective scan with the chosen backend; see the module docstring for the maths.

    The backend that runs is logged once per (backend, device type).

    ``delta_proj`` (dim, rank), for inference with the ``"cpu"`` backend only: ``delta`` is then
    low-rank, (batch, rank, L), and the kernel computes ``delta_proj @ delta`` as it loads it
    (see :func:`umamba.mamba.scan_cpu.selective_scan_cpu`). Any other backend raises a
    ValueError, and the cpu backend a RuntimeError when a gradient is needed.

    Example
    -------
    >>> u = torch.randn(1, 4, 6); delta = torch.rand(1, 4, 6)
    >>> A = -torch.rand(4, 3); B = torch.randn(1, 3, 6); C = torch.randn(1, 3, 6)
    >>> selective_scan(u, delta, A, B, C, backend="torch").shape
    torch.Size([1, 4, 6])
    """
    name = resolve_backend(backend, u.device)
    if (name, u.device.type) not in _announced:
        _announced.add((name, u.device.type))
        logger.info("Mamba selective scan backend: %s (device %s)", name, u.device.type)
    if delta_proj is not None and name != "cpu":
        raise ValueError(f"selective_scan: delta_proj needs the 'cpu' backend, not {name!r}; project delta first")
    if name == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(
            u, delta, A, B.contiguous(), C.contiguous(), D, z=z,
            delta_bias=delta_bias, delta_softplus=delta_softplus,
        )
    if name == "cpu":
        from umamba.mamba.scan_cpu import selective_scan_cpu

        return selective_scan_cpu(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            delta_proj=delta_proj,
        )
    return selective_scan_torch(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
    )
