"""The transformer: one class, configured by a dataclass, for every base a HuatuoGPT model uses.

Families and the flags that tell them apart (see `ModelConfig`, in hf.py next to the per-family
mapping from config.json):
- Llama-2/3/3.1, Mistral, Yi, TinyLlama: RMSNorm, SwiGLU, RoPE (llama3 scaling), grouped-query attention.
- Qwen2 / Qwen2.5: as Llama plus bias on q/k/v, tied embeddings on small models. Qwen3: q/k RMSNorm.
- Baichuan / Baichuan2: q/k/v packed in one `W_pack` matrix; Baichuan2-7B's NormHead
  (unit-norm rows of the output matrix); the 13B models use ALiBi instead of RoPE.
- BLOOM: LayerNorm with bias, GELU MLP, ALiBi, an extra LayerNorm after the embedding,
  q/k/v fused with the heads interleaved.
- An optional scalar value head on the last hidden state (reward and value models).

Module names follow the Hugging Face Llama layout without the `model.` prefix, so the weight maps
in `hf.py` are near-identity and LoRA targets keep their familiar names (`q_proj`, `W_pack`, ...).

Attention goes through `F.scaled_dot_product_attention`. A block takes an optional cache: any object
whose `update(layer, cache_pos, k, v)` stores this step's keys and values and returns the keys and
values to attend to. The one KV cache is the generation engine's (engine.py: `kv_cache`, `RowCache`);
training and scoring run whole sequences without one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import hf
from .hf import ModelConfig
from .lora import load_adapter, merge_and_unload
from .quant import Int8Linear, NF4Linear, quantize


# ----------------------------------------------------------------------------- positions

def rope_inv_freq(c: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with the scaling the config asks for (computed in float32)."""
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
    s = c.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, smooth ramp in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")


def rope_cos_sin(inv_freq, positions, dtype):
    """cos/sin of shape (B, 1, T, head_dim) for integer positions (B, T), computed in float32."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (BLOOM's and Baichuan's formula, identical for every head count)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != n_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 1 + 2 * (n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the gain, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(c: ModelConfig, dim=None):
    dim = dim or c.dim
    return RMSNorm(dim, c.norm_eps) if c.norm == "rms" else nn.LayerNorm(dim, eps=c.norm_eps)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.c, self.layer = c, layer
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        if c.qkv == "split":
            self.q_proj = nn.Linear(c.dim, q_dim, bias=c.qkv_bias)
            self.k_proj = nn.Linear(c.dim, kv_dim, bias=c.qkv_bias)
            self.v_proj = nn.Linear(c.dim, kv_dim, bias=c.qkv_bias)
        elif c.qkv == "packed":
            self.W_pack = nn.Linear(c.dim, q_dim + 2 * kv_dim, bias=c.qkv_bias)
        elif c.qkv == "bloom":
            self.query_key_value = nn.Linear(c.dim, 3 * q_dim, bias=c.qkv_bias)
        else:
            raise ValueError(f"unknown qkv layout {c.qkv!r}")
        self.o_proj = nn.Linear(q_dim, c.dim, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    fused = None  # cpu_kernels.FusedLinear: q, k and v in one product while decoding on CPU

    def qkv(self, x):
        c = self.c
        B, T, _ = x.shape
        if c.qkv == "split":
            parts, fused = (self.q_proj, self.k_proj, self.v_proj), self.fused
            q, k, v = fused(x, parts) if fused is not None and fused.usable(x, parts) else (m(x) for m in parts)
        elif c.qkv == "packed":
            q, k, v = self.W_pack(x).split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                                            c.n_kv_heads * c.head_dim], dim=-1)
        else:  # BLOOM stores q, k, v interleaved head by head
            q, k, v = self.query_key_value(x).view(B, T, c.n_heads, 3, c.head_dim).unbind(3)
        return (q.view(B, T, -1, c.head_dim), k.view(B, T, -1, c.head_dim), v.view(B, T, -1, c.head_dim))

    def forward(self, x, cos_sin, mask, cache, cache_pos):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)  # (B, T, n_head, head_dim)
        if self.c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head, T, head_dim)
        if cos_sin is not None:
            q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if cache is not None:  # the engine's cache may keep a bfloat16 model's keys in float32 (on CPU: faster)
            k, v = cache.update(self.layer, cache_pos, k, v)
            q = q.to(k.dtype)
        gqa = self.c.n_kv_heads != self.c.n_heads
        # no mask: causal, or for a single query (a decode step) every key it is given
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.swiglu = c.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.ffn_dim, c.dim, bias=c.mlp_bias)

    fused = None  # cpu_kernels.FusedLinear: gate and up in one product while decoding on CPU

    def forward(self, x):
        if self.swiglu:
            parts, fused = (self.gate_proj, self.up_proj), self.fused
            gate, up = fused(x, parts) if fused is not None and fused.usable(x, parts) else (m(x) for m in parts)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(c)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = make_norm(c)
        self.mlp = MLP(c)

    def forward(self, x, cos_sin, mask, cache, cache_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        if c.embed_norm:
            self.embed_norm = make_norm(c)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = make_norm(c)
        self.lm_head = None
        if c.lm_head:
            self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
            if c.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        self.value_head = nn.Linear(c.dim, 1) if c.value_head else None
        self.register_buffer("inv_freq", rope_inv_freq(c) if c.pos == "rope" else torch.zeros(0), persistent=False)
        self.register_buffer("slopes", alibi_slopes(c.n_heads) if c.pos == "alibi" else torch.zeros(0), persistent=False)
        self.grad_checkpointing = False

    # -- building blocks used by generation, training and the reward/value code

    def attention_bias(self, T, attention_mask, dtype):
        """The mask handed to every layer: None (plain causal) or (B|1, 1|H, T, T), bool or additive.

        attention_mask (B, T) marks real tokens. A query may see keys at or before it that are real; a
        padding query sees itself so its row never goes all -inf (NaN would leak into real rows
        through the values).
        """
        c = self.config
        if attention_mask is None and c.pos == "rope" and c.sliding_window is None:
            return None  # fast path: SDPA's own causal mask
        device = self.embed_tokens.weight.device
        q_slot = k_slot = torch.arange(T, device=device)
        allowed = k_slot[None, :] <= q_slot[:, None]  # (T, T)
        if c.sliding_window is not None:
            allowed = allowed & (q_slot[:, None] - k_slot[None, :] < c.sliding_window)
        allowed = allowed[None, None]  # (1, 1, T, T)
        if attention_mask is not None:
            own = k_slot[None, :] == q_slot[:, None]
            allowed = allowed & (attention_mask[:, None, None, :].bool() | own[None, None])
        if c.pos != "alibi":
            return allowed
        # ALiBi: slope * (key - query) distance; within a row padding shifts both, so slots suffice
        dist = (k_slot[None, :] - q_slot[:, None]).float()  # (T, T)
        bias = self.slopes[None, :, None, None] * dist[None, None]  # (1, H, T, T)
        return bias.masked_fill(~allowed, float("-inf")).to(dtype)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, cache=None, mask=None):
        """Final-normed hidden states (B, T, dim).

        Whole sequences: positions default to `attention_mask.cumsum(-1) - 1` clamped at 0, so left
        padding never shifts a sequence, and the mask is `attention_bias`'s. The generation engine
        runs the same blocks on rows of its KV cache: each row at its own positions (B, T), `cache`
        (engine_runner.RowCache) and its own per-row `mask` (None: plain causal, or for one token per
        row every key the cache returns).
        """
        c = self.config
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        if c.embed_norm:
            x = self.embed_norm(x)
        cos_sin = None
        if c.pos == "rope":
            if positions is None:
                if attention_mask is not None:
                    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                else:
                    positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
            cos_sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        if cache is None:
            mask = self.attention_bias(T, attention_mask, x.dtype)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()  # decided once a call
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos_sin, mask, cache, positions, use_reentrant=False)
            else:
                x = layer(x, cos_sin, mask, cache, positions)
        return self.norm(x)

    def logits(self, h):
        if self.config.norm_head and self.lm_head.weight.requires_grad:
            # weights are normalised once at load; while training they must stay normalised
            return F.linear(h, F.normalize(self.lm_head.weight, dim=-1))
        return self.lm_head(h)

    def values(self, h):
        """Scalar value-head output per position (B, T), computed in the head's dtype."""
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)

    def forward(self, input_ids, attention_mask=None, positions=None):
        """Logits (B, T, vocab_size)."""
        return self.logits(self.hidden_states(input_ids, attention_mask, positions))

    # -- initialisation, sizes, Hugging Face I/O

    @torch.no_grad()
    def init_weights(self, std=0.02, seed=None):
        """Random init for models trained from scratch (the demo and tests)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        if self.value_head is not None:
            init_value_head(self.value_head, g)

    def num_params(self):
        """Parameters as the model has them, a quantised matrix (int8, NF4: a buffer) counted at its shape."""
        quantised = sum(m.in_features * m.out_features for m in self.modules()
                        if isinstance(m, (Int8Linear, NF4Linear)))
        return quantised + sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def init_buffers(self, device=None):
        """RoPE frequencies and ALiBi slopes: computed from the config, never stored in weight files."""
        c, device = self.config, device or self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(c).to(device) if c.pos == "rope" else torch.zeros(0, device=device)
        self.slopes = alibi_slopes(c.n_heads).to(device) if c.pos == "alibi" else torch.zeros(0, device=device)

    def new_value_head(self, device=None, generator=None):
        """A freshly initialised float32 value head (a reward or value model started from an LM)."""
        self.config.value_head = True
        self.value_head = nn.Linear(self.config.dim, 1, device=device, dtype=torch.float32)
        init_value_head(self.value_head, generator)
        return self.value_head

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, adapter=None, value_head=None, strict=True,
                        merge=False, quant="none"):
        """Load a Hugging Face model directory (config.json + safetensors); see `hf.load`.

        adapter: a LoRA adapter directory (PEFT layout) applied on top, see lora.py; merge=True folds
        it into the weights (plain layers again, as `lora.merge_and_unload`). Errors in the directory
        are `hf.ModelDirError`s naming the file and tensor.
        quant: "nf4" stores the linear layers of the blocks in 4 bits, frozen (quant.py: QLoRA), after
        the merge, since a 4-bit base takes none later. Every training stage loads its base here, so
        this is where a QLoRA base comes from. The weights are first loaded whole in `dtype` on
        `device` (one full copy at the peak), then quantised there layer by layer.
        """
        model = hf.load(path, cls, dtype=dtype, device=device, value_head=value_head, strict=strict)
        if adapter is not None:
            load_adapter(model, adapter)
            if merge:
                merge_and_unload(model)
        quantize(model, quant)
        return model

    def save_pretrained(self, path, **kw):
        """Write config.json + safetensors in the Hugging Face layout of this architecture (`hf.save`)."""
        if any(p.is_mkldnn for p in self.parameters()):
            raise ValueError("save_pretrained: this model's weights are packed for inference (cpu_kernels, a model "
                             "from generate.load_for_inference); save the model it was loaded from instead")
        if getattr(self, "quant", "none") != "none":
            raise ValueError(f"save_pretrained: this model's blocks are {self.quant}-quantised; save its LoRA "
                             f"adapter and merge that on the full-precision base instead")
        hf.save(self, path, **kw)


@torch.no_grad()
def init_value_head(head: nn.Linear, generator=None):
    # N(0, 1/sqrt(d+1)) as in the RLHF reference implementations; bias 0
    d = head.weight.shape[1]
    head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(d + 1))
    head.bias.zero_()
