"""The compiler's reduction: a matrix product written as a multiply and a sum, which torch.compile
turns into one vectorised loop of its own on CPU, and the compiled functions that time and call it.

    y = reduction(x, w, bias, scales)      # only ever traced (eagerly it would materialise rows x out x in)
    chain_kernel()(x, w1, ..., w8)         # `_chain` compiled: timing 8 matrices a call, as a graph reads them
    product_kernel()(x, w, bias, scales)   # `reduction` compiled alone: a one-slot eager step's matrices

cpu_kernels and cpu_int8 time these against F.linear, oneDNN and the int8 kernels (`_measure`,
`measure_int8`) and read a matrix through them where they win: inside a compiled step's batch-1
graph (`reduces`), or, in a one-slot eager engine, a matrix of `EAGER_MIN_BYTES` or more by its own
call (`eager_alone`, `reduction_wins`). The timing both modules share is here too (`seconds`, `STREAM_BYTES`).
"""

import functools
import time

import torch


@torch.inference_mode()  # as a decode step runs: outside it, the dispatcher's autograd handling adds a few us a call
def seconds(fn, rounds=3):
    """Best-of-`rounds` (at most 2 past 20 ms) seconds per call of fn, each timing at least ~2 ms long."""
    t = time.perf_counter()
    fn()  # warm-up, and a first estimate
    first = time.perf_counter() - t
    n = max(1, min(200, int(2e-3 / max(first, 1e-7))))
    best = float("inf")
    for _ in range(rounds if first < 0.02 else min(rounds, 2)):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


# A decode step streams every matrix from memory once; one small matrix timed alone would sit in the
# processor's caches and read several times faster than it does in a step, so a shape is timed over
# this many bytes of distinct matrices (the model's own, then copies of them), up to 64 matrices.
STREAM_BYTES = 64 << 20


# The compiler's loop sums one row of w at a time into one vector register: each addition waits for the
# last, and a row of 896 int8 weights took as long in cache as from memory. Written as reductions over
# `ROW_BLOCKS` blocks of rows, it becomes one loop summing a row of each block into its own register, the
# additions independent; each row's sum is the same, bit for bit. In a compiled step it also keeps the
# input apart: with one consumer, the compiler inlined the norm before a product into its loop, recomputed
# (with its bfloat16 roundings) for every row of the matrix; with four it computes it once. A/B in one
# process, batch 1, one block / four (2-core AMD EPYC): compiled steps of 0.5B-shaped models 1.41x
# (int8), 2.22x (bfloat16), 0.99x (float32, already at the bandwidth); eager ones 1.00-1.05x
# (docs/benchmarks.md).
ROW_BLOCKS = 4
# The compiler sums a reduction of more than 4096 elements through a helper (pairwise sums of 4096-element
# chunks, in a vector allocated for every row and written at every step of the loop), so a row longer than
# this is summed in equal chunks of at most this many (their number a divisor of the row's length, at
# most 16), each chunk a reduction of its own. Over distinct copies a 0.5B model's down projection (896,
# 4864) read 1.41x (int8), 1.33x (bfloat16) and 1.17x (float32) as fast, a 1.5B model's (1536, 8960)
# 1.15-1.21x; compiled one-slot steps of the 0.5B shape took it for the down projection and ran
# 1.07-1.10x as fast (2-core AMD EPYC, docs/benchmarks.md).
CHUNK = 4096


def reduction(x, w, bias=None, scales=None):
    """x @ w.T written as a product and a sum, for the compiler to turn into one loop of its own that
    reads the row-major w once: in a compiled CPU step at batch 1 that read a 100M model's matrices
    faster than oneDNN's kernel called as an opaque op (docs/benchmarks.md); eagerly it would
    materialise (rows, out, in), so it is only ever traced. In float32 whatever the weights' dtype,
    as the matrix kernels accumulate (the casts happen in the loop's registers): bfloat16 products
    rounded before the sum would lose bits no kernel loses. The rows in `ROW_BLOCKS` blocks summed side
    by side (where the blocks do not divide the rows, the last is shorter and runs as a loop of its
    own), a row longer than `CHUNK` in chunks. scales: an int8 matrix's, one per row."""
    (rows, k), xs = w.shape, x.unsqueeze(-2).float()
    chunks = next((c for c in range(-(-k // CHUNK), 17) if k % c == 0), 1)
    if chunks > 1:
        xs = xs.unflatten(-1, (chunks, k // chunks))

    def block(wb):  # the sums of some rows of w
        if chunks == 1:
            return (xs * wb.float()).sum(-1)
        return (xs * wb.float().unflatten(-1, (chunks, k // chunks))).sum(-1).sum(-1)
    n = -(-rows // ROW_BLOCKS)
    parts = [block(w[i:i + n]) for i in range(0, rows, n)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    y = (y if scales is None else y * scales.float()).to(x.dtype)
    return y if bias is None else y + bias


def reduces(layer, x):
    """Whether a traced product of `layer` (a KernelLinear, a FusedLinear, an int8 layer) is the compiler's
    reduction: chosen for it (`reduce`, only ever in the row layout, so its weights are plain) and exactly
    one row, known when traced (a compiled step's batch-1 graph)."""
    return layer.reduce and all(isinstance(d, int) and d == 1 for d in x.shape[:-1])


def _chain(x, *ws):
    """`reduction` by each of ws in turn, each product's input depending on the last's output (a
    sum of it, times a negligible factor), so the compiler keeps them apart, as a step's are. An
    int8 matrix comes as (weight, scales)."""
    for w in ws:
        w, scales = w if isinstance(w, tuple) else (w, None)
        x = x + reduction(x, w, None, scales).sum(-1, keepdim=True) * 1e-30
    return x


CHAIN = 8  # matrices per compiled call when timing: a call's own cost (some 17 us) spread over 8


@functools.cache
def chain_kernel():
    """`_chain` compiled (shapes static, as a step's weights are); None where torch.compile cannot
    build it (no C++ compiler: a compiled step decodes eagerly there)."""
    fn = torch.compile(_chain, dynamic=False, fullgraph=True)
    try:
        with torch.no_grad():
            fn(torch.ones(1, 8), torch.ones(4, 8))
    except Exception:  # noqa: BLE001 (the compiler's failures have many types; none is ours)
        return None
    # each shape, dtype and chain length timed is one compilation of the same function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return fn


def reduce_all(x, ws):
    """The compiled reduction by every matrix of ws, `CHAIN` per call (`_measure` times it so: one
    compiled call per matrix would add the call's cost to each, which inside a step's graph it does
    not pay)."""
    for i in range(0, len(ws), CHAIN):
        chain_kernel()(x, *ws[i:i + CHAIN])


# In a one-slot eager engine (chat: every step one row) a matrix at least this large has `reduction` compiled
# alone among its timed batch-1 kernels (`eager_alone`), called once a step (`reduce_row`). A call costs some
# 25 us (Dynamo's guards and the call, on a (64, 64) matrix on a 2-core AMD EPYC), yet one vectorised loop
# read many matrices enough faster to pay it: there, over distinct copies, a 100M model's float32 gate|up
# (3072, 512) in 227 us against oneDNN's 371, its q|k|v (768, 512) in 77 against 107, a 0.5B model's int8
# gate|up (9728, 896) in 430 against _weight_int8pack_mm's 717, while its float32 o (512, 512) lost (80
# against 66): the timing decides. Each shape costs the load one compilation (under a second with the
# compiler's cache on disk, one or two without); a smaller matrix (a test model's) is not worth it.
EAGER_MIN_BYTES = 512 << 10
# ... and a block's matrix takes it only where its timing beats the best other kernel's by this factor: between
# a block's other ops it did worse than alone. bfloat16 block matrices it beat oneDNN's packed kernel on by a
# few percent when timed made a 100M model's eager step 5-9% slower (2-core AMD EPYC), while the float32 and
# int8 matrices it beat by a third or more made steps faster. Not the head: one long stream at the step's end,
# read there as when timed. Under the margin a 100M float32 head timed at 9.6 ms against oneDNN's 11.2 went to
# oneDNN in one load of three, and that engine's step took 1.22x as long as one that took the reduction for
# the head and its blocks' matrices (docs/benchmarks.md).
EAGER_MARGIN = 0.85


@functools.cache
def product_kernel():
    """`reduction` compiled alone (shapes static): a one-slot eager step's large matrices, one call a step
    (`reduce_row`; see tune_cpu_kernels). None where torch.compile cannot build a kernel (`chain_kernel`)."""
    if chain_kernel() is None:
        return None
    return torch.compile(reduction, dynamic=False, fullgraph=True)


def reduction_wins(reduced, best, alone, head=False) -> bool:
    """Whether the reduction, timed at `reduced` seconds against the best other kernel's `best`, is taken:
    faster inside a compiled graph or for the output `head`, faster by `EAGER_MARGIN` when a block's matrix
    calls it `alone` (`eager_alone`)."""
    return reduced < (EAGER_MARGIN if alone and not head else 1.0) * best


def eager_alone(nbytes, batches, compiled) -> bool:
    """Whether a matrix of `nbytes` has `reduction` compiled alone among its timed batch-1 kernels: an
    engine that does not compile its step and has batch 1 as its only batch size (one slot), a matrix
    of `EAGER_MIN_BYTES` or more, and a compiler that can build the kernel."""
    return not compiled and batches == (1,) and nbytes >= EAGER_MIN_BYTES and product_kernel() is not None


def reduce_row(x, w, bias=None, scales=None):
    """x (..., in) of one row times w by `product_kernel`, in x's shape but the last dimension: an eager
    step's product (KernelLinear's, KernelInt8Linear's). Plain tensors, as `reduce_each` timed them
    (a Parameter would fail Dynamo's type guard and compile again)."""
    bias = None if bias is None else bias.detach()
    return product_kernel()(x.reshape(1, -1), w.detach(), bias, scales).reshape(*x.shape[:-1], -1)


def reduce_each(x, ws, scales=None, bias=None):
    """The compiled `reduction` by each matrix of ws (with an int8 matrix's `scales`), one call each, as an
    eager step calls it: in inference mode, with an inference tensor, and with a bias where the layer has
    one (any tensor of its shape: the values do not matter), or the first step would compile again."""
    with torch.inference_mode():
        x = x.clone()
        for w in ws:
            product_kernel()(x, w, bias, scales)
