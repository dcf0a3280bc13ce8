"""Weight quantisation: int8 for inference, NF4 (4-bit) frozen bases for QLoRA training.

int8 (as in gpt-fast): each linear weight is stored as int8 with one scale per output row. A 7B
model then takes about 7 GB of weights instead of 14 GB (bf16) or 28 GB (fp32), which lets it chat
on a 24 GB card. Merge a LoRA adapter into the weights before quantising. The forward has four
kernels (`Int8Linear.kernel`; a prompt's many rows may take another, `rows_kernel`), chosen per
weight shape by timing on CPU (cpu_int8.py):
- "dequant" (the default, and always on GPU): the weight converted to the activation dtype on the
  fly, one F.linear, times the scales. It reads the int8 bytes and then writes and reads a float
  copy, so on CPU a decode step is slower than with float weights;
- "dequant_bf16": the same in bfloat16 (int8 values are bfloat16 numbers, so the weight converts
  exactly), the activations cast to bfloat16 and the output cast back: a prompt's product of many
  rows is compute-bound, and bfloat16 instructions do twice float32's work per cycle;
- "int8pack": torch._weight_int8pack_mm, which reads the int8 bytes only, in the activation dtype;
- "int8pack_bf16": the same with the activations cast to bfloat16 and the output cast back: on a
  CPU with AVX-512 BF16 its float32-activation kernel was 8x slower than the bfloat16 one. The
  activations are then rounded as a bfloat16 model's are.
_weight_int8pack_mm wants a 2-D contiguous activation, a contiguous (out, in) int8 weight and
scales of the activation dtype; `int8pack_fits` says whether a layer can take it at all (with
in-features that are no multiple of 16 it crashed or returned wrong values on one AVX-512 machine).

NF4 (QLoRA, Dettmers et al. 2023), the layout bitsandbytes uses:
- the weight, flattened row-major, is cut into blocks of 64; each block is divided by its absmax
  and every value replaced by the index of the nearest of the 16 NF4 code values (`NF4_CODE`:
  quantiles of a normal distribution scaled to [-1, 1], with an exact 0);
- two 4-bit indices are packed per uint8, the first of a pair in the high nibble;
- double quantisation: the float32 absmaxes (0.5 bits per weight) are themselves stored as int8
  around their mean with one float32 scale per 256 of them (0.127 bits per weight). bitsandbytes
  uses an 8-bit dynamic float code there; a symmetric int8 grid is simpler and as fine for a
  positive, narrow distribution.
A weight then costs 4.127 bits: a 7B base's block linears take about 3.4 GB instead of 13 GB in bf16.

`NF4Linear` is frozen: its forward dequantises the weight to the compute dtype for one matmul and
drops it, and the backward (gradient for the input only: the base takes none) dequantises it again
rather than keeping a copy for every layer until the backward. LoRA goes on top (lora.LoRALinear
wraps an NF4Linear like an nn.Linear); the embedding, lm_head and value head stay in the compute
dtype. `quantize(model, "nf4")` is applied by `Transformer.from_pretrained(..., quant=)`, after any
adapter to be merged has been merged: a 4-bit base takes no merge afterwards (rounding the merged
sum to 4 bits again would lose most of a small update), so a QLoRA run saves a LoRA adapter that
loads on the full-precision base like any other.

Why not torchao's NF4Tensor (which also runs on CPU): a tensor subclass reaches into every aten op
it meets (views, FSDP, state dicts), ties the project to torchao's release matching the installed
torch, and its wheels carry compiled extensions; the 4-bit layer needed here is 80 lines.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# one flag, --quant, in every command that loads a model; training takes the formats a frozen base can have
QUANTS = ("none", "nf4")  # what a training base can be loaded as (int8 has no backward: inference only)
QUANT_HELP = ("frozen base weights: none (the compute dtype) or nf4 (4-bit, QLoRA; LoRA training only); int8 is "
              "for inference only (chat.py, serve.py)")
INFERENCE_QUANTS = ("none", "int8", "nf4")  # what chat and serve can load a model as
INFERENCE_QUANT_HELP = ("weight quantisation: none (the compute dtype), int8 (weight-only, one scale per row: a 7B "
                        "model in about 7.5 GB) or nf4 (4-bit blocks, about 4 GB; slower per token)")
HEADS = ("lm_head", "value_head")  # never quantised: the losses read lm_head's weight directly


# ----------------------------------------------------------------------------- int8 (inference)

# in-features that _weight_int8pack_mm is given: a multiple of 16 was measured safe on AVX-512; 32
# leaves a margin for kernels of other vector widths (every real model's widths are multiples of 64)
INT8PACK_IN_MULTIPLE = 32


class Int8Linear(nn.Module):
    kernel = "dequant"  # the forward's kernel (see the module docstring); cpu_kernels sets it by timing

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @classmethod
    def of(cls, weight, scales, bias=None):
        """A layer of an int8 (out, in) weight and its row scales as they are (no rounding): q|k|v or
        gate|up read as one matrix (cpu_int8.FusedInt8)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.register_buffer("weight", weight)
        layer.register_buffer("scales", scales)
        layer.bias = bias
        layer.out_features, layer.in_features = weight.shape
        return layer

    def forward(self, x):
        y = self.product(x, self.kernel_for(x))
        return y + self.bias if self.bias is not None else y

    def kernel_for(self, x):
        """The kernel for input x: `kernel` (cpu_int8.KernelInt8Linear may take another for many rows)."""
        return self.kernel

    def product(self, x, kernel):
        """x @ W.T by `kernel` (the module docstring's names), without the bias (off CPU the int8pack
        kernels fall back to "dequant")."""
        if kernel.startswith("int8pack") and x.device.type == "cpu" and self.weight.device.type == "cpu":
            return self.int8pack(x, torch.bfloat16 if kernel == "int8pack_bf16" else x.dtype)
        return self.dequant(x, torch.bfloat16 if kernel == "dequant_bf16" else None)

    def dequant(self, x, dtype=None):
        """x @ W.T, the weight converted to `dtype` (default x's: the reference numerics) for one
        F.linear, times the scales in that dtype; the result in x's dtype."""
        dtype = dtype or x.dtype
        return (F.linear(x.to(dtype), self.weight.to(dtype)) * self.scales.to(dtype)).to(x.dtype)

    def int8pack(self, x, dtype):
        """x @ W.T by torch._weight_int8pack_mm (reads the int8 weight as it is), the activations and
        scales in `dtype`, the result cast back to x's dtype. Only for a layer `int8pack_fits`."""
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(dtype).contiguous(), self.weight,
                                      self.scales.to(dtype))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")


def int8pack_fits(layer: Int8Linear) -> bool:
    """Whether `layer` meets torch._weight_int8pack_mm's requirements on CPU: the op exists, the weight
    is a contiguous (out, in) int8 CPU tensor and in-features a multiple of INT8PACK_IN_MULTIPLE."""
    w = layer.weight
    return (hasattr(torch, "_weight_int8pack_mm") and w.device.type == "cpu" and w.dtype == torch.int8
            and w.dim() == 2 and w.is_contiguous() and layer.in_features % INT8PACK_IN_MULTIPLE == 0)


@torch.no_grad()
def quantize_int8(model, skip=("value_head",)) -> int:
    """Replace every nn.Linear (the output head too, not the value head) by Int8Linear in place.

    Returns the number of layers replaced. Tied embeddings keep their full-precision copy for the
    input lookup; the output head gets its own int8 copy.
    """
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("merge the LoRA adapter first (lora.merge_and_unload) and then quantise")
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)]
    for name, m in todo:
        if model.config.norm_head and name == "lm_head":
            m.weight.requires_grad_(False)  # NormHead: already normalised at load
        _replace(model, name, Int8Linear(m))
    return len(todo)


def _replace(model, name, new):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


# ----------------------------------------------------------------------------- NF4 codes

# the 16 NF4 values as bitsandbytes stores them (float32); index 7 is the exact zero
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmaxes per float32 scale (double quantisation)


def _blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """t flattened and zero-padded to whole blocks, as (n_blocks, block) float32."""
    flat = t.detach().reshape(-1).float()
    return F.pad(flat, (0, -flat.numel() % block)).view(-1, block)


def nf4_quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes (ceil(numel / block) * block / 2,), absmax float32 per block) of `w`.

    Each value goes to the nearest code of w / absmax; a value exactly halfway goes to the lower one,
    as bitsandbytes' comparisons do. An all-zero block has absmax 0 and codes 7 (zero)."""
    if block % 2:
        raise ValueError(f"NF4 block size {block}: it must be even (two codes per byte)")
    x = _blocks(w, block)
    absmax = x.abs().amax(dim=1)
    normed = x / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    code = NF4_CODE.to(x.device)
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8).view(-1, 2)
    return (idx[:, 0] << 4) | idx[:, 1], absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """The weight of `shape` that `nf4_quantize` stored: code value * its block's absmax, in `dtype`."""
    idx = torch.stack([packed >> 4, packed & 15], dim=1).view(absmax.numel(), -1).int()
    w = NF4_CODE.to(absmax.device)[idx] * absmax.float()[:, None]
    return w.view(-1)[:torch.Size(shape).numel()].view(shape).to(dtype)


def absmax_quantize(absmax: torch.Tensor, block: int = ABSMAX_BLOCK):
    """Double quantisation: (int8 codes, float32 scale per `block`, float32 mean) of the absmaxes."""
    mean = absmax.mean()
    x = _blocks(absmax - mean, block)
    scale = x.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.view(-1)[:absmax.numel()], scale, mean


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, block: int = ABSMAX_BLOCK):
    return q.float() * scale.repeat_interleave(block)[:q.numel()] + mean


# ----------------------------------------------------------------------------- the 4-bit layer

class _FrozenMatmul(torch.autograd.Function):
    """x @ W.T for a frozen quantised W: only the input gets a gradient, and the backward
    dequantises W again instead of saving the forward's dequantised copy."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        w = ctx.layer.dequantize(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 (see the module docstring); the bias, if
    any, stays as it was (frozen). dtype: the weight's original dtype, the default compute dtype."""

    def __init__(self, linear: nn.Linear, block: int = BLOCK, double_quant: bool = True):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block, self.dtype = block, w.dtype
        packed, absmax = nf4_quantize(w, block)
        self.register_buffer("packed", packed)
        self.double_quant = double_quant
        if double_quant:
            q, scale, mean = absmax_quantize(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_mean", mean)
        else:
            self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def block_absmax(self) -> torch.Tensor:
        if self.double_quant:
            return absmax_dequantize(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: the original one), computed afresh."""
        return nf4_dequantize(self.packed, self.block_absmax(), (self.out_features, self.in_features),
                              dtype or self.dtype)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # the matmul runs in the autocast dtype: dequantise to it
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _FrozenMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, double_quant={self.double_quant}")


@torch.no_grad()
def quantize(model, quant: str) -> int:
    """Store the linear layers inside the transformer blocks (also the base of a LoRALinear) in the
    format `quant` ("none" does nothing), frozen, in place; returns how many were replaced.

    Embeddings and the heads keep their dtype. Merge any adapter meant to be part of the base first:
    a quantised base takes no merge."""
    if quant not in QUANTS:
        raise ValueError(f"quantisation {quant!r}: expected one of {', '.join(QUANTS)}")
    if quant == "none":
        return 0
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.") and not name.endswith((".lora_A", ".lora_B"))]
    for name, m in todo:
        _replace(model, name, NF4Linear(m))
    model.quant = quant
    return len(todo)
