"""LoRA tensor surgery: running, reading, stacking and concatenating adapters as plain tensors.

lora.py holds the layer and the PEFT files; this module holds what RL does with adapters on one
shared base, in terms of {module name: (A, B, scaling)} dicts:
- `lora_tensors(model)`: the adapters of a model as CPU copies; `snapshot` as Parameters.
- `use_lora_weights(model, weights)`: run the LoRA layers with other (A, B) tensors for a while
  (the PPO reference, a separate critic, a reward adapter), gradients flowing to those tensors.
- `read_lora_tensors(adapter_dir, config)`: an adapter directory's tensors without a base model.
- `stack(model, parts)`: several adapters as one set of tensors for the model's LoRA layers
  (s1*B1*A1 + s2*B2*A2 = [s1*B1, s2*B2] @ [A1; A2]); `save_concatenated` writes such a sum as one
  PEFT adapter of rank r1 + r2 with scaling 1; `save_on_base` writes a model's adapter for its
  original base, concatenated after one that was merged into the weights; `save_merged` writes
  OUT/merged, the full model with the adapters folded in (every trainer's --save-merged).
"""

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from .lora import apply_lora, load_adapter, lora_modules, merge_and_unload, read_adapter_config, save_adapter
from .model import ModelConfig, Transformer
from .templates import save_chat_template

LoRATensors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module name -> (A, B, scaling)


def lora_tensors(model) -> LoRATensors:
    """CPU copies of every LoRA layer's (A, B) and its scaling."""
    return {name: (m.lora_A.weight.detach().cpu().clone(), m.lora_B.weight.detach().cpu().clone(), m.scaling)
            for name, m in lora_modules(model)}


def snapshot(model, trainable: bool) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """A copy of every LoRA layer's (A, B) as Parameters on the model's device, keyed by module name."""
    return {name: (nn.Parameter(m.lora_A.weight.detach().clone(), requires_grad=trainable),
                   nn.Parameter(m.lora_B.weight.detach().clone(), requires_grad=trainable))
            for name, m in lora_modules(model)}


@contextlib.contextmanager
def use_lora_weights(model, weights):
    """Run the LoRA layers with other (A, B) tensors for the duration; gradients flow to those tensors.

    weights: module name -> (A, B) Parameters, or None to switch that layer's adapter off. With
    gradient checkpointing the backward recomputes layers, so call backward inside the block.
    """
    saved = []
    try:
        for name, m in lora_modules(model):
            saved.append((m, m.lora_A.weight, m.lora_B.weight, m.disabled))
            if weights.get(name) is None:
                m.disabled = True
            else:
                m.lora_A.weight, m.lora_B.weight = weights[name]
                m.disabled = False
        yield model
    finally:
        for m, a, b, disabled in saved:
            m.lora_A.weight, m.lora_B.weight, m.disabled = a, b, disabled


def _shell(config: ModelConfig, r: int, alpha: float, targets, use_rslora=False) -> Transformer:
    """A weightless (meta-device) model whose LoRA tensors are real, zero CPU tensors."""
    with torch.device("meta"):
        shell = Transformer(config)
    apply_lora(shell, r=r, alpha=alpha, dropout=0.0, targets=targets, use_rslora=use_rslora)
    for _, mod in lora_modules(shell):
        mod.lora_A.weight = nn.Parameter(torch.zeros(mod.lora_A.weight.shape))
        mod.lora_B.weight = nn.Parameter(torch.zeros(mod.lora_B.weight.shape))
    return shell


def read_lora_tensors(adapter_dir, config: ModelConfig) -> tuple[LoRATensors, dict[str, torch.Tensor]]:
    """(the adapter's tensors, its extra tensors) for a model of `config`, without loading the model."""
    acfg = read_adapter_config(adapter_dir)
    shell = _shell(config, acfg["r"], acfg["lora_alpha"], acfg["target_modules"], bool(acfg.get("use_rslora")))
    extra = load_adapter(shell, adapter_dir)
    return lora_tensors(shell), extra


@torch.no_grad()
def stack(model, parts: list[LoRATensors], device) -> dict[str, tuple[nn.Parameter, nn.Parameter] | None]:
    """The sum of the adapters `parts` as (A, B) for each LoRA layer of `model` (None where no part has
    that layer), frozen, for `use_lora_weights`. B is rescaled by the layer's own scaling."""
    layers = dict(lora_modules(model))
    missing = {name for part in parts for name in part} - set(layers)
    if missing:
        raise ValueError(f"adapters.stack: the model has no LoRA layer {sorted(missing)[0]} "
                         f"({len(missing)} missing); its LoRA targets must cover every part's")
    out = {}
    for name, mod in layers.items():
        pieces = [part[name] for part in parts if name in part]
        if not pieces:
            out[name] = None
            continue
        a = torch.cat([p[0].to(device) for p in pieces], 0)
        b = torch.cat([p[1].to(device) * (p[2] / mod.scaling) for p in pieces], 1)  # the layer applies its own scaling
        out[name] = (nn.Parameter(a, requires_grad=False), nn.Parameter(b, requires_grad=False))
    return out


def save_concatenated(config: ModelConfig, parts: list[LoRATensors], out_dir, source_dir=None, extra=None):
    """Write the sum of the adapters `parts` as one PEFT adapter: rank r1 + r2 + ..., scaling 1.

    Each layer's A stacks the parts' A rows, its B their scaled B columns; a part without that
    layer contributes zeros, so every layer has the same rank as PEFT requires."""
    ranks = [max(a.shape[0] for a, _, _ in part.values()) for part in parts]
    total = sum(ranks)
    suffixes = sorted({n.rsplit(".", 1)[-1] for part in parts for n in part})
    shell = _shell(config, total, total, suffixes)  # alpha = r: scaling 1
    for name, mod in lora_modules(shell):
        A, B = mod.lora_A.weight.data, mod.lora_B.weight.data
        start = 0
        for part, r in zip(parts, ranks):
            if name in part:
                a, b, s = part[name]
                A[start:start + a.shape[0]], B[:, start:start + a.shape[0]] = a, b * s
            start += r
    shell.source_dir = source_dir
    save_adapter(shell, out_dir, extra=extra)


def save_on_base(model, out_dir, merged: LoRATensors | None = None, extra=None):
    """The model's LoRA layers as one PEFT adapter on its original base (extra: tensors for
    extra.safetensors). merged: an adapter folded into the weights before these layers were added;
    then the adapter written is the exact concatenation merged (+) these layers (save_concatenated)."""
    if merged is None:
        save_adapter(model, out_dir, extra=extra)
    else:
        save_concatenated(model.config, [merged, lora_tensors(model)], out_dir,
                          source_dir=getattr(model, "source_dir", None), extra=extra)


def save_merged(out, base_dir, tok, template, model=None, dtype=None) -> Path:
    """OUT/merged: a full model with the adapters folded in, in the base's layout (its other files
    copied), with the tokenizer and the trained chat template. model: the trained model, merged in
    place (its LoRA layers are gone after: call it last; a policy's value head is left out); None:
    the adapter already written to OUT, merged on a freshly loaded full-precision base (a 4-bit base
    takes no merge, an FSDP shard holds only part of the weights)."""
    merged = Path(out) / "merged"
    if model is None:
        model = Transformer.from_pretrained(base_dir, dtype=dtype, adapter=str(out), merge=True, value_head=False)
    else:
        model.value_head = None
        merge_and_unload(model)
    model.save_pretrained(merged, copy_from=base_dir)
    tok.save_pretrained(merged)
    save_chat_template(merged, tok, template)
    return merged
