"""Host-memory allocator settings for running the model on a CPU.

glibc serves every block above a threshold (128 KiB at first, adapting up to 32 MiB) with a fresh
mmap() and unmaps it on free(). A training step allocates and frees its activations and gradients,
many of them tens of MB, so every step maps fresh pages and faults on each of them: ~100k page
faults per step for test_resnet at 160 px, batch 64 (measured, benchmarks/bench_train.py). Keeping
freed memory in the process for the next step (no mmap for large blocks, no trimming) brings that
to a few hundred and the step from ~160 to ~210 images/s on 2 cores. It is what PyTorch's CPU
performance guide gets by preloading jemalloc or tcmalloc, done here without a native dependency:
the glibc settings are plain mallopt() calls. The price: the process keeps its peak footprint
(which each step reaches anyway) instead of returning it to the OS between steps.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt() parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of unmapping it. True when glibc took the settings;
    False where they do not apply (not Linux, not glibc, e.g. macOS or musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, _LARGEST) == 1 and mallopt(M_TRIM_THRESHOLD, _LARGEST) == 1
    if not ok:
        log.warning("glibc refused the malloc settings (mallopt); CPU training runs with the default allocator")
    return ok
