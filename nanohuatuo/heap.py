"""glibc's heap around generation and training: which freed blocks it keeps for reuse.

    return_large_blocks()     # a training process: freed activations go back to the OS
    keep_large_blocks()       # a generating one: each step's temporaries reuse the last's
    with large_blocks_kept(): # a training process's rollouts, then its own setting again
        ...

Both settings are glibc's `mallopt` thresholds, set through ctypes (elsewhere every function
returns False and changes nothing). A process's allocation pattern decides which pays: training
frees large activations once per step and should give them back; decoding allocates the same
temporaries at every step and should keep them.
"""

import contextlib
import ctypes
import ctypes.util

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
