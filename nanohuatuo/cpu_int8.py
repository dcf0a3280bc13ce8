"""CPU kernels for int8 weights while decoding: the kernel of each matrix chosen by timing, and q|k|v,
gate|up read as one int8 matrix each.

    kernel, reduce = measure_int8(layer, dtype, batches)   # cpu_kernels.tune_cpu_kernels calls these
    owner.fused = FusedInt8(parts)                          # q, k, v (gate, up) of an int8 block: one matrix

quant.Int8Linear has four kernels: dequantise then F.linear, in the activation dtype or in bfloat16,
or torch._weight_int8pack_mm (which reads the int8 bytes only but on some processors wants bfloat16
activations) in the activation dtype or in bfloat16; on top, at batch 1, the compiler's reduction
with the row scales (cpu_reduction), in a compiled step's graph or, in a one-slot eager engine,
called alone. Which reads a shape fastest depends on the processor, so it is measured here
(`measure_int8`); so is the kernel for a prompt's many rows, where the product is bound by
arithmetic rather than by reading the weight (`measure_rows`). The layers become
`KernelInt8Linear`, which runs the choices.
"""

import time

import torch

from .cpu_reduction import (CHAIN, STREAM_BYTES, chain_kernel, eager_alone, reduce_all, reduce_each, reduce_row, reduces,
                            reduction, reduction_wins, seconds)
from .quant import Int8Linear, int8pack_fits

_MEASURED = {}  # ("int8", shape, dtype, threads, batches, compiled, single, bias, head) -> (kernel, reduce), once per process


def _close(y, want):
    # bfloat16 activations carry 8 significant bits: errors stay far below 3% of the largest output
    return bool(torch.isfinite(y).all()) and float((y - want).abs().max()) <= 0.03 * float(want.abs().max()) + 1e-6


def measure_int8(layer, dtype, batches, compiled=False, head=False):
    """(kernel, reduce): the fastest Int8Linear kernel for `layer`'s shape with activations of `dtype`,
    summed over `batches`: "dequant" against _weight_int8pack_mm in the activation dtype and (for
    float activations other than bfloat16) with the activations cast to bfloat16. A kernel whose
    result on the timing input is not within bfloat16 rounding of the dequantising one is dropped.
    reduce: whether the compiler's reduction (`reduction` with the scales, float32 activations) beat
    batch 1's fastest kernel over distinct copies of the matrix (`STREAM_BYTES`, as cpu_kernels times
    float matrices: one small matrix would stay in cache), chained in a compiled step's graph
    (`compiled`), or called alone in a one-slot eager engine (`eager_alone`; `head`: the output head's,
    without a block matrix's margin, `reduction_wins`)."""
    w = layer.weight
    compiled = compiled and 1 in batches and chain_kernel() is not None
    single = eager_alone(w.numel(), batches, compiled)
    # with or without a bias: the eager reduction is compiled for one or the other
    key = ("int8", (layer.out_features, layer.in_features), dtype, torch.get_num_threads(), batches, compiled, single,
           layer.bias is not None, head)
    if key not in _MEASURED:
        # each kernel as a function of the layer, so that it also runs on copies of its weight (below)
        kernels = {"dequant": Int8Linear.dequant}
        if int8pack_fits(layer):
            if dtype in (torch.float32, torch.bfloat16, torch.float16):
                kernels["int8pack"] = lambda lay, x: Int8Linear.int8pack(lay, x, x.dtype)
            if dtype != torch.bfloat16:
                kernels["int8pack_bf16"] = lambda lay, x: Int8Linear.int8pack(lay, x, torch.bfloat16)
        times, one = dict.fromkeys(kernels, 0.0), {}  # summed over batches; at batch 1
        for b in batches:
            x = torch.randn(b, layer.in_features, dtype=dtype)
            want = layer.dequant(x.bfloat16().to(dtype)).float()  # the inputs every kernel sees alike
            for name, fn in list(kernels.items()):
                try:
                    ok = name == "dequant" or _close(fn(layer, x.bfloat16().to(dtype)).float(), want)
                except RuntimeError:  # the op refused this shape or dtype
                    ok = False
                if not ok:
                    del kernels[name], times[name]
                    continue
                times[name] += (t := seconds(lambda: fn(layer, x)))
                if b == 1:
                    one[name] = t
        kernel, reduce = min(times, key=times.get), False
        if compiled or single:  # batch 1's fastest kernel against the reduction, over distinct copies
            n = max(1, min(64, -(-STREAM_BYTES // w.numel())))
            n = n if n <= CHAIN or not compiled else -(-n // CHAIN) * CHAIN
            copies = [layer] + [Int8Linear.of(w.clone(), layer.scales, layer.bias) for _ in range(n - 1)]
            best, x = kernels[min(one, key=one.get)], torch.randn(1, layer.in_features, dtype=dtype)
            ws, bias = [c.weight for c in copies], None if layer.bias is None else layer.bias.detach()
            if compiled:
                pairs = [(c, layer.scales) for c in ws]
                reduced = seconds(lambda: reduce_all(x, pairs), rounds=2)
            else:  # with the bias, as the step passes it (`reduce_row`)
                reduced = seconds(lambda: reduce_each(x, ws, layer.scales, bias), rounds=2)
            reduce = reduction_wins(reduced, seconds(lambda: [best(c, x) for c in copies], rounds=2), alone=single,
                                    head=head)
        _MEASURED[key] = kernel, reduce
    return _MEASURED[key]


# A prompt's prefill multiplies many rows at once, and there the decode's kernels (chosen for reading
# the weight) lose: on a 2-core AMD EPYC with AVX-512 BF16, a 0.5B model's int8 gate|up at 64 rows
# took 7.6 ms in _weight_int8pack_mm with bfloat16 activations and 4.6 ms converted to bfloat16 for
# one F.linear ("dequant_bf16"), 26 against 60 ms at 512 rows. From ROWS_FROM rows a layer runs the
# kernel timed at ROWS rows, on at most ROWS_SLICE of its output rows: bound by arithmetic, a slice
# gives the rate, where the whole of a 7B model's matrix in the slowest kernel would take seconds.
ROWS_FROM, ROWS, ROWS_SLICE = 32, 64, 1024


def measure_rows(layer, dtype):
    """The fastest kernel for ROWS rows of `dtype` activations through `layer`'s shape: "dequant",
    "dequant_bf16" (activations other than bfloat16) and, where the op takes the layer, "int8pack"
    and "int8pack_bf16". A kernel not within bfloat16 rounding of the dequantising one is dropped, and
    one whose first timed call took over 4 times the quickest one's is not timed further (on that AMD
    EPYC, at 64 rows of the 0.5B gate|up, _weight_int8pack_mm with float32 activations took 233 ms
    against 7.6 ms with bfloat16 ones); the check's call is each kernel's warm-up."""
    key = ("rows", (layer.out_features, layer.in_features), dtype, torch.get_num_threads())
    if key not in _MEASURED:
        n = min(layer.out_features, ROWS_SLICE)
        part = Int8Linear.of(layer.weight[:n], layer.scales[:n])
        names = ["dequant"]
        if dtype != torch.bfloat16:
            names.append("dequant_bf16")
        if int8pack_fits(part):
            names += (["int8pack"] if dtype in (torch.float32, torch.bfloat16, torch.float16) else []) + \
                     (["int8pack_bf16"] if dtype != torch.bfloat16 else [])
        x = torch.randn(ROWS, layer.in_features, dtype=dtype)
        xb = x.bfloat16().to(dtype)  # the inputs every kernel sees alike
        want, first = part.dequant(xb).float(), {}
        for name in names:
            try:
                y = part.product(xb, name).float()  # also its warm-up: a first call may set up a kernel
            except RuntimeError:  # the op refused this shape or dtype
                continue
            if name == "dequant" or _close(y, want):
                t = time.perf_counter()
                part.product(x, name)
                first[name] = time.perf_counter() - t
        quick = min(first.values())
        times = {name: seconds(lambda: part.product(x, name)) for name, t in first.items() if t <= 4 * quick}
        _MEASURED[key] = min(times, key=times.get)
    return _MEASURED[key]


class KernelInt8Linear(Int8Linear):
    """An Int8Linear on CPU (`tune_cpu_kernels`): in a compiled step its product is one opaque op
    running its measured kernel (inductor failed to lower _weight_int8pack_mm fed by a fused cast,
    "LoweringException: AssertionError: Pointwise" in torch 2.13, so an int8 model's step was not
    compiled at all), or at batch 1 the compiler's reduction where it was timed faster (`reduce`);
    eagerly, one row goes through the reduction compiled alone where that won (`reduce_eager`)."""

    compiled_key = None  # its entry for a compiled CPU decode step (cpu_kernels.opaque_products)
    reduce = reduce_eager = False
    rows_kernel = None  # the kernel from ROWS_FROM rows on (`measure_rows`), None: `kernel` at any count

    def kernel_for(self, x):
        many = self.rows_kernel is not None and x.numel() >= ROWS_FROM * x.shape[-1]
        return self.rows_kernel if many else self.kernel

    def forward(self, x):
        if self.compiled_key is not None and torch.compiler.is_compiling():
            if reduces(self, x):
                return reduction(x, self.weight, self.bias, self.scales)
            return torch.ops.nanohuatuo.cpu_products(x, self.compiled_key, self.out_features)
        if self.reduce_eager and torch.is_inference_mode_enabled() and x.numel() == x.shape[-1]:
            return reduce_row(x, self.weight, self.bias, self.scales)
        return super().forward(x)


class FusedInt8:
    """q, k and v (gate and up) of an int8 block as one KernelInt8Linear while decoding on CPU: one
    product reading one matrix instead of three (two), as cpu_kernels.FusedLinear does for float
    weights. Each int8 product costs a fixed price per call (the activations cast, the output cast
    back), and a larger matrix is read faster by the compiler's reduction. The parts' int8 weights,
    scales and biases become views of the fused ones (no extra memory; the state dict is unchanged).
    `usable` holds while the parts' weights are still those rows (a `.to()` that moved them, and
    the parts run alone). An int8 model only infers, so any mode on CPU may read the fused product."""

    def __init__(self, parts):
        bias = torch.cat([m.bias.data for m in parts]) if parts[0].bias is not None else None
        self.layer = KernelInt8Linear.of(torch.cat([m.weight for m in parts]), torch.cat([m.scales for m in parts]),
                                         bias)
        self.sizes, start = [m.out_features for m in parts], 0
        for m in parts:
            rows = slice(start, start + m.out_features)
            m.weight, m.scales = self.layer.weight[rows], self.layer.scales[rows]
            if bias is not None:
                m.bias.data = bias[rows]
            start += m.out_features
        self.ptrs = [m.weight.data_ptr() for m in parts]

    @staticmethod
    def fits(parts) -> bool:
        """Whether `parts` can share one int8 matrix: CPU int8 layers with row-major weights and scales
        of one dtype, all with a bias or none."""
        return all(isinstance(m, Int8Linear) and m.weight.device.type == "cpu" and m.weight.is_contiguous()
                   and m.scales.dtype == parts[0].scales.dtype and (m.bias is None) == (parts[0].bias is None)
                   for m in parts)

    def usable(self, x, parts):
        if self.layer.compiled_key is not None and torch.compiler.is_compiling():
            return True
        return x.device.type == "cpu" and all(m.weight.data_ptr() == p for m, p in zip(parts, self.ptrs))

    def __call__(self, x, parts):
        return list(self.layer(x).split(self.sizes, dim=-1))
