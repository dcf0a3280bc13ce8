"""Hugging Face layout in and out: config.json <-> ModelConfig, weight names, safetensors.

One small function per family turns an HF config into a `ModelConfig`; weight names are a table
of renames per family (our names are the Llama ones without the `model.` prefix). Loading builds
the model on the meta device and fills it tensor by tensor straight from the safetensors files,
so peak memory stays about one copy of the weights.
"""

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import ModelConfig, Transformer, init_value_head, rope_inv_freq, alibi_slopes

# ----------------------------------------------------------------------------- configs

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "yi")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _rope(hf):
    """rope_theta and rope_scaling from either the classic keys or transformers 5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    mt = hf.get("model_type", "")
    arch = " ".join(hf.get("architectures") or [])
    is_reward = "RewardModel" in arch
    if mt in LLAMA_LIKE:
        theta, scaling = _rope(hf)
        n_heads = hf["num_attention_heads"]
        qwen2 = mt == "qwen2"
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported for {mt} (silu is)")
        window = hf.get("sliding_window") if (mt == "mistral" or hf.get("use_sliding_window")) else None
        return ModelConfig(
            arch="llama" if mt == "yi" else mt, vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling,
            qkv_bias=True if qwen2 else hf.get("attention_bias", False),
            o_bias=False if qwen2 else hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False), qk_norm=mt == "qwen3",
            tie_embeddings=hf.get("tie_word_embeddings", False), sliding_window=window,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            lm_head=not is_reward, value_head=is_reward, extra=_extra(hf))
    if mt == "baichuan":
        # Baichuan-7B and Baichuan2-7B (hidden 4096) use RoPE; the 13B models use ALiBi.
        # Baichuan2 (vocab 125696) normalises the rows of its output matrix (NormHead).
        alibi = hf["hidden_size"] != 4096 and hf.get("position_embedding", "") != "rope"
        return ModelConfig(
            arch="baichuan", vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
            pos="alibi" if alibi else "rope", rope_theta=float(hf.get("rope_theta", 10000.0)),
            qkv="packed", norm_head=hf["vocab_size"] == 125696,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            max_seq_len=hf.get("max_position_embeddings", hf.get("model_max_length", 4096)), extra=_extra(hf))
    if mt == "bloom":
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ValueError(f"{where}: BLOOM with apply_residual_connection_post_layernorm=true is not supported")
        dim = hf.get("hidden_size", hf.get("n_embed"))
        return ModelConfig(
            arch="bloom", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
            n_heads=hf.get("n_head", hf.get("num_attention_heads")), ffn_dim=4 * dim, norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", pos="alibi", qkv="bloom",
            qkv_bias=True, o_bias=True, mlp_bias=True, embed_norm=True, tie_embeddings=True,
            max_seq_len=hf.get("seq_length", 2048), extra=_extra(hf))
    raise ValueError(f"{where}: model_type {mt!r} is not supported "
                     f"(supported: {', '.join(LLAMA_LIKE)}, baichuan, bloom)")


# keys of an HF config we carry through unchanged (token ids and the like)
_CARRY = ("bos_token_id", "eos_token_id", "pad_token_id", "auto_map", "model_max_length", "user_token_id",
          "assistant_token_id", "initializer_range")


def _extra(hf):
    return {k: hf[k] for k in _CARRY if k in hf}


def hf_config(c: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json that `transformers` (or the family's own code for Baichuan) reads back."""
    dtype_name = str(dtype).removeprefix("torch.")
    if c.arch == "bloom":
        out = {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": c.vocab_size,
               "hidden_size": c.dim, "n_layer": c.n_layers, "n_head": c.n_heads,
               "layer_norm_epsilon": c.norm_eps, "apply_residual_connection_post_layernorm": False,
               "tie_word_embeddings": True, "seq_length": c.max_seq_len}
    elif c.arch == "baichuan":
        out = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": c.vocab_size,
               "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
               "num_attention_heads": c.n_heads, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
               "model_max_length": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings}
        if c.pos == "rope":
            out["max_position_embeddings"] = c.max_seq_len
        if (c.pos == "alibi") != (c.dim != 4096):
            out["position_embedding"] = c.pos  # only needed where the size rule would guess wrong
    else:
        names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
        out = {"architectures": ["LlamaRewardModel" if c.value_head and not c.lm_head else names[c.arch]],
               "model_type": c.arch, "vocab_size": c.vocab_size, "hidden_size": c.dim,
               "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
               "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
               "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
               "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings}
        if c.arch in ("llama", "qwen3"):
            out["attention_bias"] = c.qkv_bias
        if c.arch == "llama":
            out["mlp_bias"] = c.mlp_bias
        if c.arch == "mistral" or c.sliding_window:
            out["sliding_window"] = c.sliding_window
            if c.arch == "qwen2":
                out["use_sliding_window"] = True
    out.update(c.extra)
    out["torch_dtype"] = dtype_name
    return out


# ----------------------------------------------------------------------------- weight names

# (HF prefix or infix, ours). Entries starting with "." rename inside a key; others a leading prefix.
NAMES = {
    "llama": [("model.", "")],
    "bloom": [("transformer.word_embeddings_layernorm.", "embed_norm."),
              ("transformer.word_embeddings.", "embed_tokens."), ("transformer.ln_f.", "norm."),
              ("transformer.h.", "layers."), (".self_attention.query_key_value.", ".self_attn.query_key_value."),
              (".self_attention.dense.", ".self_attn.o_proj."), (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
              (".mlp.dense_4h_to_h.", ".mlp.down_proj.")],
}


def _table(arch):
    return NAMES["bloom"] if arch == "bloom" else NAMES["llama"]


def _rename(key, pairs):
    for a, b in pairs:
        if a.startswith("."):
            key = key.replace(a, b)
        elif key.startswith(a):
            key = b + key[len(a):]
    return key


def hf_to_ours(key: str, arch: str) -> str:
    if arch == "bloom" and not key.startswith(("transformer.", "lm_head.", "value_head.")):
        key = "transformer." + key  # some BLOOM checkpoints store the trunk without its prefix
    return _rename(key, _table(arch))


def ours_to_hf(key: str, arch: str) -> str:
    pairs = [(b, a) for a, b in _table(arch)]
    if arch != "bloom":
        # everything but the heads lives under "model." in the Llama layout
        return key if key.startswith(("lm_head.", "value_head.")) else "model." + key
    return _rename(key, pairs)


# ----------------------------------------------------------------------------- load

def _weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    bins = [f for f in os.listdir(path) if f.endswith(".bin")]
    hint = (" It has PyTorch .bin files: convert them once to safetensors "
            "(for example with transformers' save_pretrained(..., safe_serialization=True)).") if bins else ""
    raise FileNotFoundError(f"{path}: no safetensors weights (model.safetensors or an index).{hint}")


def read_config(path) -> tuple[dict, ModelConfig]:
    where = os.path.join(path, "config.json")
    if not os.path.exists(where):
        raise FileNotFoundError(f"{where} not found: is {path} a Hugging Face model directory?")
    with open(where) as f:
        hf = json.load(f)
    return hf, config_from_hf(hf, where)


def load(path, dtype=None, device=None, adapter=None, value_head=None, strict=True):
    """Build the model for `path` and fill it from its safetensors files.

    dtype: None keeps float32 (safe on every device); pass torch.bfloat16 for a 7B model on a GPU.
    value_head: True adds a freshly initialised value head when the files have none (reward models
    built from an SFT model); missing, unexpected or mis-shaped tensors otherwise raise.
    adapter: a LoRA adapter directory (PEFT layout) applied on top, see lora.py.
    """
    hf, c = read_config(path)
    if isinstance(dtype, str):
        dtype = TORCH_DTYPES[dtype]
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    files = _weight_files(path)
    with safe_open(files[0], "pt") as f:
        keys0 = set(f.keys())
    if value_head is not None:
        c.value_head = value_head
    elif any(k.startswith("value_head.") for k in keys0):
        c.value_head = True
    with torch.device("meta"):
        model = Transformer(c)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    tied = c.tie_embeddings and c.lm_head
    for file in files:
        with safe_open(file, "pt", device="cpu") as f:
            for key in f.keys():
                name = hf_to_ours(key, c.arch)
                if tied and name == "lm_head.weight":
                    continue  # tied: the embedding is the output matrix
                if name not in params:
                    if strict:
                        raise KeyError(f"{file}: unexpected tensor {key!r} (no such weight in a {c.arch} model "
                                       f"of this config)")
                    continue
                t = f.get_tensor(key)
                want = params[name].shape
                if t.shape != want:
                    raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, the config in "
                                     f"{path}/config.json implies {tuple(want)}")
                keep = torch.float32 if name.startswith("value_head.") else dtype  # value heads stay fp32
                _assign(model, name, t.to(device=device, dtype=keep))
                loaded.add(name)
    for name, p in model.named_parameters():
        if name in loaded or (tied and name == "lm_head.weight"):
            continue
        if name.startswith("value_head."):
            continue
        raise KeyError(f"{path}: tensor {ours_to_hf(name, c.arch)!r} is missing from the weight files "
                       f"({', '.join(os.path.basename(f) for f in files)})")
    if c.value_head and not loaded.issuperset({"value_head.weight", "value_head.bias"}):
        model.value_head = torch.nn.Linear(c.dim, 1, device=device, dtype=torch.float32)
        init_value_head(model.value_head)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    if c.norm_head and c.lm_head:
        with torch.no_grad():  # idempotent, so a saved (already normalised) head loads the same
            model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight.float(), dim=-1))
    # buffers computed from the config, not stored in the files
    model.inv_freq = rope_inv_freq(c).to(device) if c.pos == "rope" else torch.zeros(0, device=device)
    model.slopes = alibi_slopes(c.n_heads).to(device) if c.pos == "alibi" else torch.zeros(0, device=device)
    model.source_dir = os.path.abspath(path)
    model.eval()
    if adapter is not None:
        from .lora import load_adapter
        load_adapter(model, adapter)
    return model


def _assign(model, name, tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


# ----------------------------------------------------------------------------- save

# files a model directory carries besides the weights, copied from where the model came from
_SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")


def save(model: Transformer, path, max_shard_bytes=5 * 1024**3, copy_from=None):
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`).

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a
    half-written file under the real name. Tokenizer, generation config and (for Baichuan) the
    family's Python files are copied from `copy_from` or the directory the model was loaded from.
    """
    os.makedirs(path, exist_ok=True)
    c = model.config
    tensors, seen = {}, set()
    for name, p in model.state_dict(keep_vars=True).items():
        if name in ("inv_freq", "slopes") or name.endswith(("lora_A.weight", "lora_B.weight")):
            continue
        if id(p) in seen:
            continue  # tied weights are stored once, under the embedding's name
        seen.add(id(p))
        tensors[ours_to_hf(name, c.arch)] = p.detach().to("cpu").contiguous()
    dtype = model.embed_tokens.weight.dtype
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + n
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic(os.path.join(path, "model.safetensors"), lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic(os.path.join(path, fname), lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_json(os.path.join(path, "model.safetensors.index.json"), index)
    _atomic_json(os.path.join(path, "config.json"), hf_config(c, dtype))
    src = copy_from or getattr(model, "source_dir", None)
    if src and os.path.abspath(src) != os.path.abspath(path):
        for f in os.listdir(src):
            if f in _SIDE_FILES or (c.arch == "baichuan" and f.endswith(".py")):
                shutil.copyfile(os.path.join(src, f), os.path.join(path, f))


def _atomic(final, write):
    tmp = final + ".tmp"
    write(tmp)
    os.replace(tmp, final)


def _atomic_json(final, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    _atomic(final, write)
