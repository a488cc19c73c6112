"""Keep freed memory for reuse: the C allocator setting that CPU inference and training want.

PyTorch on the CPU allocates every intermediate tensor with the C library's ``malloc``. A
U-Mamba-Net forward pass on 10 s of 8 kHz audio makes dozens of 16-32 MB tensors; by default,
glibc gives blocks that large back to the operating system when they are freed (``mmap``
chunks, heap trimming), so the next tensor of the same size starts on fresh pages and pays a
page fault plus zero-filling for every 4 KiB: a third of the inference time of the default
model on 2 threads (see ``benchmarks/bench_cpu_speed.py``, which measures both settings).

:func:`keep_freed_memory` tells glibc to serve every allocation from its heap and never trim
it, so freed tensors are reused as warm memory. This is what PyTorch's CPU performance guide
gets from swapping in jemalloc or tcmalloc (``LD_PRELOAD``), without a new dependency or
environment variable. The price: memory freed by the process stays reserved by it (the peak
resident size is unchanged; it just no longer shrinks after the peak). The setting is
process-wide; ``train.py``, the ``umamba-separate`` command and the benchmarks turn it on, and
a Python user of :class:`umamba.inference.UMambaSeparation` can call it once at start.

Other C libraries (musl, macOS) are left alone: the function then returns False.

Authors
 * U-Mamba-Net contributors
"""

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

# mallopt() parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep and reuse freed memory (process-wide); True if applied.

    Sets ``M_MMAP_MAX`` to 0 (large blocks come from the heap instead of separate ``mmap``
    chunks that are unmapped when freed) and ``M_TRIM_THRESHOLD`` to its maximum (the heap is
    not given back to the system). Idempotent; returns False, changing nothing, where the C
    library is not glibc.

    Example
    -------
    >>> import platform
    >>> keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
    True
    """
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)):
        logger.warning("glibc refused the malloc settings; freed memory goes back to the system")
        return False
    _applied = True
    logger.info("malloc keeps freed memory for reuse (umamba.allocator.keep_freed_memory)")
    return True
