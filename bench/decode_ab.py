"""A/B in one process: two variants of the engine's decode step, their steps alternated (on CPU;
`--compare compile` and `graphs` on CUDA too, with `--device cuda`).

    --compare layout   the matrices in the plain layouts (row- or column-major, each timed as
                       `tune_cpu_kernels` does) against every matrix in oneDNN's packed layout
    --compare compile  the step as chat, serve and evaluation run it (layouts tuned) eagerly
                       against the same step compiled (Engine(compile=True): the element-wise ops
                       between the products fused by torch.compile)
    --compare reduce   both compiled: every product an opaque op running its measured eager kernel
                       ("opaque", as before the choice below) against the layouts and kernels timed
                       with the compiler's batch-1 reduction among them (`tune_cpu_kernels(...,
                       compiled=True)`, as Engine(compile=True) now tunes)
    --compare head     both eager: every matrix read at batch 1 by its measured eager kernel only
                       ("kernel", as before) against the same with the compiler's reduction, compiled
                       alone and called once a step, among the kernels timed for the head and every
                       matrix of 512 KiB or more ("head-reduce", as a one-slot eager Engine now tunes;
                       --batch 1: with more slots it is not timed)
    --compare blocks   both eager, one slot: the reduction called alone for the head only (matrices of
                       16 MB or more: "head-only", as before) against the head and every matrix of
                       512 KiB or more ("head-reduce", as a one-slot eager Engine now tunes)
    --compare fuse     with --int8, both eager: q, k, v and gate, up as separate int8 matrices
                       ("separate", as before) against one int8 matrix per group ("fused",
                       cpu_int8.FusedInt8, as tune_cpu_kernels now does), kernels timed alike
    --compare pages    both eager, tuned alike: every weight on 4 KB pages ("small-pages", madvise
                       MADV_NOHUGEPAGE) against the same in transparent huge pages ("huge-pages",
                       MADV_HUGEPAGE then MADV_COLLAPSE, Linux 6.1 or later), what `import nanohuatuo`
                       now asks PyTorch's allocator for (heap.huge_pages_for_large_tensors); run it with
                       THP_MEM_ALLOC_ENABLE=0, so that neither engine's weights start in huge pages
    --compare rows     both as a one-slot engine tunes (eager, or compiled with --compile): the compiler's
                       reduction summing one row of a matrix at a time ("one-block", as before) against
                       its rows in four blocks summed side by side ("four-blocks", cpu_reduction.ROW_BLOCKS,
                       as it now runs); each engine's steps run with its own setting
    --compare chunks   as rows: a row of more than 4096 weights summed whole ("whole-rows", as before)
                       against in chunks of at most 4096 ("chunked", cpu_reduction.CHUNK, as it now runs)
    --compare graphs   with --device cuda, both compiled (CUDA graphs): torch.compile's own graphs
                       ("trees", mode reduce-overhead, the default) against the engine's
                       (`engine_runner.GraphedDecode`, "manual", as NANOHUATUO_CUDA_GRAPHS=manual asks),
                       each engine made under its own setting of that variable; not yet run on a GPU
    --compile          with --compare rows or chunks: both engines compiled (Engine(compile=True))
    --int8             every linear in int8 (quant.quantize_int8) before loading to infer, for any of these
    --swap             make variant B's engine first (in one run of two identical engines the one made
                       second read 6% faster: run both orders for a small difference)

Two copies of bench/generate.py's Qwen2-shaped model (random weights, `for_inference`, as chat,
serve and evaluation load a model), each with an Engine filled with `--batch` greedy requests
(32-token random prompts, the same for both). After a warm-up (which compiles, for a compiled
variant), `--rounds` rounds each time 8 decode steps of one engine and then of the other (the
order flipped every round) and then one round of bench/generate.py's matrix-vector bandwidth
measure; printed: each variant's median step, the median of the per-round ratios A / B, each
variant's share of the bandwidth paired round by round (a step's bytes, every weight once, over
its time, over that round's bandwidth), and whether both produced the same tokens. On a shared
machine the same code's step time moves by tens of percent from one process to the next (where
its memory landed, the bandwidth of the moment), so a change of a few percent is only visible
this way, both sides in one process and interleaved.

    python bench/decode_ab.py --compare layout --size 100M --batch 1
    python bench/decode_ab.py --compare compile --size 500M --batch 1 --rounds 12
    python bench/decode_ab.py --compare reduce --size 100M --batch 1 --rounds 8
    python bench/decode_ab.py --compare head --size 100M --batch 1 --rounds 8
    python bench/decode_ab.py --compare fuse --int8 --size 500M --batch 1 --rounds 6
    python bench/decode_ab.py --compare blocks --size 100M --batch 1 --rounds 8
    THP_MEM_ALLOC_ENABLE=0 python bench/decode_ab.py --compare pages --size 500M --batch 1 --rounds 6
    python bench/decode_ab.py --compare rows --int8 --size 500M --batch 1 --rounds 8
    python bench/decode_ab.py --compare chunks --int8 --compile --size 500M --batch 1 --rounds 8
    python bench/decode_ab.py --device cuda --dtype bfloat16 --compare graphs --size 500M --batch 1 --rounds 8

On CUDA the bandwidth is the device's (the same measure in the model's dtype), the weights are
those of the model as loaded (no CPU kernels are tuned there), and the steps are timed to the end
of each one's copy of its tokens to the host, which waits for the GPU.
"""

import argparse
import ctypes
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nanohuatuo import cpu_int8, cpu_kernels as ck, cpu_reduction  # noqa: E402
from nanohuatuo.engine import Engine, SamplingParams  # noqa: E402
from nanohuatuo.generate import for_inference  # noqa: E402
from nanohuatuo.quant import quantize_int8  # noqa: E402
from decode_profile import qwen2_model  # noqa: E402  (bench/decode_profile.py: the same shapes)
from generate import matvec_bandwidth, matvec_reader, read_bytes, sync  # noqa: E402  (bench/generate.py: the same measure)

VARIANTS = {"layout": ("plain", "packed"), "compile": ("eager", "compiled"), "reduce": ("opaque", "reduce"),
            "head": ("kernel", "head-reduce"), "fuse": ("separate", "fused"),
            "blocks": ("head-only", "head-reduce"), "pages": ("small-pages", "huge-pages"),
            "rows": ("one-block", "four-blocks"), "chunks": ("whole-rows", "chunked"), "graphs": ("trees", "manual")}
CUDA = ("compile", "graphs")  # the comparisons that also run on CUDA (graphs only there); the others time CPU kernels
# --compare rows, chunks: cpu_reduction's settings of each variant, set around its engine's tuning and steps
SETTINGS = {"one-block": dict(ROW_BLOCKS=1), "four-blocks": dict(ROW_BLOCKS=4),
            "whole-rows": dict(CHUNK=1 << 62), "chunked": dict(CHUNK=4096)}
_MADV_HUGEPAGE, _MADV_NOHUGEPAGE, _MADV_COLLAPSE = 14, 15, 25


def advise_pages(model, huge):
    """Every weight a decode step reads on 4 KB pages from now on, or moved into huge pages now
    (MADV_COLLAPSE: the kernel copies each 2 MB-aligned run of 4 KB pages into one huge page): the
    parameters and buffers (a fused matrix is its parts' storage, or, packed in place, their shared
    parameter) and the packed copies (cpu_kernels.PackedCopy) of a head or a fused matrix. Prints the
    bytes advised and those collapsed."""
    spans = {}
    copies = [c.packed for m in model.modules() for c in (getattr(m, "packed", None),
                                                           getattr(getattr(m, "fused", None), "packed", None)) if c]
    for t in [*model.parameters(), *model.buffers(), *copies]:
        if t.is_mkldnn:  # oneDNN's packed layout: an opaque tensor
            spans[torch.ops.mkldnn.data_ptr(t)] = torch.ops.mkldnn._nbytes(t)
        else:
            spans[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    libc, page = ctypes.CDLL(None, use_errno=True), 4096
    advised = collapsed = 0
    for start, n in spans.items():
        a, e = -(-start // page) * page, (start + n) // page * page
        if e <= a:
            continue
        at, size = ctypes.c_void_p(a), ctypes.c_size_t(e - a)
        advised += e - a
        if libc.madvise(at, size, _MADV_HUGEPAGE if huge else _MADV_NOHUGEPAGE) == 0 and huge:
            collapsed += (libc.madvise(at, size, _MADV_COLLAPSE) == 0) * (e - a)
    with open("/proc/self/smaps_rollup") as f:
        process = next((line.split()[1] for line in f if line.startswith("AnonHugePages")), "?")
    print(f"{'huge' if huge else '4 KB'} pages advised for {advised / 1e6:.0f} MB of weights"
          + (f", {collapsed / 1e6:.0f} MB collapsed" if huge else "") + f"; the process's huge pages: {process} kB")


_DEFAULTS = {k: getattr(cpu_reduction, k) for k in ("ROW_BLOCKS", "CHUNK")}


def settings(variant):
    """cpu_reduction's settings of `variant` (`SETTINGS`), its defaults for any other (None: all)."""
    for k, v in {**_DEFAULTS, **SETTINGS.get(variant, {})}.items():
        setattr(cpu_reduction, k, v)


def engine(variant, size, batch, dtype, seed, int8=False, compile=False, device="cpu"):
    """An Engine over a fresh model: 'plain' (layouts timed among the plain ones only), 'packed'
    (every matrix packed), 'eager', 'head-reduce' and 'fused' (tuned as usual), 'separate' (no int8
    group fused), 'compiled' and 'reduce' (tuned as usual, compile=True), 'opaque' (compile=True,
    tuned without the compiler's reduction), 'kernel' (eager, no reduction called alone), 'head-only'
    (eager, the reduction called alone for matrices of 16 MB or more), 'one-block', 'four-blocks',
    'whole-rows' and 'chunked' (tuned as usual with their `SETTINGS`, eager or `compile`d), 'trees' and
    'manual' (compile=True on CUDA: torch.compile's CUDA graphs, or the engine's own)."""
    model = qwen2_model(size, dtype, seed).to(device)
    if int8:
        quantize_int8(model)
    model = for_inference(model)
    measure, measure_int8, floor = ck._measure, ck.measure_int8, cpu_reduction.EAGER_MIN_BYTES
    fits = cpu_int8.FusedInt8.fits
    # 'trees', 'manual': NANOHUATUO_CUDA_GRAPHS, read by Engine.__init__ only, set around it and then restored
    graphs = {"NANOHUATUO_CUDA_GRAPHS": variant} if variant in VARIANTS["graphs"] else {}

    def choose(ws, batches, head, pack=False, compiled=False, bias=False):
        if variant == "packed" and pack:
            return "packed", {b: "onednn" for b in batches}, False
        return measure(ws, batches, head, pack=pack and variant != "plain", compiled=compiled and variant != "opaque",
                       bias=bias)
    ck._measure = choose
    ck.measure_int8 = lambda layer, dtype, batches, compiled=False, head=False: measure_int8(
        layer, dtype, batches, compiled and variant != "opaque", head)
    if variant in ("kernel", "opaque"):  # no reduction called alone (an opaque engine: none at all)
        cpu_reduction.EAGER_MIN_BYTES = float("inf")
    if variant == "head-only":  # the floor before the blocks' matrices took the reduction too
        cpu_reduction.EAGER_MIN_BYTES = 16 << 20
    if variant == "separate":
        cpu_int8.FusedInt8.fits = staticmethod(lambda parts: False)
    try:
        settings(variant)
        if variant in SETTINGS:  # each side times its kernels under its own settings (not the other's cached choice)
            ck._MEASURED.clear()
            cpu_int8._MEASURED.clear()
        with mock.patch.dict(os.environ, graphs):
            eng = Engine(model, slots=batch, compile=variant in ("compiled", "opaque", "reduce", "trees", "manual")
                         or compile)
        if variant in VARIANTS["pages"]:
            advise_pages(model, huge=variant == "huge-pages")
    finally:
        ck._measure, ck.measure_int8, cpu_reduction.EAGER_MIN_BYTES = measure, measure_int8, floor
        settings(None)
        cpu_int8.FusedInt8.fits = staticmethod(fits)
    g = torch.Generator().manual_seed(seed)
    for _ in range(batch):
        eng.add(torch.randint(0, model.config.vocab_size, (32,), generator=g).tolist(),
                SamplingParams(max_new_tokens=1_000_000))
    return eng


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", default="layout", choices=list(VARIANTS), help="what differs (default: layout)")
    ap.add_argument("--size", default="100M", choices=["100M", "500M", "1.5B"], help="model shape (default: 100M)")
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together (default: 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights (default: float32)")
    ap.add_argument("--int8", action="store_true", help="every linear in int8 (quant.quantize_int8), as --quant int8")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds of 8 steps each (default: 6)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default: 0)")
    ap.add_argument("--swap", action="store_true", help="make variant B's engine first")
    ap.add_argument("--compile", action="store_true", help="with --compare rows or chunks: both engines compiled")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where both engines run (default: cpu; cuda: --compare compile or graphs)")
    args = ap.parse_args()
    if args.device == "cuda" and args.compare not in CUDA:
        ap.error(f"--compare {args.compare} times CPU kernels; on CUDA: --compare " + " or ".join(CUDA))
    if args.compare == "graphs" and args.device != "cuda":
        ap.error("--compare graphs compares CUDA graphs: add --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: PyTorch sees no CUDA device here")
    if args.compile and args.compare not in ("rows", "chunks"):
        ap.error("--compile is for --compare rows or chunks (the others fix whether each side compiles)")
    if args.compare == "fuse" and not args.int8:
        ap.error("--compare fuse compares int8 groups: add --int8")
    if args.compare == "pages" and not sys.platform.startswith("linux"):
        ap.error("--compare pages advises the Linux kernel (madvise)")
    if args.compare == "pages" and os.environ.get("THP_MEM_ALLOC_ENABLE") != "0":
        ap.error("--compare pages starts both engines on 4 KB pages: run it with THP_MEM_ALLOC_ENABLE=0")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    engines = {}
    # eager and compiled: one timing of the layouts, the same choice
    for name in VARIANTS[args.compare][::-1] if args.swap else VARIANTS[args.compare]:
        engines[name] = engine(name, args.size, args.batch, dtype, args.seed, args.int8, args.compile, args.device)
        if args.device == "cpu":
            print(f"{name}: layouts {engines[name].model.cpu_kernels['layouts']}, read at batch 1 by the compiler's "
                  f"reduction: {engines[name].model.cpu_kernels['reduce']}", flush=True)
    nbytes = read_bytes(next(iter(engines.values())).model)  # int8 weights and scales too (buffers)
    # the bar: a large matrix-vector product, in float32 on CPU (the engine's kernels sum in float32 there)
    bar = dtype if args.device == "cuda" else torch.float32
    read = matvec_reader(args.device, bar)
    steps, shares = {name: [] for name in engines}, {name: [] for name in engines}

    def step(name):  # an engine's step under its own settings (the compiled kernels guard on them)
        if name in SETTINGS:
            settings(name)
        engines[name].step()  # its tokens' copy to the host waits for the device
        sync(args.device)

    with torch.inference_mode():
        for name, eng in engines.items():
            t = time.perf_counter()
            for _ in range(6):  # prefill and warm-up (a compiled variant compiles, CUDA graphs are recorded here)
                step(name)
            print(f"{name}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for name in order:
                times = []
                for _ in range(8):
                    t = time.perf_counter()
                    step(name)
                    times.append(time.perf_counter() - t)
                steps[name].append(statistics.median(times))
            bandwidth = matvec_bandwidth(args.device, bar, read=read, rounds=1)
            for name in engines:
                shares[name].append(nbytes / steps[name][-1] / bandwidth)
    for name, s in steps.items():
        print(f"{args.size} {args.dtype} batch {args.batch} {name:8s} step " + " ".join(f"{x * 1e3:.1f}" for x in s)
              + f" ms, median {statistics.median(s) * 1e3:.1f} ms; paired bandwidth share median "
              f"{statistics.median(shares[name]):.0%} ({min(shares[name]):.0%}-{max(shares[name]):.0%})")
    a, b = VARIANTS[args.compare]
    ratios = [x / y for x, y in zip(steps[a], steps[b])]
    print(f"{a} / {b} per round: " + " ".join(f"{x:.2f}" for x in ratios) + f", median {statistics.median(ratios):.2f}")
    tokens = [[r.tokens for r in eng.running] for eng in engines.values()]
    n = min(len(t) for rows in tokens for t in rows)
    same = [x[:n] == y[:n] for x, y in zip(*tokens)]
    print(f"same tokens: {sum(same)} of {len(same)} rows ({n} tokens each)")


if __name__ == "__main__":
    main()
