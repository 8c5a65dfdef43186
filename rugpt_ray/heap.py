"""The C heap keeps the memory a decode step frees, for the next step to reuse.

Each decode step allocates and frees the same large tensors: a batch's logits and their softmax are 16 x 50264
floats, 3.2 MB each. glibc's malloc serves a block that size from mmap or trims it off its heap once it is freed, so
every step's blocks are fresh memory that the kernel faults in a page at a time: 1,570 page faults and 2.5 ms of a
3 ms sampling step for 16 rows on a 2-core VM (0.5 ms without them). Raising malloc's mmap and trim thresholds keeps
freed blocks for reuse, as tcmalloc or jemalloc would (PyTorch's CPU tuning guide preloads one of them). The cost is
that a process's resident memory stays at its high-water mark.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap, not from mmap (glibc's ceiling on 64-bit)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of a heap is given back to the kernel only past this size."""


@functools.cache
def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed blocks (once; every thread's heap); False where the C library is not
    glibc, which leaves its allocator as it is."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
