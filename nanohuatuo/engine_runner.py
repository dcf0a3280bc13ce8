"""The engine's runner: the model's blocks over some cache rows, each row at its own positions.

`kv_cache` allocates one key and one value tensor per layer, (slots, n_kv_heads, max_len,
head_dim); `RowCache` is that cache as the attention layers see it in one forward (each token's
keys and values written at its row and position); `key_mask` lets a query see the keys of its own
row at or before its position; `forward` runs the blocks; `decode_logits` is one token per running
row, and `compiled_decode` its CUDA-graph version (engine.py's scheduler decides what runs).
"""

import torch

from .cpu_kernels import head_logits
from .model import Transformer


class RowCache:
    """The engine's KV cache as the attention layers see it in one forward: rows [first, first + B),
    each token's keys and values written at its position (B, T), keys [0, n_keys) returned."""

    def __init__(self, k, v, first, positions, n_keys):
        self.k, self.v, self.first, self.n_keys = k, v, first, n_keys
        B, T = positions.shape
        self.rows = torch.arange(first, first + B, device=positions.device)[:, None].expand(B, T)
        self.pos = positions

    def update(self, layer, cache_pos, k, v):  # k, v (B, n_kv_heads, T, head_dim)
        K, V = self.k[layer], self.v[layer]  # (slots, n_kv_heads, max_len, head_dim)
        K[self.rows, :, self.pos] = k.transpose(1, 2)  # (B, T, n_kv_heads, head_dim) at (row, position)
        V[self.rows, :, self.pos] = v.transpose(1, 2)
        rows = slice(self.first, self.first + self.rows.shape[0])
        return K[rows, :, :self.n_keys], V[rows, :, :self.n_keys]


def key_mask(model: Transformer, positions, n_keys, dtype):
    """(B, 1|H, T, n_keys): a query at position p sees the keys of its own row at positions <= p
    (within the sliding window); an ALiBi bias instead for ALiBi models."""
    c = model.config
    k = torch.arange(n_keys, device=positions.device)
    q = positions[:, None, :, None]  # (B, 1, T, 1)
    allowed = k <= q
    if c.sliding_window is not None:
        allowed = allowed & (q - k < c.sliding_window)
    if c.pos != "alibi":
        return allowed
    bias = model.slopes[None, :, None, None] * (k - q).float()  # (B, H, T, n_keys)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def forward(model: Transformer, ids, positions, cache: RowCache, mask):
    """Final-normed hidden states (B, T, dim) of ids (B, T) at positions (B, T), through `cache`, with a
    per-row mask (None: plain causal, for a prefill that starts at position 0): the model's own blocks."""
    return model.hidden_states(ids, positions=positions, cache=cache, mask=mask)


def decode_logits(model: Transformer, tokens, positions, k, v, n_keys):
    """float32 logits (B, vocab) of one token per cache row [0, B): tokens, positions (B,)."""
    pos = positions[:, None]  # (B, 1)
    cache = RowCache(k, v, 0, pos, n_keys)
    h = forward(model, tokens[:, None], pos, cache, key_mask(model, pos, n_keys, k[0].dtype))
    return head_logits(model, h[:, -1])


_COMPILED = {}


def compiled_decode():
    # one compiled function: torch.compile keeps a graph per batch size (the buckets)
    if "decode" not in _COMPILED:
        _COMPILED["decode"] = torch.compile(decode_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _COMPILED["decode"]


def kv_cache(model: Transformer, slots, max_len, dtype, device, static):
    """Key and value tensors per layer, (slots, n_kv_heads, max_len, head_dim), zeroed (a masked
    key's weight is 0, and 0 * NaN from uninitialised memory would still be NaN). `static`
    (compiled decoding): CUDA graphs replay on fixed addresses, so one cache is kept on the model
    and reused by the next Engine of the same shape instead of allocating (and recording) anew."""
    c = model.config
    shape = (slots, c.n_kv_heads, max_len, c.head_dim)
    kept = getattr(model, "engine_cache", None) if static else None
    if kept is not None and kept[0][0].shape == shape and kept[0][0].dtype == dtype \
            and kept[0][0].device == torch.device(device):
        return kept
    model.engine_cache = None  # free the old one before allocating
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
    if static:
        for t in k + v:
            torch._dynamo.mark_static_address(t)
        model.engine_cache = (k, v)
    return k, v
