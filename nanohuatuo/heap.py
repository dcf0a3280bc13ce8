"""The process's memory around generation and training: glibc's heap, which freed blocks it keeps for
reuse, and the pages large tensors live in.

    return_large_blocks()     # a training process: freed activations go back to the OS
    keep_large_blocks()       # a generating one: each step's temporaries reuse the last's
    with large_blocks_kept(): # a training process's rollouts, then its own setting again
        ...
    huge_pages_for_large_tensors()   # run by `import nanohuatuo`, before torch allocates anything

The first three set glibc's `mallopt` thresholds through ctypes (elsewhere they return False and
change nothing). A process's allocation pattern decides which pays: training
frees large activations once per step and should give them back; decoding allocates the same
temporaries at every step and should keep them. The last asks PyTorch's CPU allocator for
transparent huge pages (Linux): a decode step streams every weight, and 2 MB pages spare it most of
the address translations of 4 KB ones.
"""

import contextlib
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers
_RETURNED = None  # the threshold return_large_blocks set in this process, if it did


def _mallopt(mmap_threshold: int, trim_threshold: int | None = None) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and \
            (trim_threshold is None or bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))))
    except (OSError, AttributeError):
        return False


def return_large_blocks(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more with its own mmap, returned to
    the OS when freed. By default glibc raises that threshold (up to 32 MB) each time a large block
    is freed, so a training step's activations, freed in backward, come back from its heaps, which
    fragment and keep growing: one GRPO update on CPU peaked at 1305 MiB with the default and 820
    MiB with this. Returns whether it was applied (glibc only)."""
    global _RETURNED
    if not _mallopt(threshold):  # setting it stops the raising
        return False
    _RETURNED = threshold
    return True


def keep_large_blocks(threshold: int = 64 << 20) -> bool:
    """Have glibc keep freed blocks under `threshold` bytes in its heaps (and up to 4x that free at
    a heap's top) for the next allocation, instead of mapping fresh pages for each: generation
    allocates the same temporaries at every step ((rows, vocabulary) logits, log-probs and the
    sampler's sums), and every new page costs a fault. With return_large_blocks' 1 MiB, choosing
    16 tokens from 151,936 logits with their log-probs took 27 ms a step (19,000 page faults)
    against 2.5 ms; in a fresh process with glibc's own moving threshold it took 3.5 ms at 16 rows
    of 32,000 logits (2,700 faults a step, why not looked into) against 0.6 ms (2-core AMD EPYC).
    Returns whether it was applied (glibc only)."""
    return _mallopt(threshold, 4 * threshold)


@contextlib.contextmanager
def large_blocks_kept():
    """keep_large_blocks for a while (a training process's rollouts), then the process's setting
    again: return_large_blocks' where it was applied (with glibc's default 128 KiB free at a heap's
    top), else glibc's own largest (32 MB, 64 MB free at a heap's top, where its moving threshold
    stops)."""
    keep_large_blocks()
    try:
        yield
    finally:
        if _RETURNED is not None:
            _mallopt(_RETURNED, 128 << 10)
        else:
            _mallopt(32 << 20, 64 << 20)


_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_for_large_tensors(thp: str = _THP) -> bool:
    """Have PyTorch's CPU allocator put every tensor of 2 MB or more in transparent huge pages: it
    advises the kernel so (madvise) when THP_MEM_ALLOC_ENABLE=1, which it reads once, at the
    process's first tensor allocation, hence this runs when the package is imported, before any of
    its modules makes a tensor. Only on Linux, where the kernel gives huge pages on request (`thp`
    reads "[madvise]"; under "[always]" large allocations get them anyway, under "[never]" none can),
    and only where the variable is not set already (THP_MEM_ALLOC_ENABLE=0 turns it off). The weights
    then decode faster: on a 2-core AMD EPYC, both in one process, a 100M model's float32 eager step
    took 1.05-1.11x as long on 4 KB pages as in huge ones, a 0.5B model's 1.04-1.05x
    (bench/decode_ab.py --compare pages). Returns whether it set the variable."""
    if not sys.platform.startswith("linux") or "THP_MEM_ALLOC_ENABLE" in os.environ:
        return False
    try:
        with open(thp) as f:
            if "[madvise]" not in f.read():
                return False
    except OSError:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True
