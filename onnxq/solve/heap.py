"""The process heap: where freed memory goes (glibc; a no-op elsewhere)."""
from __future__ import annotations

import functools

CALIB_MMAP = 2 << 20  # bytes from which allocations are mmapped during calibration (activations: give them back)
SOLVE_MMAP = 8 << 20  # ... and in the solvers, whose many smaller temporaries are faster on the heap

def set_mmap_threshold(nbytes: int) -> None:
    """Have glibc serve allocations from `nbytes` up with mmap, so freeing them returns them to the OS at once.
    By default glibc raises that threshold to the largest block freed (up to 32 MB) and serves later blocks below it
    from a heap that fragments: activations of a few MB cost 400 MB resident on SmolLM2 TurboBoA. Low thresholds
    slow the solvers (a TurboBoA layer: +45% at 1-2 MB, +17% at 4 MB, none measurable at 8 MB). Process-wide; a
    no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc keeps freed blocks of a few MB cached; without this, resident
    memory creeps up by about a block's weights per block on large models). A no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """glibc, or None where there is none."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
