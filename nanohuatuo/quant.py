"""Int8 weight-only quantisation for inference (as in gpt-fast).

Each linear weight is stored as int8 with one scale per output row; the forward converts the
weight back to the activation dtype on the fly. A 7B model then takes about 7 GB of weights
instead of 14 GB (bf16) or 28 GB (fp32), which is what lets it chat on a 24 GB card.
Merge a LoRA adapter into the weights before quantising.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import LoRALinear


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y + self.bias if self.bias is not None else y


@torch.no_grad()
def quantize_int8(model, skip=("value_head",)) -> int:
    """Replace every nn.Linear (the output head too, not the value head) by Int8Linear in place.

    Returns the number of layers replaced. Tied embeddings keep their full-precision copy for the
    input lookup; the output head gets its own int8 copy.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("merge the LoRA adapter first (lora.merge_and_unload) and then quantise")
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)]
    for name, m in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if model.config.norm_head and name == "lm_head":
            m.weight.requires_grad_(False)  # NormHead: already normalised at load
        setattr(parent, attr, Int8Linear(m))
    return len(todo)
