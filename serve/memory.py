"""Resident memory of the server process, and giving freed heap memory back to the OS.

Loading a quantised model reads the float checkpoint (~4 bytes per weight), quantises it and drops it;
warm-up compiles every program and drops the compiler's scratch memory. glibc keeps such freed memory in
the process (measured on the default model: ~510 MB still resident after loading, with 115 MB of live
arrays), so the server trims the heap once after each of those phases.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: return free heap pages to the OS. False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def resident_mb() -> float | None:
    """The process's resident set size in MB (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None
