"""The process's memory allocator: keep freed memory for the next step instead of handing it back to the kernel.

A sampling step allocates and frees hundreds of megabytes of temporaries (the (queries, clusters) tables of the top-k
search, the estimator's logits, the exact backend's chunks). glibc's malloc, by default, returns large freed blocks and
the free top of its heaps to the kernel at once, so the next step takes page faults to get the same memory back: on the
2-core Xeon, the top-k backend's 6,000-image benchmark spent 9-19 s of its 47-55 s in the kernel and 4.5 s with this
setting (benchmarks/RESULTS.md, "The allocator"). With glibc's mallopt, blocks up to MMAP_THRESHOLD come from the heap
(with large_blocks, every block: MMAP_MAX), the heap keeps up to TRIM_THRESHOLD free at its top and grows by TOP_PAD
beyond each request, so a step reuses its predecessor's pages; a sampler's peak memory grows little, as each step needs
about what the last one did.

This is the process's setting, not the library's: the entry points (the ``patchdb`` command, benchmarks/bench_topk.py)
call retain_freed_memory once at start; a program that imports patchdb decides for itself.
"""

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
"""mallopt's parameter numbers (glibc's malloc.h)."""

MMAP_THRESHOLD = 32 * 1024**2
"""Bytes: the largest that glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2); larger blocks are mapped on their own."""
MMAP_MAX = 0
"""With large_blocks, blocks mapped on their own at once: none (where the heap cannot grow, glibc still maps). Otherwise
the blocks above MMAP_THRESHOLD (the (queries, clusters) tables and per-entry arrays of the 60,000-image top-k runs) are
mapped afresh and faulted in again at every allocation."""
TRIM_THRESHOLD = 1024**3
"""Bytes of free memory the heap keeps at its top before it shrinks."""
TOP_PAD = 256 * 1024**2
"""Bytes the heap grows by beyond each request, and keeps when it shrinks (in threads' arenas too)."""


def retain_freed_memory(large_blocks: bool = True) -> bool:
    """Set glibc's malloc to keep freed memory (module docstring); returns whether it was set (False off glibc).

    large_blocks: keep blocks above MMAP_THRESHOLD in the heap too. A sampler reallocates the same large tables at every
    step; a store's build streams blocks of changing sizes through its memory budget, and those kept in the heap
    fragment it (the 60,000-image build's peak grew from 5.2 to 6.9 GB with them).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into the process, the C library's among them
    if not hasattr(libc, "gnu_get_libc_version"):  # only glibc's malloc has these parameters
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
                *([(M_MMAP_MAX, MMAP_MAX)] if large_blocks else []))
    return all([libc.mallopt(parameter, value) == 1 for parameter, value in settings])
