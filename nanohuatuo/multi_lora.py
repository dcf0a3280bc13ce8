"""Several LoRA adapters on one base model, chosen per batch row: one server for many fine-tunes.

    names = attach_adapters(model, {"triage": "out/sft-a", "peds": "out/sft-b"})   # ids 1 and 2
    select_adapters(model, [0, 2, 1])   # row 0 the base, row 1 peds, row 2 triage (the engine does this)
    model forward ...                   # each row through its own adapter

Design: every linear layer some adapter targets becomes a `MultiLoRALinear`, which keeps the base
layer and stacks the adapters' A matrices into one (R, in) matrix and their B matrices into one
(out, R), R the sum of the ranks, each adapter owning a column range. A forward computes x·Aᵀ for
all adapters at once, multiplies it by a per-row mask that keeps the row's own adapter's columns
(scaled by its alpha/r) and zeroes the others, then ·Bᵀ. So one batch mixes adapters freely and
the engine's continuous batching is unchanged, and a row's result is its own adapter's: the other
adapters' columns contribute exact zeros. An adapter that does not target a layer has zero
columns there.

Cost: per targeted layer two extra products of width R (every adapter's work for every row): small
beside the base layer while R is small beside the layer's width (4 adapters of r=16 on a
4096-wide model: 64 columns, under 2% more multiply work), and nothing at all in a step where
every row runs the base. The adapters stay unmerged and run in float32 (as LoRALinear does), so a
row's logits match the merged adapter's to float rounding, not bit for bit. The mask is a tensor
set before each forward, which CUDA graphs would freeze: a model with adapters attached decodes
eagerly (serve.py refuses --compile with --lora).
"""

import math

import torch
import torch.nn as nn

from .lora import adapter_tensors, lora_modules


class AdapterBank:
    """The adapters attached to a model: their names, column ranges and the current row selection."""

    def __init__(self):
        self.names = []  # adapter i + 1 (0 is the base)
        self.ranges = []  # (start, end, scaling) of each adapter's columns
        self.mask = None  # (rows, R) float32 for the next forward, or None: every row runs the base
        self.rows = None  # (1 + adapters, R): the mask row of each adapter id

    @property
    def width(self):
        return self.ranges[-1][1] if self.ranges else 0


class MultiLoRALinear(nn.Module):
    """base(x) + ((x·Aᵀ) * mask[row]) · Bᵀ: each row of the batch through the adapter its mask selects."""

    def __init__(self, base: nn.Module, bank: AdapterBank):
        super().__init__()
        self.base, self.bank = base, bank
        out_f, in_f = base.weight.shape
        device = base.weight.device
        self.register_buffer("A", torch.zeros(0, in_f, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(out_f, 0, device=device), persistent=False)

    def grow(self, a=None, b=None, r=0):
        """Append one adapter's columns: its (r, in) A and (out, r) B, or r zero columns."""
        dev = self.A.device
        a = torch.zeros(r, self.A.shape[1], device=dev) if a is None else a.to(dev, torch.float32)
        b = torch.zeros(self.B.shape[0], r, device=dev) if b is None else b.to(dev, torch.float32)
        self.A = torch.cat([self.A, a])
        self.B = torch.cat([self.B, b], dim=1)

    def forward(self, x):
        y = self.base(x)
        mask = self.bank.mask
        if mask is None:
            return y
        h = x.to(torch.float32) @ self.A.T  # (rows, T, R)
        h = h * mask[:, None, :]
        return y + (h @ self.B.T).to(y.dtype)


def attach_adapters(model, adapters: dict[str, str]) -> list[str]:
    """Add the adapters {name: PEFT directory} to `model`, ids 1, 2, ... in order; returns the names.

    Each adapter's files are read and checked before the model is changed. The model must have no
    LoRALinear layers (merge an adapter into the base first: load_for_inference does)."""
    if lora_modules(model):
        raise ValueError("attach_adapters: the model has LoRA layers; merge them first (merge_and_unload)")
    bank = getattr(model, "adapter_bank", None) or AdapterBank()
    arch = model.config.arch
    read = []
    for name, path in adapters.items():
        cfg, pairs = adapter_tensors(path, arch)
        for module, (a, b) in pairs.items():
            try:
                m = model.get_submodule(module)
            except AttributeError:
                raise ValueError(f"{path}: targets {module}, which this {arch} model does not have") from None
            w = getattr(m.base if isinstance(m, MultiLoRALinear) else m, "weight", None)
            if w is None or w.dim() != 2:
                raise ValueError(f"{path}: targets {module}, which is not a linear layer")
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] \
                    or a.shape[0] != b.shape[1]:
                raise ValueError(f"{path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                                 f"a layer of shape {tuple(w.shape)}")
        r = int(cfg["r"])
        if any(a.shape[0] != r for a, _ in pairs.values()):
            raise ValueError(f"{path}: the tensors' rank differs from adapter_config.json's r={r}")
        scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        read.append((name, r, scaling, pairs))
    for name, r, scaling, pairs in read:
        for module in pairs:
            m = model.get_submodule(module)
            if not isinstance(m, MultiLoRALinear):
                wrapped = MultiLoRALinear(m, bank)
                wrapped.grow(r=bank.width)  # zero columns for the adapters attached before
                parent, _, child = module.rpartition(".")
                setattr(model.get_submodule(parent), child, wrapped)
        for module, m in model.named_modules():
            if isinstance(m, MultiLoRALinear):
                a, b = pairs.get(module, (None, None))
                m.grow(a, b, r)
        start = bank.width
        bank.names.append(name)
        bank.ranges.append((start, start + r, scaling))
    device = next(model.parameters()).device
    bank.rows = torch.zeros(1 + len(bank.names), bank.width, device=device)
    for i, (start, end, scaling) in enumerate(bank.ranges):
        bank.rows[i + 1, start:end] = scaling
    model.adapter_bank = bank
    return list(bank.names)


def select_adapters(model, ids):
    """The adapter of each batch row in the next forwards (0: the base): the mask every
    MultiLoRALinear reads. A model without adapters accepts only zeros."""
    bank = getattr(model, "adapter_bank", None)
    if bank is None or not any(ids):
        if any(ids):
            raise ValueError("select_adapters: this model has no adapters attached")
        if bank is not None:
            bank.mask = None
        return
    bank.mask = bank.rows[torch.tensor(list(ids), device=bank.rows.device)]
