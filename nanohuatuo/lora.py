"""LoRA adapters: the wrapped linear layer, applying/merging/disabling them, and PEFT-format files.

`apply_lora` swaps the targeted `nn.Linear` layers of a `Transformer` for `LoRALinear` (the frozen
original plus a trainable low-rank update B·A scaled by alpha/r) and freezes everything else.
Targets are matched like PEFT's `target_modules`: by the last name component (or a dotted suffix,
or a regex string), under either our module names or the Hugging Face ones, so `q_proj`, `W_pack`,
`query_key_value` and BLOOM's `dense` all work.

Adapters are read and written in PEFT's layout (adapter_config.json + adapter_model.safetensors with
`base_model.model.<HF module>.lora_A.weight` keys), so `peft.PeftModel.from_pretrained` loads ours
and we load theirs. The PPO reference model is the same network with adapters switched off
(`disabled_adapters`), and `merge_and_unload` folds them in for a plain `save_pretrained` export.

LoRA parameters stay float32 on a bf16/fp16 base: half-precision trainable LoRA weights are a known
source of NaNs, so the adapter path runs in float32 and only its output is cast back.
"""

import contextlib
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .hf import (MissingFileError, ModelDirError, atomic_json, atomic_write, hf_to_ours, ours_to_hf, read_json,
                 safetensors_header)
from .quant import NF4Linear

# Llama-family names; `default_targets(model)` gives every projection of any family
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEADS = ("lm_head", "value_head")  # trained in full when needed; `Transformer.logits` bypasses lm_head's forward
LINEARS = (nn.Linear, NF4Linear)  # what LoRA wraps: a plain layer or a frozen 4-bit one (QLoRA)


# ----------------------------------------------------------------------------- the layer

class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * scaling, with `base` frozen and A, B in float32.

    `disabled` turns the adapter off (output == base exactly); `merged` means the update has been
    added into `base.weight` (forward is then base alone). Merging computes the update in float32
    and rounds the sum to the base dtype, so in float32 `unmerge` restores the weights up to one
    rounding step and in bf16/fp16 it is not bit-exact (the merged weight lost the low bits).

    `weight`/`bias` read the base's, so code that looks at `module.weight` keeps working, and the
    state dict uses the plain layer's names (`q_proj.weight`, not `q_proj.base.weight`) next to
    `lora_A.weight`/`lora_B.weight`: `save_pretrained` of a LoRA model writes the base model.
    On a 4-bit base (quant.NF4Linear) there is no `weight` and no merging: save the adapter.
    """

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r={r}: it must be a positive integer")
        self.base = base.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = (base.packed if isinstance(base, NF4Linear) else base.weight).device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)  # so a fresh adapter starts as the identity change
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False
        self.register_state_dict_post_hook(_plain_names_out)
        self.register_load_state_dict_pre_hook(_plain_names_in)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        y = self.base(x)
        d = self.delta(x)
        return y if d is None else y + d.to(y.dtype)

    def delta(self, x):
        """The adapter's term B(A(dropout(x)))·scaling in x's dtype; None while disabled or merged.
        (cpu_kernels.FusedLinear adds it to its share of a fused base product.)"""
        if self.disabled or self.merged:
            return None
        # Whichever of the activations and the float32 adapter weights is smaller is cast to the other's
        # dtype. Training and scoring: the (tokens, in) activations outnumber the (r, in) and (out, r)
        # weights, which are cast, as autocast would run it (a no-op when the dtypes agree; gradients still
        # reach and stay float32; on CPU a bfloat16 LoRA SFT step ran 13% faster than with the activations
        # cast, bench/sft.py). A decode step: a few rows, so they are cast and the products run in float32
        # (on an AMD EPYC the bfloat16 pair took 1.7-4x as long, docs/benchmarks.md). The scaling
        # multiplies the (tokens, r) intermediate, the smallest tensor on the way.
        A, B = self.lora_A.weight, self.lora_B.weight
        dtype = A.dtype if x.numel() <= A.numel() + B.numel() else x.dtype
        h = F.linear(self.lora_dropout(x).to(dtype), A.to(dtype)) * self.scaling
        return F.linear(h, B.to(dtype))

    def delta_weight(self) -> torch.Tensor:
        """The update B·A·scaling as a float32 (out, in) matrix."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if self.disabled:
            raise RuntimeError("LoRALinear.merge: the adapter is disabled; enable it before merging")
        if isinstance(self.base, NF4Linear):
            raise RuntimeError("LoRALinear.merge: the base is 4-bit (NF4), and rounding base + update to 4 bits "
                               "would lose most of the update; save the adapter and merge it on the "
                               "full-precision base")
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _plain_names_out(module, state_dict, prefix, local_metadata):
    # `q_proj.base.weight` -> `q_proj.weight`: checkpoints keep the plain model's names
    for p in ("weight", "bias"):
        if prefix + "base." + p in state_dict:
            state_dict[prefix + p] = state_dict.pop(prefix + "base." + p)


def _plain_names_in(module, state_dict, prefix, *args):
    for p in ("weight", "bias"):
        if prefix + p in state_dict:
            state_dict[prefix + "base." + p] = state_dict.pop(prefix + p)


# ----------------------------------------------------------------------------- applying and switching

def _hf_module_name(name: str, arch: str) -> str:
    return ours_to_hf(name + ".weight", arch).removesuffix(".weight")


def _is_target(targets, names) -> bool:
    """PEFT's rule: a regex string must match a whole name; a list entry the name or a dotted suffix."""
    if isinstance(targets, str):
        return targets == "all-linear" or any(re.fullmatch(targets, n) for n in names)
    return any(n == t or n.endswith("." + t) for t in targets for n in names)


def default_targets(model) -> list[str]:
    """Every linear layer inside the blocks, by its last Hugging Face name, in model order.

    The same list for SFT, the reward model and PPO, so they adapt the same layers and PPO can share
    the base with the reward model: q/k/v/o and gate/up/down for Llama, Mistral, Qwen; `W_pack`,
    o/gate/up/down for Baichuan; `query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h` for BLOOM.
    """
    arch, names = model.config.arch, []
    for n, m in model.named_modules():
        inside_lora = n.rsplit(".", 1)[-1] in ("base", "lora_A", "lora_B")
        if n.startswith("layers.") and (isinstance(m, LoRALinear) or (isinstance(m, LINEARS) and not inside_lora)):
            last = _hf_module_name(n, arch).rsplit(".", 1)[-1]
            if last not in names:
                names.append(last)
    return names


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, r=8, alpha=16, dropout=0.05, targets=DEFAULT_TARGETS, use_rslora=False) -> list[str]:
    """Wrap the targeted linear layers in `LoRALinear`, freeze every other parameter, return their names.

    targets: names as in PEFT's `target_modules` (ours or Hugging Face's), or one regex string, or
    "all-linear". The heads are never targets: unfreeze a value head yourself and save it through
    `save_adapter(..., extra=...)`. Cast the model to its dtype before this call: a later
    `model.to(torch.bfloat16)` would cast the LoRA weights too.
    """
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_and_unload first to stack another)")
    if not isinstance(targets, str) and set(targets) & set(HEADS):
        raise ValueError(f"apply_lora: targets {list(targets)} name a head ({', '.join(HEADS)}); heads take no "
                         f"LoRA here: train them in full and save them with save_adapter(..., extra=...)")
    arch = model.config.arch
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, LINEARS) and n.split(".")[0] not in HEADS]
    chosen = [(n, m) for n, m in linears if _is_target(targets, (n, _hf_module_name(n, arch)))]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"apply_lora: no linear layer matches targets {targets!r}; this {arch} model has "
                         f"{', '.join(names)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(lin, r, alpha, dropout, use_rslora))
    saved_targets = targets if isinstance(targets, str) else \
        sorted({_hf_module_name(n, arch).rsplit(".", 1)[-1] for n, _ in chosen})
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": saved_targets, "use_rslora": use_rslora}
    return [n for n, _ in chosen]


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def set_lora_enabled(model, enabled: bool):
    for name, m in lora_modules(model):
        if not enabled and m.merged:
            raise RuntimeError(f"set_lora_enabled: {name} has its adapter merged into the weights; "
                               f"unmerge_lora(model) before disabling adapters")
        m.disabled = not enabled


@contextlib.contextmanager
def disabled_adapters(model):
    """The base model for the duration (PPO's reference policy), then each adapter as it was."""
    before = [(m, m.disabled) for _, m in lora_modules(model)]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for m, was in before:
            m.disabled = was


def merge_lora(model):
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model):
    for _, m in lora_modules(model):
        m.unmerge()


def merge_and_unload(model):
    """Fold every adapter into its weight and put plain `nn.Linear`s back, all parameters trainable
    as after loading; the result saves with `save_pretrained` like any base model."""
    for name, m in lora_modules(model):
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base)
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ----------------------------------------------------------------------------- PEFT files

CONFIG_FILE, WEIGHTS_FILE, EXTRA_FILE = "adapter_config.json", "adapter_model.safetensors", "extra.safetensors"
# LoraConfig fields for variants this module does not implement; any truthy value is refused
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "layer_replication", "modules_to_save", "target_parameters", "exclude_modules",
                "trainable_token_indices")


def save_adapter(model, out_dir, extra: dict[str, torch.Tensor] | None = None):
    """Write the adapters in PEFT's layout to `out_dir`.

    extra: tensors that belong with the adapter but are not LoRA (a reward model's value head),
    stored under their own names in extra.safetensors, which PEFT ignores and `load_adapter`
    returns. Without `extra` a stale extra.safetensors from an earlier save is removed. Each file
    is written under a temporary name and renamed, the config last, so a directory with a config
    has complete weights.
    """
    cfg = getattr(model, "lora_config", None)
    mods = lora_modules(model)
    if cfg is None or not mods:
        raise ValueError("save_adapter: the model has no LoRA adapters (call apply_lora or load_adapter first)")
    arch = model.config.arch
    tensors = {}
    for name, m in mods:
        key = "base_model.model." + _hf_module_name(name, arch)
        tensors[key + ".lora_A.weight"] = m.lora_A.weight.detach().to("cpu").contiguous()
        tensors[key + ".lora_B.weight"] = m.lora_B.weight.detach().to("cpu").contiguous()
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": "pt"}
    atomic_write(os.path.join(out_dir, WEIGHTS_FILE), lambda tmp: save_file(tensors, tmp, metadata=meta))
    extra_path = os.path.join(out_dir, EXTRA_FILE)
    if extra:
        cpu = {k: t.detach().to("cpu").contiguous() for k, t in extra.items()}
        atomic_write(extra_path, lambda tmp: save_file(cpu, tmp, metadata=meta))
    elif os.path.exists(extra_path):
        os.remove(extra_path)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
              "lora_dropout": cfg["lora_dropout"], "target_modules": cfg["target_modules"], "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": getattr(model, "source_dir", None),
              "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
              "use_rslora": cfg["use_rslora"], "use_dora": False}
    atomic_json(os.path.join(out_dir, CONFIG_FILE), config)


def _peft_key_to_ours(key: str, arch: str) -> str | None:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A[.default].weight` -> our parameter name."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
    if m is None:
        return None
    module, which = m.groups()
    return hf_to_ours(module + ".weight", arch).removesuffix(".weight") + f".{which}.weight"


def read_adapter_config(adapter_dir) -> dict:
    where = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.exists(where):
        raise MissingFileError(f"{where} not found: is {adapter_dir} a LoRA adapter directory (PEFT layout)?")
    cfg = read_json(where)
    if not isinstance(cfg, dict):
        raise ModelDirError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ModelDirError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    for k in _UNSUPPORTED:
        if cfg.get(k):
            raise ModelDirError(f"{where}: {k}={cfg[k]!r} is not supported (plain LoRA only); "
                                f"merge that adapter with PEFT and load the merged model instead")
    if cfg.get("bias", "none") != "none":
        raise ModelDirError(f"{where}: bias={cfg['bias']!r} is not supported (only 'none')")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in cfg:
            raise ModelDirError(f"{where}: missing key {k!r}")
    return cfg


def adapter_tensors(adapter_dir, arch: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {our module name: (lora_A (r, in), lora_B (out, r))}) of the adapter in `adapter_dir`,
    read without a model (multi_lora.py stacks several adapters this way)."""
    cfg = read_adapter_config(adapter_dir)
    where = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.exists(where):
        raise MissingFileError(f"{where} not found")
    safetensors_header(where)
    pairs = {}
    with safe_open(where, "pt", device="cpu") as f:
        for key in f.keys():
            name = _peft_key_to_ours(key, arch)
            if name is None:
                raise ModelDirError(f"{where}: unexpected tensor {key!r} (not a lora_A or lora_B weight)")
            module, which = name.removesuffix(".weight").rsplit(".", 1)
            pairs.setdefault(module, {})[which] = f.get_tensor(key)
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ModelDirError(f"{where}: {module} has {', '.join(sorted(pair))} but not both lora_A and lora_B")
    return cfg, {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}


def load_adapter(model, adapter_dir, trainable: bool = False) -> dict[str, torch.Tensor]:
    """Apply the adapter in `adapter_dir` (ours or PEFT's) to `model`; return its extra tensors or {}.

    LoRA layers are added with the file's settings unless the model already has them (then r,
    alpha and rslora must agree). trainable=False (as PEFT's default) freezes the adapter and puts
    the model in eval mode; trainable=True keeps the LoRA weights trainable to resume training.
    """
    cfg = read_adapter_config(adapter_dir)
    where = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.exists(where):
        bins = os.path.exists(os.path.join(adapter_dir, "adapter_model.bin"))
        hint = " It has adapter_model.bin: re-save it with PEFT's save_pretrained(safe_serialization=True)." \
            if bins else ""
        raise MissingFileError(f"{where} not found.{hint}")
    want = {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora", False))}
    have = getattr(model, "lora_config", None)
    if have is None:
        try:
            apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout") or 0.0,
                       targets=cfg["target_modules"], use_rslora=want["use_rslora"])
        except ValueError as e:  # target_modules that fit no layer: the file is at fault, so it is named
            raise ModelDirError(f"{os.path.join(adapter_dir, CONFIG_FILE)}: {str(e).removeprefix('apply_lora: ')}"
                                ) from None
    elif any(have[k] != v for k, v in want.items()):
        ours = {k: have[k] for k in want}
        raise ValueError(f"{adapter_dir}: the model already has LoRA adapters with {ours} but {CONFIG_FILE} "
                         f"says {want}; load onto a model without adapters")
    arch = model.config.arch
    params = {n: p for n, p in model.named_parameters() if n.endswith((".lora_A.weight", ".lora_B.weight"))}
    loaded = set()
    safetensors_header(where)  # a truncated file is named as such, not a crash mid-read
    with safe_open(where, "pt", device="cpu") as f:
        for key in f.keys():
            name = _peft_key_to_ours(key, arch)
            if name not in params:
                raise ModelDirError(f"{where}: unexpected tensor {key!r} (no such LoRA weight in this {arch} model "
                                    f"with target_modules {cfg['target_modules']})")
            t = f.get_tensor(key)
            p = params[name]
            if t.shape != p.shape:
                raise ModelDirError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, the model's LoRA "
                                    f"(r={cfg['r']}) expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)  # copy_ keeps our float32 and device whatever the file holds
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        key = "base_model.model." + _hf_module_name(missing[0].removesuffix(".weight"), arch) + ".weight"
        raise ModelDirError(f"{where}: tensor {key!r} is missing ({len(missing)} LoRA weights missing in all)")
    for p in lora_parameters(model):
        p.requires_grad_(trainable)
    if not trainable:
        model.eval()
    extra_path = os.path.join(adapter_dir, EXTRA_FILE)
    return load_file(extra_path) if os.path.exists(extra_path) else {}
