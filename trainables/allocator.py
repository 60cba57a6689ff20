"""Host-memory allocator settings for processes that train.

A CPU training step frees its activations, gradients and input batch and allocates
buffers of the same sizes at the next step. By default glibc's malloc maps blocks above
a dynamic threshold (at most 32 MiB on 64-bit systems) afresh for each request, and it
trims free memory from the top of the heap. Both hand pages back to the kernel, so the
next step takes one page fault per 4 KiB page. A plain PyTorch loop over one MLP 3x512
epoch of Fashion-MNIST took 12,000 to 220,000 minor faults and up to 0.46 s of system
time out of about 4 s (``bench/data_pipeline.py``, x86_64, 2 cores, glibc 2.36).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

logger = logging.getLogger(__name__)

# Values of glibc's mallopt parameters, from <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 256 * 2**20
TRIM_THRESHOLD_BYTES = 1024 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Make malloc keep freed host memory in this process for reuse, and return whether it did.

    Blocks under 256 MiB come from the heap instead of fresh mappings (in threads other
    than the main one, only blocks that fit glibc's fixed-size per-thread heaps), and up
    to 1 GiB of free memory stays mapped instead of going back to the kernel. The process
    then keeps its peak host memory until it exits. Training workers return to that peak
    at every step, so keeping it costs them little. Without glibc (macOS, musl) this does
    nothing. The setting applies to the whole process, so only processes that exist to
    train call it: the Ray Tune trial function and the retrain workers.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and applied
    if not applied:
        logger.warning("glibc mallopt rejected the allocator settings, so training uses the default ones")
    return applied
