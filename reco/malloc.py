"""glibc malloc settings for the processes that run torch on CPU (embed replicas, training
workers, Serve replicas, the CLI).

By default glibc hands large freed blocks back to the kernel: blocks above a threshold
(adaptive, at most 32 MB) are mmapped and unmapped one by one, and the heap's free top is
trimmed. A forward pass frees its activations, so the next one faults them in again, page
by page. Measured in a Ray actor on the 2-core VM (ViT-B-32, batch 64, random inputs):
about 8,000 page faults per pair by default; with mmap off and the trim threshold raised,
none after the first batch, and 10-15% more pairs/s (docs/performance.md). PyTorch's CPU
tuning guides get the same by preloading jemalloc or tcmalloc; mallopt needs no other
library and no restart. The price is memory held for reuse: the heap keeps its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD = 2**30
"""Free heap top kept before it is returned to the kernel."""


def keep_freed_memory() -> bool:
    """Serve every block from glibc's heap (no mmap) and trim the heap only above
    TRIM_THRESHOLD of free top, so freed tensors' memory is reused rather than faulted in
    again. False where the C library is not glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):  # musl's mallopt does nothing
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
