"""The model's config and the Hugging Face layout in and out: config.json, weight names, safetensors.

`ModelConfig` is the one dataclass that configures `model.Transformer`; it lives here, next to the
small function per family that turns an HF config.json into it (and `hf_config` back). Weight
names are a table of renames per family (our names are the Llama ones without the `model.`
prefix). `load` builds the model on the meta device and fills it tensor by tensor straight from
the safetensors files, so peak memory stays about one copy of the weights.

Everything that can be wrong with a model directory is found before a tensor is read and raised
as `ModelDirError` (a ValueError) naming the file and, where there is one, the key or tensor:
no or invalid config.json, a missing key, an unsupported model_type, no weights, a truncated
safetensors file, a missing, unexpected or mis-shaped tensor, no tokenizer files.

This module imports nothing else from the package: model.py, lora.py and the rest build on it.
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

# torch is imported by the functions that build, load or save weights, not here: templates and the
# tokenizer read config files through this module, and the LLM-only commands must start without torch
if TYPE_CHECKING:
    import torch


class ModelDirError(ValueError):
    """A model directory that cannot be loaded as asked; the message names the file (and tensor)."""


class MissingFileError(ModelDirError, FileNotFoundError):
    """A file the model directory needs is not there."""


# ----------------------------------------------------------------------------- the config

@dataclass
class ModelConfig:
    arch: str = "llama"  # Hugging Face model_type written back on save: llama mistral qwen2 qwen3 baichuan bloom
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 11008
    norm: str = "rms"  # rms | layer
    norm_eps: float = 1e-6
    mlp: str = "swiglu"  # swiglu | gelu (BLOOM)
    pos: str = "rope"  # rope | alibi
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in HF configs
    qkv: str = "split"  # split (q_proj/k_proj/v_proj) | packed (Baichuan W_pack) | bloom (interleaved per head)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    embed_norm: bool = False  # BLOOM: LayerNorm right after the embedding
    norm_head: bool = False  # Baichuan2: output matrix rows normalised to unit length
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral
    max_seq_len: int = 4096
    lm_head: bool = True  # False for reward models that only carry a value head
    value_head: bool = False
    extra: dict = field(default_factory=dict)  # HF config keys we carry through save unchanged

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def to_dict(self):
        return asdict(self)


# ----------------------------------------------------------------------------- config.json

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "yi")
SUPPORTED = LLAMA_LIKE + ("baichuan", "bloom")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# the keys each rope_scaling type needs (model.rope_inv_freq reads them)
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope(hf, where):
    """rope_theta and rope_scaling from either the classic keys or transformers 5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ROPE_SCALING_KEYS:
            raise ModelDirError(f"{where}: rope_scaling type {kind!r} is not supported "
                                f"(default, {', '.join(ROPE_SCALING_KEYS)} are)")
        lacking = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
        if lacking:
            raise ModelDirError(f"{where}: rope_scaling of type {kind!r} lacks {', '.join(lacking)}")
    return float(theta), scaling


def _check_ints(hf, where, keys):
    """Sizes must be positive integers: a string or a float here would fail far from the file."""
    for k in keys:
        v = hf.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ModelDirError(f"{where}: {k} is {v!r}; it must be a positive integer")


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF config.json (as a dict); `where` names the file in errors."""
    if not isinstance(hf, dict):
        raise ModelDirError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt is None:
        raise ModelDirError(f"{where}: no model_type key (supported: {', '.join(SUPPORTED)})")
    if mt not in SUPPORTED:
        raise ModelDirError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
    _check_ints(hf, where, ("vocab_size", "hidden_size", "n_embed", "intermediate_size", "num_hidden_layers",
                            "n_layer", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim"))
    try:
        return _config(hf, mt, where)
    except KeyError as e:  # hf[...] of a key every config of the family has
        raise ModelDirError(f"{where}: missing key {e.args[0]!r}, which a {mt} config needs") from None
    except ValueError as e:  # ModelConfig's own checks (heads vs key/value heads)
        if isinstance(e, ModelDirError):
            raise
        raise ModelDirError(f"{where}: {e}") from None


def _first(hf, *keys):
    """The value of the first of keys present (BLOOM configs use either name); KeyError names the first."""
    for k in keys:
        if k in hf:
            return hf[k]
    raise KeyError(keys[0])


def _window(hf, mt, where):
    """The sliding window, which nanohuatuo puts on every layer or on none. Mistral's is on every layer; Qwen2's
    and Qwen3's, with use_sliding_window, on the layers from max_window_layers (28 when absent) on, or on those
    layer_types names "sliding_attention": a window on some layers only is refused, not run wrong."""
    size = hf.get("sliding_window")
    if mt == "mistral" or not size:
        return size or None
    if mt not in ("qwen2", "qwen3") or not hf.get("use_sliding_window"):
        return None
    n = hf["num_hidden_layers"]
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    windowed = sum(t == "sliding_attention" for t in types)
    if windowed in (0, n):
        return size if windowed else None
    raise ModelDirError(f"{where}: a sliding window on {windowed} of {n} layers (use_sliding_window with "
                        f"max_window_layers {first} or layer_types) is not supported; "
                        "nanohuatuo puts the window on every layer or on none")


def _config(hf, mt, where):
    arch = " ".join(hf.get("architectures") or [])
    is_reward = "RewardModel" in arch
    if mt in LLAMA_LIKE:
        theta, scaling = _rope(hf, where)
        n_heads = hf["num_attention_heads"]
        qwen2 = mt == "qwen2"
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelDirError(f"{where}: hidden_act {act!r} is not supported for {mt} (silu is)")
        window = _window(hf, mt, where)
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
    # bloom
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ModelDirError(f"{where}: BLOOM with apply_residual_connection_post_layernorm=true is not supported")
    dim = _first(hf, "hidden_size", "n_embed")
    return ModelConfig(
        arch="bloom", vocab_size=hf["vocab_size"], dim=dim, n_layers=_first(hf, "n_layer", "num_hidden_layers"),
        n_heads=_first(hf, "n_head", "num_attention_heads"), ffn_dim=4 * dim, norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", pos="alibi", qkv="bloom",
        qkv_bias=True, o_bias=True, mlp_bias=True, embed_norm=True, tie_embeddings=True,
        max_seq_len=hf.get("seq_length", 2048), extra=_extra(hf))


# keys of an HF config we carry through unchanged (token ids and the like)
_CARRY = ("bos_token_id", "eos_token_id", "pad_token_id", "auto_map", "model_max_length", "user_token_id",
          "assistant_token_id", "initializer_range")


def _extra(hf):
    return {k: hf[k] for k in _CARRY if k in hf}


def hf_config(c: ModelConfig, dtype: "torch.dtype") -> dict:
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
            if c.arch in ("qwen2", "qwen3"):  # on every layer: from layer 0 on
                out.update(use_sliding_window=True, max_window_layers=0)
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


# ----------------------------------------------------------------------------- reading a model directory

# a tokenizer needs one of these (tokenizer.py reads them); checked before any weight is read
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")


def read_json(where, optional: bool = False):
    """A JSON file's content; a file that is not JSON (or not UTF-8) is a ModelDirError naming it.
    optional: an absent file (a side file a model directory may lack) reads as {}."""
    if optional and not os.path.isfile(where):
        return {}
    try:
        with open(where, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ModelDirError(f"{where}: not UTF-8 text") from None


def read_config(path) -> tuple[dict, ModelConfig]:
    """(the config.json dict, its ModelConfig) of a model directory."""
    path = str(path)
    where = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise MissingFileError(f"{path}: no such model directory (expected config.json and safetensors weights)")
    if not os.path.exists(where):
        raise MissingFileError(f"{where} not found: is {path} a Hugging Face model directory?")
    hf = read_json(where)
    return hf, config_from_hf(hf, where)


def weight_files(path) -> list[str]:
    """The safetensors files of a model directory: those its index lists, or model.safetensors, or all."""
    path = str(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirError(f"{index}: no weight_map (expected {{\"weight_map\": {{tensor: file}}}})")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.exists(f):
                raise MissingFileError(f"{index} lists {os.path.basename(f)}, which is not in {path}")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    bins = [f for f in os.listdir(path) if f.endswith(".bin")]
    hint = (" It has PyTorch .bin files: convert them once to safetensors "
            "(for example with transformers' save_pretrained(..., safe_serialization=True)).") if bins else ""
    raise MissingFileError(f"{path}: no safetensors weights (model.safetensors or an index).{hint}")


def safetensors_header(file) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, read without its data.

    The header says where every tensor ends, so a file cut short by an interrupted copy or download
    is caught here (a ModelDirError saying it is truncated) rather than as a crash mid-load.
    """
    size = os.path.getsize(file)
    again = "copy or download it again"
    with open(file, "rb") as f:
        head = f.read(8)  # little-endian u64: the length of the JSON header that follows
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ModelDirError(f"{file}: truncated or not a safetensors file ({size:,} bytes, shorter than its "
                                f"header); {again}")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
            for t in header.values():
                t["shape"] = tuple(t["shape"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ModelDirError(f"{file}: corrupt safetensors file (its header cannot be read); {again}") from None
    if 8 + n + end > size:
        raise ModelDirError(f"{file}: truncated safetensors file: its header promises {8 + n + end:,} bytes, the "
                            f"file has {size:,}; {again}")
    return header


def count_params(path) -> int:
    """Parameters of a model directory, from its safetensors headers (nothing loaded): enough to
    choose sizes for a 7B model on a machine whose memory could not hold it in float32."""
    return sum(math.prod(t["shape"]) for f in weight_files(path) for t in safetensors_header(f).values())


def require_tokenizer(path) -> None:
    """Raise a MissingFileError unless the directory holds a tokenizer (tokenizer.json or tokenizer.model)."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_MODEL_FILES):
        raise MissingFileError(f"{path}: no tokenizer ({' or '.join(TOKENIZER_MODEL_FILES)}); copy the base model's "
                               f"tokenizer files into it")


def check_model_dir(path, tokenizer: bool = False, build=None, value_head=None, strict=True) -> ModelConfig:
    """Check a model directory without reading any tensor data and return its config.

    config.json, the weight files and their headers (truncation), with tokenizer=True the
    tokenizer files, and with `build` (model.Transformer) every tensor's name and shape against a
    model built on the meta device, as `load` would. Cheap enough to call before touching an
    output directory or loading anything else.
    """
    if tokenizer:
        read_config(path)  # a directory that is not a model at all is named as such first
        require_tokenizer(path)
    if build is None:
        _, c = read_config(path)
        for f in weight_files(path):
            safetensors_header(f)
        return c
    return _plan(str(path), build, value_head, strict)[0].config


def _plan(path, build, value_head, strict):
    """(the model on the meta device, {file: [(our name, HF key)]}, what the value head needs: "fresh",
    "zero bias" or None): every check of `load`, from config.json and the file headers alone."""
    hf, c = read_config(path)
    files = weight_files(path)
    stored = {}  # our name -> (file, HF key, shape)
    for file in files:
        for key, info in safetensors_header(file).items():
            stored[hf_to_ours(key, c.arch)] = (file, key, info["shape"])
    in_files = {n for n in stored if n.startswith("value_head.")}
    released = c.value_head  # the config names a reward model
    if value_head is not None:
        c.value_head = value_head
    elif in_files:
        c.value_head = True
    import torch
    with torch.device("meta"):
        model = build(c)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = c.tie_embeddings and c.lm_head
    todo = {}
    for name, (file, key, shape) in stored.items():
        if tied and name == "lm_head.weight":
            continue  # tied: the embedding is the output matrix
        if name not in params:
            if strict:
                raise ModelDirError(f"{file}: unexpected tensor {key!r} (no such weight in a {c.arch} model of "
                                    f"this config)")
            continue
        want = tuple(params[name].shape)
        if shape != want:
            raise ModelDirError(f"{file}: tensor {key!r} has shape {shape}, the config in {path}/config.json "
                                f"implies {want}")
        todo.setdefault(file, []).append((name, key))
    listed = ", ".join(os.path.basename(f) for f in files)
    missing = [n for n in params if n not in stored and not n.startswith("value_head.")
               and not (tied and n == "lm_head.weight")]
    if missing:
        more = f"; {len(missing)} tensors are missing in all" if len(missing) > 1 else ""
        raise ModelDirError(f"{path}: tensor {ours_to_hf(missing[0], c.arch)!r} is missing from the weight files "
                            f"({listed}){more}")
    fresh_head = c.value_head and value_head is True and not in_files and not released
    if c.value_head and "value_head.weight" not in stored and not fresh_head:
        why = "the files hold value_head.bias without its weight" if in_files else \
            f"config.json names a reward model ({' '.join(hf.get('architectures') or [])})" if released else \
            "a value head was asked for"
        raise ModelDirError(f"{path}: tensor 'value_head.weight' is missing from the weight files ({listed}); {why}")
    head = "fresh" if fresh_head else "zero bias" if c.value_head and "value_head.bias" not in stored else None
    return model, todo, head


def load(path, build, dtype=None, device=None, value_head=None, strict=True):
    """`build(config)` (model.Transformer) created on the meta device and filled from the safetensors files.

    dtype: None keeps float32 (safe on every device); pass torch.bfloat16 for a 7B model on a GPU.
    value_head: None takes the value head the directory has (a released reward model's config or a
    `value_head.*` tensor): its weight must be there, a missing bias is 0. True adds a freshly
    initialised head when the files have none (reward models built from an SFT model).
    strict: an unexpected tensor is an error (else skipped). Missing and mis-shaped tensors always are,
    and every check runs on the file headers before a byte of tensor data is read (`check_model_dir`).
    """
    import torch
    path = str(path)
    model, todo, head = _plan(path, build, value_head, strict)
    c = model.config
    dtype = getattr(torch, dtype) if dtype in DTYPE_NAMES else (dtype or torch.float32)
    device = torch.device(device or "cpu")
    for file, names in todo.items():
        try:
            with safe_open(file, "pt", device="cpu") as f:
                for name, key in names:
                    keep = torch.float32 if name.startswith("value_head.") else dtype  # value heads stay fp32
                    _assign(model, name, f.get_tensor(key).to(device=device, dtype=keep))
        except SafetensorError as e:
            raise ModelDirError(f"{file}: corrupt safetensors file ({e}); copy or download it again") from None
    if head == "fresh":
        model.new_value_head(device)
    elif head == "zero bias":
        # a released head saved without a bias (nn.Linear(bias=False)) means bias 0, not a random one
        _assign(model, "value_head.bias", torch.zeros(1, device=device, dtype=torch.float32))
    if c.tie_embeddings and c.lm_head:
        model.lm_head.weight = model.embed_tokens.weight
    if c.norm_head and c.lm_head:
        with torch.no_grad():  # idempotent, so a saved (already normalised) head loads the same
            model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight.float(), dim=-1))
    model.init_buffers(device)  # computed from the config, not stored in the files
    model.source_dir = os.path.abspath(path)
    return model.eval()


def _assign(model, name, tensor):
    import torch
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


# ----------------------------------------------------------------------------- save

# files a model directory carries besides the weights, copied from where the model came from
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def save(model, path, max_shard_bytes=5 * 1024**3, copy_from=None):
    """Write a model.Transformer as config.json + safetensors (sharded with an index above `max_shard_bytes`).

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a
    half-written file under the real name. Tokenizer, generation config and (for Baichuan) the
    family's Python files are copied from `copy_from` or the directory the model was loaded from.
    """
    from safetensors.torch import save_file  # imports torch
    os.makedirs(path, exist_ok=True)
    c = model.config
    tensors, seen = {}, set()
    for name, p in model.state_dict(keep_vars=True).items():
        if name in ("inv_freq", "slopes") or name.endswith(("lora_A.weight", "lora_B.weight")):
            continue
        if id(p) in seen:
            continue  # tied weights are stored once, under the embedding's name
        seen.add(id(p))
        t = p.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a fused matrix (cpu_kernels.FusedLinear): safetensors wants its own
        tensors[ours_to_hf(name, c.arch)] = t
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
        atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(os.path.join(path, fname), lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_json(os.path.join(path, "model.safetensors.index.json"), index)
    atomic_json(os.path.join(path, "config.json"), hf_config(c, dtype))
    src = copy_from or getattr(model, "source_dir", None)
    if src and os.path.abspath(src) != os.path.abspath(path):
        for f in os.listdir(src):
            if f in SIDE_FILES or (c.arch == "baichuan" and f.endswith(".py")):
                shutil.copyfile(os.path.join(src, f), os.path.join(path, f))


def atomic_write(final, write):
    """write(tmp) to a temporary name next to `final`, then rename it: `final` is whole or absent."""
    tmp = str(final) + ".tmp"
    write(tmp)
    os.replace(tmp, final)


def atomic_json(final, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    atomic_write(final, write)
