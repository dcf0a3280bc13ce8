"""CPU kernels for decoding: the weight layout and the output head's kernel, chosen by timing.

    tune_cpu_kernels(model, batches=(1, 8))   # once per model, outside inference mode
    return_large_blocks()                     # a training process: freed activations go back to the OS
    logits = head_logits(model, h)            # (B, vocab) float32, the head's measured kernel

A decode step on a CPU reads every weight once per token, and which memory layout (row- or
column-major) and which matrix kernel (F.linear or oneDNN's) read fastest depends on the processor,
so they are measured on this machine instead of fixed; so is the kernel of int8 weights
(quant.Int8Linear: dequantise then F.linear, or torch._weight_int8pack_mm, which reads the int8
bytes only but on some processors wants bfloat16 activations). This is machine tuning, not scheduling: it
lives apart from the engine (which calls both functions, when it is made and at every decode step),
and generate.py and the benchmarks use it too.
"""

import ctypes
import ctypes.util
import os
import time

import torch
import torch.nn.functional as F

from .model import Transformer
from .quant import Int8Linear, int8pack_fits


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's kernel for a bfloat16 head, where the processor has bfloat16 instructions
_ONEDNN_BF16 = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") \
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_MEASURED = {}  # (what, weight shape, dtype, threads, batches) -> decision: measured once per process


def _seconds(fn):
    """Best-of-3 (best-of-2 past 20 ms) seconds per call of fn, each timing at least ~2 ms long."""
    t = time.perf_counter()
    fn()  # warm-up, and a first estimate
    first = time.perf_counter() - t
    n = max(1, min(200, int(2e-3 / max(first, 1e-7))))
    best = float("inf")
    for _ in range(3 if first < 0.02 else 2):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def _onednn_linear(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _column_major(w):
    return w.t().contiguous().t()  # same values, (in, out) in memory


def _measure(w, batches, head):
    """('row' | 'col', {batch: 'linear' | 'onednn'}) for weight w (out, in): the faster layout over
    all batches; for the head also the faster kernel at each batch."""
    key = ("head" if head else "proj", tuple(w.shape), w.dtype, torch.get_num_threads(), batches)
    if key not in _MEASURED:
        kernels = {"linear": F.linear}
        if head and (_ONEDNN_LINEAR and w.dtype == torch.float32 or _ONEDNN_BF16 and w.dtype == torch.bfloat16):
            kernels["onednn"] = _onednn_linear
        times = {}  # (layout, kernel, batch) -> seconds
        for layout, wl in (("row", w), ("col", _column_major(w))):
            for b in batches:
                x = torch.randn(b, w.shape[1], dtype=w.dtype)
                for name, fn in kernels.items():
                    times[layout, name, b] = _seconds(lambda: fn(x, wl))
            del wl
        best = {layout: sum(min(times[layout, k, b] for k in kernels) for b in batches) for layout in ("row", "col")}
        layout = min(best, key=best.get)
        _MEASURED[key] = (layout, {b: min(kernels, key=lambda k: times[layout, k, b]) for b in batches})
    return _MEASURED[key]


def _measure_int8(layer, dtype, batches):
    """The fastest Int8Linear kernel for `layer`'s shape with activations of `dtype`, summed over
    `batches`: "dequant" against _weight_int8pack_mm in the activation dtype and (for float
    activations other than bfloat16) with the activations cast to bfloat16. A kernel whose result
    on the timing input is not within bfloat16 rounding of the dequantising one is dropped."""
    key = ("int8", (layer.out_features, layer.in_features), dtype, torch.get_num_threads(), batches)
    if key not in _MEASURED:
        kernels = {"dequant": layer.dequant}
        if int8pack_fits(layer):
            if dtype in (torch.float32, torch.bfloat16, torch.float16):
                kernels["int8pack"] = lambda x: layer.int8pack(x, x.dtype)
            if dtype != torch.bfloat16:
                kernels["int8pack_bf16"] = lambda x: layer.int8pack(x, torch.bfloat16)
        times = dict.fromkeys(kernels, 0.0)
        for b in batches:
            x = torch.randn(b, layer.in_features, dtype=dtype)
            want = layer.dequant(x.bfloat16().to(dtype)).float()  # the inputs every kernel sees alike
            for name, fn in list(kernels.items()):
                try:
                    ok = name == "dequant" or _close(fn(x.bfloat16().to(dtype)).float(), want)
                except RuntimeError:  # the op refused this shape or dtype
                    ok = False
                if not ok:
                    del kernels[name], times[name]
                    continue
                times[name] += _seconds(lambda: fn(x))
        _MEASURED[key] = min(times, key=times.get)
    return _MEASURED[key]


def _close(y, want):
    # bfloat16 activations carry 8 significant bits: errors stay far below 3% of the largest output
    return bool(torch.isfinite(y).all()) and float((y - want).abs().max()) <= 0.03 * float(want.abs().max()) + 1e-6


def tune_cpu_kernels(model: Transformer, batches=(1, 8)):
    """Choose, by timing on this machine, the layout of the CPU weight matrices and the head's kernel.

    A decode step is dominated by reading every weight once per token. Which layout the CPU BLAS
    reads fastest for a few rows of activations depends on the processor: on one Intel Xeon an
    (out, in) matrix stored column-major was read about twice as fast for the (vocab, dim) output
    matrix and 1.3-1.5x for the projections at batch 8; on an AMD EPYC much less. And MKL's sgemm
    reads a tall (vocab, dim) matrix far below memory speed on some processors where oneDNN's
    linear kernel does not. So nothing is fixed: for each distinct (out, in) shape of the blocks'
    projections, and for the output head, this times F.linear on a random (b, in) activation for
    each b in `batches` (at most 16) with the weight row-major (as loaded) and column-major (same
    values, transposed strides), and keeps for every matrix of that shape the layout with the
    smaller summed time; for the head it also times oneDNN's kernel against F.linear at each b,
    and `head_logits` uses the winner for the measured batch size nearest in ratio (oneDNN takes a
    float32 head, and a bfloat16 one where the processor has bfloat16 instructions). For int8
    weights (quant.Int8Linear, the head included) it times, per shape, the dequantising F.linear
    against _weight_int8pack_mm in the activation dtype and with bfloat16 activations, and sets
    each layer's `kernel` to the fastest (`_measure_int8`). Decisions are
    cached per shape, dtype, thread count and batches for the process, so a second model (or a
    second Engine) costs no timing. A large head is multiplied 3 times per layout, kernel and
    batch size (24 products: a few seconds for a 150k-token vocabulary on 2 cores), a test
    model's matrices take milliseconds.

    The parameter objects are kept (tied embeddings stay tied; saving writes the usual row-major
    tensors), the values are unchanged, and it runs outside inference mode, so training can go on
    using the weights. No-op off CPU and when already done; NF4 weights are left as they are.

    A choice made by timing can differ from one run to the next, and a column-major matrix sums in
    another order than a row-major one: the logits differ in the last bits, a sampled answer can
    differ from there on, and two runs of the same PPO command drift apart. With the environment
    variable NANOHUATUO_CPU_KERNELS=fixed nothing is timed: the weights stay as loaded, the head
    uses F.linear and int8 weights their dequantising kernel, so runs repeat exactly (giving up
    whatever speed the timing would have found).
    """
    head = model.lm_head
    w = getattr(head, "weight", None)
    if getattr(model, "cpu_kernels", None) is not None or w is None or w.device.type != "cpu":
        return
    # beyond 16 rows the products are compute-bound and timing a big head there would take seconds
    batches = tuple(sorted(set(min(int(b), 16) for b in batches)))
    choice = {"batches": batches, "layouts": {}, "head": {}, "int8": {}}
    if os.environ.get("NANOHUATUO_CPU_KERNELS") == "fixed":  # repeatable runs: the loaded layouts, no timing
        model.cpu_kernels = choice
        return
    with torch.inference_mode(False), torch.no_grad():
        by_shape = {}
        for name, m in model.layers.named_modules():
            # LoRA's own small matrices stay as they are; quantised (int8) weights are not floats
            if isinstance(m, torch.nn.Linear) and "lora_" not in name and m.weight.is_floating_point() \
                    and m.weight.is_contiguous():
                by_shape.setdefault((tuple(m.weight.shape), m.weight.dtype), []).append(m.weight)
        for (shape, dtype), ws in by_shape.items():
            layout, _ = _measure(ws[0].data, batches, head=False)
            choice["layouts"][shape] = layout
            if layout == "col":
                for p in ws:
                    p.data = _column_major(p.data)
        if w.is_floating_point() and w.is_contiguous():
            layout, kernels = _measure(w.data, batches, head=True)
            choice["layouts"]["head"] = layout
            if layout == "col":
                w.data = _column_major(w.data)
            if type(head) is torch.nn.Linear and not (model.config.norm_head and w.requires_grad):
                choice["head"] = kernels  # NormHead while training must go through model.logits
        dtype = model.embed_tokens.weight.dtype  # the activations'
        for m in model.modules():
            if isinstance(m, Int8Linear) and m.weight.device.type == "cpu":
                m.kernel = _measure_int8(m, dtype, batches)
                choice["int8"][(m.out_features, m.in_features)] = m.kernel
    model.cpu_kernels = choice


def head_logits(model: Transformer, h):
    """float32 logits (B, vocab) of the last hidden states h (B, dim), with the kernel that
    `tune_cpu_kernels` measured fastest for the nearest batch size (model.logits otherwise)."""
    kernels = (getattr(model, "cpu_kernels", None) or {}).get("head") if h.device.type == "cpu" else None
    if kernels and h.dtype == model.lm_head.weight.dtype:
        b = min(kernels, key=lambda m: max(m, h.shape[0]) / min(m, h.shape[0]))
        if kernels[b] == "onednn":
            return _onednn_linear(h, model.lm_head.weight).float()
    return model.logits(h).float()


def return_large_blocks(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more with its own mmap, returned to
    the OS when freed. By default glibc raises that threshold (up to 32 MB) each time a large block
    is freed, so a training step's activations, freed in backward, come back from its heaps, which
    fragment and keep growing: one GRPO update on CPU peaked at 1305 MiB with the default and 820
    MiB with this. Returns whether it was applied (glibc only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD; setting it stops the raising
    except (OSError, AttributeError):
        return False


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this processor has bfloat16 arithmetic instructions: x86's AVX512-BF16 or AMX-BF16
    (AMD Zen 4 on, Intel Cooper Lake and Sapphire Rapids on) or Arm's BF16. There bfloat16 matrix
    products are native and training pays: a forward and backward pass of a 0.5B model took 8-10 s
    in bfloat16 against 14-34 s in float32 on an AMD EPYC (docs/benchmarks.md); without them
    bfloat16 is converted to and from float32 around the arithmetic, and is not expected to be
    faster. Read from the flags the kernel reports (Linux; elsewhere False), not timed, so the
    answer is the same on every run of one machine."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    flags = set(line.split(":", 1)[-1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False
