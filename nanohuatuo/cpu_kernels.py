"""CPU kernels for decoding: the weight layouts and matrix kernels, chosen by timing.

    tune_cpu_kernels(model, batches=(1, 8))   # once per model, outside inference mode
    tune_cpu_kernels(model, compiled=True)    # for an engine that compiles its decode step
    logits = head_logits(model, h)            # (B, vocab) float32, through the head's measured kernel

A decode step on a CPU reads every weight once per token, and which memory layout (row- or
column-major) and which matrix kernel (F.linear or oneDNN's) read fastest depends on the processor
and the matrix's shape, so they are measured on this machine instead of fixed (and q, k, v and
gate, up are read as one matrix each); so is the kernel of int8 weights (cpu_int8: dequantise then
F.linear, or torch._weight_int8pack_mm, which reads the int8 bytes only but on some processors wants
bfloat16 activations). This is machine tuning, not scheduling: it lives apart from the engine (which
calls both functions, when it is made and at every decode step), and generate.py and the benchmarks
use it too.
"""

import os
import weakref

import torch
import torch.nn.functional as F

from .cpu_int8 import FusedInt8, KernelInt8Linear, measure_int8, measure_rows
from .cpu_reduction import (CHAIN, STREAM_BYTES, chain_kernel, eager_alone, reduce_all, reduce_each, reduce_row, reduces,
                            reduction, reduction_wins, seconds)
from .lora import LoRALinear
from .model import Transformer
from .quant import Int8Linear


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's kernel for a bfloat16 head, where the processor has bfloat16 instructions
_ONEDNN_BF16 = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") \
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# oneDNN's blocked weight layout, which its kernel otherwise rebuilds from the plain matrix at every
# call in bfloat16 (on an AMD EPYC a packed (151936, 512) matrix read at 20 GB/s, the plain one at 11)
# and reads faster in float32 too (the same matrix at 23 GB/s against 20, a 0.5B model's blocks at
# batch 8 at 1.8x; docs/benchmarks.md)
_ONEDNN_PACK = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_MEASURED = {}  # (what, weight shape, dtype, threads, batches[, pack]) -> decision: measured once per process


def _onednn_linear(x, w, bias=None):
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _column_major(w):
    return w.t().contiguous().t()  # same values, (in, out) in memory


def _pack(w, batch):
    """w in oneDNN's own blocked layout for products of about `batch` rows: an opaque tensor only
    oneDNN's linear kernel reads (no autograd, no saving): the weight itself in a model loaded to
    infer, a copy beside a frozen weight otherwise (`PackedCopy`)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, batch)


class PackedCopy:
    """oneDNN's packed copy of a plain weight that stays (a head tied to the embedding, whose lookup
    reads plain rows; the frozen base weights of a model training LoRA, which its training products
    read), valid while the parameters it was made from are the same tensors, unchanged: `get(params)`
    is the copy, or None once one was replaced (`.data =`, `.to()`) or written in place (a LoRA merged
    into it bumps its version counter), and the plain weight is read again. A fused matrix is checked
    through its parts' parameters: they are views made by assigning `.data`, and each counts its own
    in-place writes."""

    def __init__(self, w, batch, params):
        self.packed, self.of = _pack(w.detach(), batch), [(p.data_ptr(), p._version) for p in params]

    def get(self, params):
        return self.packed if [(p.data_ptr(), p._version) for p in params] == self.of else None


def _measure(ws, batches, head, pack=False, compiled=False, bias=False):
    """(layout, {batch: 'linear' | 'onednn'}, reduce) for the matrices ws (out, in) of one shape and
    dtype: the fastest layout over all batches ('row', 'col', or with `pack` also 'packed': oneDNN's
    own layout, read by oneDNN only), and the faster kernel at each batch in that layout. With
    `compiled` (an engine that compiles its CPU step) the row layout also has the compiler's own
    reduction at batch 1 (`reduction`), and so, called eagerly, has a matrix of a one-slot engine
    (`eager_alone`, `reduce_each`, with a bias where the layers have one: `bias`); `reduce` says
    whether that layout won and the reduction was its fastest kernel at batch 1 (the eager kernels
    still cover batch 1 outside a compiled graph, and a one-row prefill)."""
    w = ws[0]
    compiled = compiled and 1 in batches and chain_kernel() is not None
    # a one-slot eager engine's matrices (chat: every step one row) may be read by `reduction` compiled alone;
    # not with more slots: wider steps kept oneDNN's packed head there (8 slots on an AMD EPYC)
    single = eager_alone(w.numel() * w.element_size(), batches, compiled)
    key = ("head" if head else "proj", tuple(w.shape), w.dtype, torch.get_num_threads(), batches, pack, compiled, single,
           bias)
    if key not in _MEASURED:
        kernels = {"linear": F.linear}
        if _ONEDNN_LINEAR and w.dtype == torch.float32 or _ONEDNN_BF16 and w.dtype == torch.bfloat16:
            kernels["onednn"] = _onednn_linear
        b0 = torch.zeros(w.shape[0], dtype=w.dtype) if bias and single else None  # as the step passes one (`reduce_row`)
        reduce = {"reduce": reduce_all} if compiled else \
            {"reduce": lambda x, wl: reduce_each(x, wl, bias=b0)} if single else {}
        layouts = {"row": kernels | reduce, "col": kernels}
        if pack and "onednn" in kernels:
            layouts["packed"] = {"onednn": _onednn_linear}
        n = max(1, min(64, -(-STREAM_BYTES // (w.numel() * w.element_size()))))
        n = n if n <= CHAIN else -(-n // CHAIN) * CHAIN  # whole chains of `reduce_all`
        group = [ws[i] if i < len(ws) else ws[i % len(ws)].clone() for i in range(n)]
        times = {}  # (layout, batch) -> {kernel: seconds per matrix}
        # two sweeps over the layouts, the second in reverse order, each time the best of either: the
        # memory bandwidth of a shared machine drifts over seconds, and one sweep would favour
        # whichever layout was timed in a fast moment (on an AMD EPYC, a 0.5B model's matrices
        # chose row-major in one run and the packed layout in the next). A layout's copies are made
        # again in the second sweep, so only one layout's copies exist at a time (a large head's
        # copy is as large as the head).
        for order in (list(layouts), list(layouts)[::-1]):
            for layout in order:
                wl = {"row": lambda m: m, "col": _column_major, "packed": lambda m: _pack(m, max(batches))}[layout]
                wl = [wl(m) for m in group]
                for b in batches:
                    x = torch.randn(b, w.shape[1], dtype=w.dtype)
                    t = times.setdefault((layout, b), {})
                    for name, fn in layouts[layout].items():
                        if name == "reduce" and b > 1:
                            continue
                        run = (lambda: fn(x, wl)) if name == "reduce" else (lambda: [fn(x, m) for m in wl])
                        t[name] = min(t.get(name, float("inf")), seconds(run, rounds=2) / n)
                del wl
        del group
        if single and not reduction_wins(times["row", 1]["reduce"], min(
                s for (_, b), t in times.items() if b == 1 for k, s in t.items() if k != "reduce"), alone=True, head=head):
            del times["row", 1]["reduce"]
        layout = _weighing_batches_alike({lb: min(t.values()) for lb, t in times.items()}, layouts, batches)
        eager = {b: {k: s for k, s in times[layout, b].items() if k != "reduce"} for b in batches}
        reduce = "reduce" in times[layout, 1] and min(times[layout, 1], key=times[layout, 1].get) == "reduce"
        _MEASURED[key] = (layout, {b: min(eager[b], key=eager[b].get) for b in batches}, reduce)
    return _MEASURED[key]


def _weighing_batches_alike(seconds, options, batches):
    """The option with the least summed time over the best option's time at each batch size
    (seconds: {(option, batch): s}). A plain sum of seconds would let the largest batch, the slowest
    product, decide for batch 1 too."""
    best = {b: min(seconds[o, b] for o in options) for b in batches}
    cost = {o: sum(seconds[o, b] / best[b] for b in batches) for o in options}
    return min(cost, key=cost.get)


def _nearest(kernels, rows):
    """The kernel measured at the batch size nearest in ratio to `rows`."""
    rows = max(rows, 1)
    return kernels[min(kernels, key=lambda m: max(m, rows) / min(m, rows))]


class KernelLinear(torch.nn.Linear):
    """An nn.Linear whose inference-mode forward on CPU uses the kernel `tune_cpu_kernels` measured
    fastest for the nearest batch size (`kernels`: {batch: 'linear' | 'onednn'}). Anything else
    (training, gradients, no_grad scoring, another device or dtype) runs the plain F.linear, so
    only generation sees another kernel's float rounding. Same parameters and state dict as the
    nn.Linear it was (tune_cpu_kernels changes the class of that module in place)."""

    kernels: dict = {}
    packed = None  # a PackedCopy of a weight that must stay plain (tied head; frozen base of a LoRA)

    compiled_key = None  # its entry for a compiled CPU decode step (`opaque_products`)
    reduce = False  # a compiled step's batch-1 graph reads it with the compiler's `reduction`
    reduce_eager = False  # a one-slot eager step's one row reads it with `reduction` compiled alone

    def forward(self, x):
        if self.compiled_key is not None and torch.compiler.is_compiling():
            if reduces(self, x):
                return reduction(x, self.weight, self.bias)
            return torch.ops.nanohuatuo.cpu_products(x, self.compiled_key, self.out_features)
        w = self.weight
        if w.is_mkldnn:  # packed (a model loaded to infer): oneDNN is the only kernel that reads it
            return _onednn_linear(x, w, self.bias)
        if torch.is_inference_mode_enabled() and x.device.type == "cpu" and x.dtype == w.dtype:
            if self.reduce_eager and x.numel() == x.shape[-1]:
                return reduce_row(x, w, self.bias)
            if self.packed is not None and (p := self.packed.get([w])) is not None:
                return _onednn_linear(x, p, self.bias)
            if _nearest(self.kernels, x.numel() // x.shape[-1]) == "onednn":
                return _onednn_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


class FusedLinear:
    """Several projections of one input (q, k and v; gate and up) as one product while decoding.

    `tune_cpu_kernels` concatenates their weights (and biases) into one matrix and points each
    projection's parameters at its rows of it: no extra memory, and training, optimisers (their
    in-place steps write into the fused matrix) and saving see the usual parameters. On CPU a
    small product costs a fixed price per call on top of reading its weight, so one call reading
    one matrix beats three: on an AMD EPYC, a decode step of a 0.5B model's shape took 108 instead
    of 122 ms at batch 1. `usable` is checked at every call: only in inference mode on CPU, and
    only while the model's projections are still the plain layers whose weights live in the fused
    matrix (a `.to()` that moved the weights, or another wrapper, and the separate products run).
    A projection wrapped in LoRA (lora.LoRALinear, unmerged, as the PPO and GRPO policies decode
    their rollouts) keeps its base in the fused product and adds its adapter's term to its share.
    `packed`: a PackedCopy of the fused matrix where the parts are frozen weights of a model that
    trains. In a model loaded only to infer the fused matrix may itself be packed (`weight.is_mkldnn`):
    then it is the only copy of the parts' rows, read in any mode, and the parts' weights are that
    packed matrix too (`_packed_away`). `reduce`, `reduce_eager`: as KernelLinear's."""

    packed = None
    compiled_key = None  # its entry for a compiled CPU decode step (`opaque_products`)

    def __init__(self, parts, weight, bias, kernels, reduce=False, reduce_eager=False):
        self.weight, self.bias, self.kernels, self.reduce, self.reduce_eager = weight, bias, kernels, reduce, reduce_eager
        self.sizes = [m.out_features for m in parts]
        self.ptrs = [m.weight.data_ptr() for m in parts]

    def usable(self, x, parts):
        if self.compiled_key is not None and torch.compiler.is_compiling():
            return True  # the op decides, as it runs (`opaque_products`)
        if self.weight.is_mkldnn:  # packed in place (a model loaded to infer): the only copy of the parts' rows
            return x.device.type == "cpu"
        return torch.is_inference_mode_enabled() and x.device.type == "cpu" and x.dtype == self.weight.dtype \
            and all(type(_plain(m)) is torch.nn.Linear and m.weight.data_ptr() == p for m, p in zip(parts, self.ptrs))

    def __call__(self, x, parts):
        if self.compiled_key is not None and torch.compiler.is_compiling():
            if not reduces(self, x):
                return list(torch.ops.nanohuatuo.cpu_products(x, self.compiled_key, sum(self.sizes)).split(self.sizes, -1))
            # each part from its own parameters (views of the fused rows: the same bytes), so what the
            # graph reads stays the model's weights whatever later happens to the fused matrix
            out = [reduction(x, _plain(m).weight, _plain(m).bias) for m in parts]
        else:
            out = self.product(x, parts).split(self.sizes, dim=-1)
        deltas = [m.delta(x) if type(m) is LoRALinear else None for m in parts]
        return [o if d is None else o + d.to(o.dtype) for o, d in zip(out, deltas)]

    def product(self, x, parts):
        """The fused matrix's product alone (B, T, sum of the parts' sizes), no LoRA terms."""
        if self.reduce_eager and x.numel() == x.shape[-1]:  # one row, in inference mode (`usable`)
            return reduce_row(x, self.weight, self.bias)
        if self.packed is not None and (p := self.packed.get([m.weight for m in parts])) is not None:
            return _onednn_linear(x, p, self.bias)
        if _nearest(self.kernels, x.numel() // x.shape[-1]) == "onednn":  # always, for a packed weight
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _plain(m):
    """The plain layer holding a projection's weight: itself, or the base under a LoRA wrapper."""
    return m.base if type(m) is LoRALinear else m


def _point_into(parts, weight, bias):
    """Make each projection's parameters its rows of the fused weight (and bias)."""
    start = 0
    for m in parts:
        m.weight.data = weight[start:start + m.out_features]
        if bias is not None:
            m.bias.data = bias[start:start + m.out_features]
        start += m.out_features


def _packed_away(parts, packed):
    """Make a fused matrix packed in place (a model loaded only to infer) the parts' only weight: each
    part's weight parameter becomes the packed matrix itself, so the plain rows are freed, the
    parameter count stays (one shared parameter of all the parts' rows), saving refuses (packed
    weights) and a part called alone fails loudly in F.linear instead of reading other rows."""
    shared = torch.nn.Parameter(packed, requires_grad=False)
    for m in parts:
        m.weight = shared


def _groups(model):
    """(owner, [projections]) for each q/k/v and gate/up group of the model's blocks."""
    groups = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.c.qkv == "split":
            groups.append((attn, [attn.q_proj, attn.k_proj, attn.v_proj]))
        if mlp.swiglu:
            groups.append((mlp, [mlp.gate_proj, mlp.up_proj]))
    return groups


def int8_layers(model):
    """The int8 layers a forward of a tuned model runs on CPU, each with its measured kernels: its
    quant.Int8Linear layers, but q|k|v and gate|up, where fused, as their cpu_int8.FusedInt8's layer."""
    fused = [(owner.fused.layer, parts) for owner, parts in _groups(model) if type(owner.fused) is FusedInt8]
    inside = {id(m) for _, parts in fused for m in parts}
    return [m for m in model.modules() if isinstance(m, Int8Linear) and id(m) not in inside] + [f for f, _ in fused]


def _fusable(model):
    """The `_groups` that can share one matrix: plain float CPU layers (or LoRA wrappers of them) of
    one dtype, row-major, all with a bias or none."""
    return [(owner, parts) for owner, parts in _groups(model)
            if all(type(_plain(m)) is torch.nn.Linear and m.weight.is_floating_point() and m.weight.is_contiguous()
                   and m.weight.device.type == "cpu" and m.weight.dtype == parts[0].weight.dtype
                   and (m.bias is None) == (parts[0].bias is None) for m in parts)]


_KV_KEYS = 256  # keys per row when timing attention: a prompt and an answer of the evaluation sets' size


def _measure_kv(c, dtype, batches):
    """The dtype a decode step's keys and values are best kept in on this CPU for a model of config
    `c` whose weights are `dtype`: `dtype` itself or float32 (the queries cast to it, the output
    back). PyTorch's CPU attention in bfloat16 can be far slower than in float32: on an AMD EPYC a
    0.5B model's decode attention (14 heads over 2 KV heads, 256 keys, 8 rows) took 2.6 ms a layer
    in bfloat16 and 0.34 ms in float32, more than its weights take to read (docs/benchmarks.md).
    Timed with `_KV_KEYS` keys at each batch size, each weighing alike."""
    key = ("kv", c.n_heads, c.n_kv_heads, c.head_dim, dtype, torch.get_num_threads(), batches)
    if key not in _MEASURED:
        gqa, cands = c.n_kv_heads != c.n_heads, (dtype, torch.float32)
        times = {}
        for b in batches:
            q = torch.randn(b, c.n_heads, 1, c.head_dim, dtype=dtype)
            for kv in cands:
                k, v = (torch.randn(b, c.n_kv_heads, _KV_KEYS, c.head_dim, dtype=kv) for _ in range(2))
                attend = F.scaled_dot_product_attention
                times[kv, b] = seconds(lambda: attend(q.to(kv), k, v, enable_gqa=gqa).to(dtype))
        _MEASURED[key] = _weighing_batches_alike(times, cands, batches)
    return _MEASURED[key]


def tune_cpu_kernels(model: Transformer, batches=(1, 8), compiled=False):
    """Choose, by timing on this machine, the layout and kernel of the CPU weight matrices.

    A decode step is dominated by reading every weight once per token. Which layout the CPU BLAS
    reads fastest for a few rows of activations depends on the processor: on one Intel Xeon an
    (out, in) matrix stored column-major was read about twice as fast for the (vocab, dim) output
    matrix and 1.3-1.5x for the projections at batch 8; on an AMD EPYC much less. And MKL's sgemm
    reads some matrices far below memory speed where oneDNN's linear kernel does not (on an AMD
    EPYC, a 0.5B model's projections at 1.3x F.linear's speed at batch 1, a 100M model's at 1.5x
    at batch 8). So nothing is fixed. First q, k, v and gate, up are fused, one matrix per group
    (`FusedLinear`: one call instead of three or two; their parameters become views of it). Then
    for each distinct (out, in) shape of the blocks' matrices, and for the output head, this times
    F.linear and oneDNN's kernel (float32, or bfloat16 where the processor has bfloat16
    instructions) on a random (b, in) activation for each b in `batches` (at most 16), with the
    weights row-major (as loaded) and column-major (same values, transposed strides), over every
    layer's matrices of that shape one after the other (then copies, up to 64 MB or 64 matrices:
    `STREAM_BYTES`), since one small matrix timed alone stays in cache and would mislead. Every
    matrix of a shape gets the layout with the smaller summed time, each batch size weighing alike
    (time over the better layout's time at that b); a projection or head whose best kernel is
    oneDNN at some b becomes a `KernelLinear` (oneDNN in inference mode only), which like
    `FusedLinear` uses the kernel measured at the batch size nearest in ratio. For int8
    weights (quant.Int8Linear, the head included) q|k|v and gate|up are fused as well (cpu_int8.FusedInt8),
    then it times, per shape, the dequantising F.linear against _weight_int8pack_mm in the activation
    dtype and with bfloat16 activations, and sets each layer's `kernel` to the fastest
    (cpu_int8.measure_int8; the layers become `KernelInt8Linear`s, whose batch 1 may go through the
    compiler's reduction as below, called alone in a one-slot eager engine from 1 MB up), and each
    layer's `rows_kernel` for a prompt's many rows, where the dequantising F.linear in bfloat16 joins
    them (cpu_int8.measure_rows). Decisions are cached per shape, dtype,
    thread count and batches for the process, so a second model (or a second Engine) costs no
    timing. A large head is multiplied 6 times per layout, kernel and batch size (two sweeps of a
    warm-up and two timings: a few seconds for a 150k-token vocabulary on 2 cores), a test model's
    matrices take milliseconds.

    The parameter objects are kept (tied embeddings stay tied; saving writes the usual row-major
    tensors, the fused ones copied out), the values are unchanged, and it runs outside inference
    mode, so training can go on using the weights (training and no_grad scoring run F.linear on
    the separate projections, as before). No-op off CPU and when already done; NF4 weights are
    left as they are.

    oneDNN's packed layout (`_pack`) is timed as a third layout besides row and column, for float32
    weights and, on a processor with bfloat16 instructions, bfloat16 ones: oneDNN re-lays a plain
    bfloat16 matrix at every call, so packing roughly doubled its read speed on an AMD EPYC, and it
    read float32 matrices faster too (a 0.5B model's blocks 1.8x as fast at 8 rows, 1.1-1.2x at one;
    docs/benchmarks.md). In a model marked `inference_only` (generate.load_for_inference: chat,
    serve, sampling, evaluation) the matrices where it wins are replaced by packed ones, which only
    oneDNN reads: such a model can generate and score without gradients, not train or be saved
    (save_pretrained refuses). q|k|v and gate|up are fused first there too; a fused matrix packed in
    place is the only copy of its parts' rows (their weight parameters become it, `_packed_away`). A
    head tied to the embedding is packed as a copy (the lookup reads plain rows: vocabulary x dim more
    numbers, 155 MB for a 150k x 512 bfloat16 head), if that fits in a quarter of the available
    memory (`room_for`). In a model that trains, the frozen matrices (the bases under LoRA adapters,
    the head: the PPO and GRPO policies) get packed copies (`PackedCopy`, the fused matrices
    included) that decoding reads while training reads the plain ones, if all the copies fit in a
    quarter of the memory available (`_room_for_copies`): the model's frozen matrices a second time
    (0.99 GB for Qwen2.5-Coder-0.5B in bfloat16). Layouts are timed in two sweeps of opposite order,
    each the best of either, so a drift of the machine's bandwidth over the seconds of a sweep does
    not decide.

    With `compiled` (an Engine that compiles its CPU step) the row layout has a third kernel at batch
    1: the product written as a multiply and a sum (`reduction`), which the compiler turns into one
    loop of its own inside the step's graph. oneDNN's kernel costs some 14 us a call before it reads
    anything (on an AMD EPYC, a (16, 512) matrix at 1 thread or 2, against 5 us for F.linear), a
    quarter of the 54 us a 100M model's 1.6 MB q|k|v matrix takes; the compiler's loop has no such
    start. It is timed through a compiled function of its own, 8 matrices a call (`reduce_all`:
    the call's own cost, some 17 us, which a graph does not pay, spread thin), and where it wins, the
    batch-1 graph reads those matrices with it (the choice's "reduce"); batch 1 outside the graph
    (eager fallbacks, a one-token prefill) uses the layout's fastest eager kernel. Without `compiled`
    but with batch 1 the only batch size (a one-slot engine: chat), every matrix of 512 KiB or more
    (`cpu_reduction.eager_alone`) still has the reduction among its kernels, `reduction` compiled
    alone and called once a step per matrix (`reduce_row`; a call's cost, some 25 us, is in its
    timing): one vectorised loop read a large head 1.3-1.5x as fast as F.linear and oneDNN on an AMD
    EPYC, a 100M model's gate|up 1.6x. Where it wins the matrix reads its one row so in any
    inference-mode step (`reduce_eager` of a KernelLinear, a FusedLinear, an int8 layer), the choice's
    "reduce" naming it; each shape costs the load a compilation (the first some 4 s with the compiler's
    cache on disk and 15-20 s without, each further one under a second with it and one or two
    without), and a tied head needs no copy, reading the plain rows.

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
    choice = {"batches": batches, "layouts": {}, "proj": {}, "head": {}, "int8": {}, "int8_rows": {}, "kv_dtype": None,
              "reduce": []}
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear) and m.weight.device.type == "cpu"]
    for m in int8:  # timed or not: a compiled step takes their products as opaque ops (`opaque_products`)
        m.__class__ = KernelInt8Linear
    if os.environ.get("NANOHUATUO_CPU_KERNELS") == "fixed":  # repeatable runs: the loaded layouts, no timing
        model.cpu_kernels = choice
        return
    # float32 and (with bfloat16 instructions) bfloat16 weights may be packed: in place in a model loaded
    # only to infer (generate.load_for_inference), as copies beside the frozen weights of a model that
    # trains (a LoRA's bases), where those fit
    packable = _ONEDNN_PACK and (w.dtype == torch.float32 or _ONEDNN_BF16 and w.dtype == torch.bfloat16)
    pack = packable and bool(getattr(model, "inference_only", False))
    copies = packable and not pack and _room_for_copies(model)

    def reduced(name, reduce):  # the choice's list of what the compiler's reduction reads, once each
        if reduce and name not in choice["reduce"]:
            choice["reduce"].append(name)

    def frozen(weights):  # may these matrices get packed copies?
        return copies and not any(t.requires_grad for t in weights)

    with torch.inference_mode(False), torch.no_grad():
        # q, k, v and gate, up: one matrix each (made one group at a time, so the peak memory grows by
        # one group's weights), then measured like the other shapes, over every layer's
        fused = {}
        for owner, parts in _fusable(model):
            fw = torch.cat([m.weight.data for m in parts])
            fb = torch.cat([m.bias.data for m in parts]) if parts[0].bias is not None else None
            _point_into(parts, fw, fb)
            fused.setdefault((tuple(fw.shape), fw.dtype), []).append((owner, parts, fw, fb))
        in_fused = {id(_plain(m)) for group in fused.values() for _, parts, _, _ in group for m in parts}
        for (shape, dtype), group in fused.items():
            layout, kernels, reduce = _measure([fw for _, _, fw, _ in group], batches, head=False, compiled=compiled,
                                               pack=pack or frozen([m.weight for _, parts, _, _ in group for m in parts]),
                                               bias=group[0][3] is not None)
            choice["layouts"][shape], choice["proj"][shape] = layout, kernels
            reduced(shape, reduce)
            while group:  # popped, so a row-major matrix is freed as soon as its column-major copy replaces it
                owner, parts, fw, fb = group.pop()
                if layout == "col":
                    fw = _column_major(fw)
                    _point_into(parts, fw, fb)
                owner.fused = FusedLinear(parts, fw, fb, kernels, reduce and compiled, reduce and not compiled)
                if layout == "packed" and pack:  # in place: the packed matrix is all that stays
                    owner.fused.weight = _pack(fw, max(batches))
                    _packed_away(parts, owner.fused.weight)
                elif layout == "packed":
                    owner.fused.packed = PackedCopy(fw, max(batches), [m.weight for m in parts])
        by_shape = {}
        for name, m in model.layers.named_modules():
            # LoRA's own small matrices stay as they are; quantised (int8) weights are not floats
            if type(m) is torch.nn.Linear and "lora_" not in name and m.weight.is_floating_point() \
                    and m.weight.is_contiguous() and id(m) not in in_fused:
                by_shape.setdefault((tuple(m.weight.shape), m.weight.dtype, m.bias is not None), []).append(m)
        for (shape, dtype, bias), ms in by_shape.items():
            layout, kernels, reduce = _measure([m.weight.data for m in ms], batches, head=False, compiled=compiled,
                                               pack=pack or frozen([m.weight for m in ms]), bias=bias)
            choice["layouts"][shape] = layout
            choice["proj"][shape] = kernels
            reduced(shape, reduce)
            for m in ms:
                if layout == "packed" and pack:
                    m.weight = torch.nn.Parameter(_pack(m.weight.data, max(batches)), requires_grad=False)
                elif layout == "packed":
                    m.packed = PackedCopy(m.weight, max(batches), [m.weight])
                elif layout == "col":
                    m.weight.data = _column_major(m.weight.data)
                if "onednn" in kernels.values() or reduce:
                    m.__class__, m.kernels = KernelLinear, kernels
                    m.reduce, m.reduce_eager = reduce and compiled, reduce and not compiled
        if w.is_floating_point() and w.is_contiguous():
            # a head tied to the embedding is packed as a copy, if that fits (`room_for`)
            tied = w is model.embed_tokens.weight
            layout, kernels, reduce = _measure([w.data], batches, head=True, compiled=compiled, pack=frozen([w]) or pack and (
                not tied or room_for(w.numel() * w.element_size())), bias=getattr(head, "bias", None) is not None)
            choice["layouts"]["head"] = layout
            reduced("head", reduce)
            if layout == "packed" and (tied or not pack):
                head.packed = PackedCopy(w, max(batches), [w])  # a copy: the embedding lookup needs the plain rows
            elif layout == "packed":
                head.weight = torch.nn.Parameter(_pack(w.data, max(batches)), requires_grad=False)
            elif layout == "col":
                w.data = _column_major(w.data)
            if type(head) is torch.nn.Linear:
                choice["head"] = kernels
                if "onednn" in kernels.values() or layout == "packed" or reduce:
                    # reduced in a compiled step's batch-1 graph, or eagerly by its own compiled call
                    head.__class__, head.kernels = KernelLinear, kernels
                    head.reduce, head.reduce_eager = reduce and compiled, reduce and not compiled
        dtype = model.embed_tokens.weight.dtype  # the activations'
        fused8 = [(owner, parts) for owner, parts in _groups(model) if FusedInt8.fits(parts)]
        for owner, parts in fused8:  # int8 q|k|v and gate|up: one matrix each, measured in the parts' stead
            owner.fused = FusedInt8(parts)
        for m in int8_layers(model):
            m.kernel, reduce = measure_int8(m, dtype, batches, compiled, head=m is head)
            m.reduce, m.reduce_eager = reduce and compiled, reduce and not compiled
            m.rows_kernel = measure_rows(m, dtype)  # a prompt's many rows
            choice["int8"][(m.out_features, m.in_features)] = m.kernel
            choice["int8_rows"][(m.out_features, m.in_features)] = m.rows_kernel
            reduced(("int8", (m.out_features, m.in_features)), reduce)
        if dtype != torch.float32:
            choice["kv_dtype"] = _measure_kv(model.config, dtype, batches)
    model.cpu_kernels = choice


# ----------------------------------------------------------------------------- a compiled decode step

# A compiled CPU decode step (Engine(compile=True)) fuses the element-wise work between the matrix
# products (norms, rotary embeddings, residuals, activation: some forty small ops a block, each a few
# microseconds eagerly) into a few generated C++ loops, while each product still runs the kernel and
# layout measured here: the compiler cannot read oneDNN's packed weights, and its own kernels read
# the matrices no faster. So every measured projection is one opaque op in the compiled graph, which
# calls the layer's eager forward: `_OPAQUE[key]` holds weak references to the layer (a KernelLinear,
# or a FusedLinear and its parts), so a compiled graph keeps no model alive.
_OPAQUE = []
# defined with the plain operator library, not torch.library.custom_op: that wrapper costs about
# 1.5 us more a call, and a step of a 0.5B model makes 97 of them
_LIB = torch.library.Library("nanohuatuo", "DEF")
_LIB.define("cpu_products(Tensor x, int key, int out) -> Tensor")


def _cpu_products(x, key, out):
    entry = _OPAQUE[key]
    layer, parts = entry[0](), [p() for p in entry[1]]
    if layer is None or None in parts:
        raise RuntimeError("a compiled decode step called the product of a model that no longer exists")
    if not parts:  # a KernelLinear
        return layer.forward(x)
    if not layer.usable(x, parts):  # the fused matrix is no longer the parts' weights
        return torch.cat([m(x) for m in parts], dim=-1)
    if any(type(m) is LoRALinear for m in parts):  # the LoRA terms of the parts (PPO and GRPO rollouts)
        return torch.cat(layer(x, parts), dim=-1)
    return layer.product(x, parts)


_LIB.impl("cpu_products", _cpu_products, "CPU")


@torch.library.register_fake("nanohuatuo::cpu_products")
def _(x, key, out):
    return x.new_empty((*x.shape[:-1], out))


def opaque_products(model: Transformer):
    """Give each measured projection of `model` (KernelLinear, FusedLinear, an int8 layer) its entry in
    `_OPAQUE`, so a compiled decode step calls it as one op (above). Once per model; after tune_cpu_kernels."""
    fused8 = [owner.fused.layer for owner, _ in _groups(model) if type(owner.fused) is FusedInt8]
    for m in [*model.modules(), *fused8]:
        if type(m) in (KernelLinear, KernelInt8Linear) and m.compiled_key is None:
            _OPAQUE.append((weakref.ref(m), []))
            m.compiled_key = len(_OPAQUE) - 1
    for owner, parts in _groups(model):
        if type(owner.fused) is FusedLinear and owner.fused.compiled_key is None:
            _OPAQUE.append((weakref.ref(owner.fused), [weakref.ref(p) for p in parts]))
            owner.fused.compiled_key = len(_OPAQUE) - 1


def room_for(nbytes) -> bool:
    """Whether `nbytes` more (a copy, a wider cache, made for speed only) fit in a quarter of the
    memory available now (/proc/meminfo's MemAvailable; no, where that cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return nbytes <= available // 4


def _room_for_copies(model):
    """Whether packed copies of the model's frozen matrices fit (`room_for`)."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2 and not p.requires_grad)
    return 0 < nbytes and room_for(nbytes)


def head_logits(model: Transformer, h):
    """float32 logits (B, vocab) of the last hidden states h (B, dim): `model.logits`, whose head
    `tune_cpu_kernels` may have made a KernelLinear (its measured kernel in inference mode, or its
    packed weight)."""
    return model.logits(h).float()


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this processor has bfloat16 arithmetic instructions: x86's AVX512-BF16 or AMX-BF16
    (AMD Zen 4 on, Intel Cooper Lake and Sapphire Rapids on) or Arm's BF16. There bfloat16 matrix
    products are native and training pays: a LoRA SFT step of bench/sft.py's 100M model ran 2.0x
    as many tokens a second in bfloat16 as in float32 on an AMD EPYC (docs/benchmarks.md); without them
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
