"""The engine's runner: the model's blocks over some cache rows, each row at its own positions.

`kv_cache` allocates one key and one value tensor per layer, (slots, n_kv_heads, max_len,
head_dim); `RowCache` is that cache as the attention layers see it in one forward (each token's
keys and values written at its row and position); `key_mask` lets a query see the keys of its own
row at or before its position (`needs_mask`: whether that takes a mask when every row is at one
position); `forward` runs the blocks; `decode_logits` is one token per running row, and
`compiled_decode` its compiled version (CUDA graphs on CUDA; `GraphedDecode` records its own)
(engine.py's scheduler decides what runs).
"""

import torch

from .cpu_kernels import head_logits
from .model import Transformer


class RowCache:
    """The engine's KV cache as the attention layers see it in one forward: rows [first, first + B),
    each token's keys and values written at its position (B, T), keys [0, n_keys) returned.

    start: every row's tokens sit at positions [start, start + T) (a prefill from 0, or a decode step
    whose rows are all at one position, which the scheduler knows without reading `positions`):
    then they are written as one slice instead of scattered by index."""

    def __init__(self, k, v, first, positions, n_keys, start=None):
        self.k, self.v, self.first, self.n_keys, self.start = k, v, first, n_keys, start
        B, T = positions.shape
        self.span = slice(first, first + B)
        if start is None:
            self.rows = torch.arange(first, first + B, device=positions.device)[:, None].expand(B, T)
            self.pos = positions

    def update(self, layer, cache_pos, k, v):  # k, v (B, n_kv_heads, T, head_dim)
        K, V = self.k[layer], self.v[layer]  # (slots, n_kv_heads, max_len, head_dim)
        k, v = k.to(K.dtype), v.to(V.dtype)  # a float32 cache of a bfloat16 model on CPU (kv_cache)
        if self.start is not None:
            at = slice(self.start, self.start + k.shape[2])
            K[self.span, :, at] = k
            V[self.span, :, at] = v
        else:
            K[self.rows, :, self.pos] = k.transpose(1, 2)  # (B, T, n_kv_heads, head_dim) at (row, position)
            V[self.rows, :, self.pos] = v.transpose(1, 2)
        return K[self.span, :, :self.n_keys], V[self.span, :, :self.n_keys]


def key_mask(model: Transformer, positions, n_keys, dtype):
    """(B, 1|H, T, n_keys) additive mask in `dtype`: a query at position p sees the keys of its own
    row at positions <= p (within the sliding window), plus the ALiBi bias for ALiBi models.

    Additive (0 or -inf) rather than boolean because SDPA turns a boolean mask into exactly this
    one in every layer; built here it is built once a step."""
    c = model.config
    k = torch.arange(n_keys, device=positions.device)
    q = positions[:, None, :, None]  # (B, 1, T, 1)
    allowed = k <= q
    if c.sliding_window is not None:
        allowed = allowed & (q - k < c.sliding_window)
    if c.pos != "alibi":
        return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill_(~allowed, float("-inf"))
    bias = model.slopes[None, :, None, None] * (k - q).float()  # (B, H, T, n_keys)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def needs_mask(model: Transformer, n_keys):
    """Whether queries at position n_keys - 1 of their rows need a mask to attend to keys [0, n_keys):
    only for ALiBi's bias or a sliding window shorter than that (RoPE: every key is theirs to see)."""
    c = model.config
    return c.pos != "rope" or (c.sliding_window is not None and n_keys > c.sliding_window)


def forward(model: Transformer, ids, positions, cache: RowCache, mask):
    """Final-normed hidden states (B, T, dim) of ids (B, T) at positions (B, T), through `cache`, with a
    per-row mask (None: plain causal, for a prefill that starts at position 0): the model's own blocks."""
    return model.hidden_states(ids, positions=positions, cache=cache, mask=mask)


def decode_logits(model: Transformer, tokens, positions, k, v, n_keys, same_position=False):
    """float32 logits (B, vocab) of one token per cache row [0, B): tokens, positions (B,).

    same_position: every row is at position n_keys - 1 (the scheduler knows it without a sync), so
    the keys are written as one slice and, where `needs_mask` allows, no mask is built or applied
    (a batch of 1 always; SDPA with a single query and no mask attends to every key it is given)."""
    pos = positions[:, None]  # (B, 1)
    cache = RowCache(k, v, 0, pos, n_keys, start=n_keys - 1 if same_position else None)
    plain = same_position and not needs_mask(model, n_keys)
    h = forward(model, tokens[:, None], pos, cache, None if plain else key_mask(model, pos, n_keys, k[0].dtype))
    return head_logits(model, h[:, -1])


_COMPILED = {}


def compiled_decode(device_type="cuda", trees=True):
    """`decode_logits` compiled, shapes symbolic (the engine's batch buckets, the growing number of
    keys, engines of different max_len: one graph each for batch 1, a size of 1 being always
    specialised, and for larger batches, instead of one compilation per shape). On CUDA: CUDA
    graphs (mode reduce-overhead), recorded again for each new shape, which is cheap beside a
    compilation; the engine pads its batch up to a few bucket sizes and keeps all max_len keys, so
    only a few shapes occur. On CPU: the element-wise work between the matrix products fused into
    generated C++ loops, each product one opaque op that runs its measured kernel
    (cpu_kernels.opaque_products). trees=False: on CUDA without CUDA graphs, for `GraphedDecode` to
    record its own."""
    key = device_type if trees or device_type != "cuda" else "cuda-kernels"
    if key not in _COMPILED:
        # those few graphs per model, and each model its own: the default limit of 8 graphs per
        # function would send a process's second or third model back to eager decoding
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # bfloat16 rounded inside fused kernels where eager ops round (else greedy tokens drift from eager's)
        options = {"emulate_precision_casts": True}
        if device_type == "cuda":  # CUDA graphs, as mode="reduce-overhead" (mode and options exclude each other)
            options["triton.cudagraphs"] = trees
        else:  # fewer guards a step (CUDA keeps them: no op keys tell models apart there; they cost microseconds)
            options["guard_filter_fn"] = _no_parameter_guards
        _COMPILED[key] = torch.compile(decode_logits, fullgraph=True, dynamic=True, options=options)
    return _COMPILED[key]


def _record(fn):
    """(replay, out): fn's kernels recorded in a CUDA graph and the output tensor it fills at each
    replay. fn runs once first on a side stream (it compiles, tunes its kernels and allocates there,
    none of which a capture allows), as torch.cuda.graph's documentation prescribes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class GraphedDecode:
    """The compiled decode step (`compiled_decode(trees=False)`) replayed from CUDA graphs recorded
    here, one per batch size, as nano-vllm and vLLM decode: a replay is two small copies into the
    graph's input tensors and one launch, where torch.compile's own CUDA graphs (graph trees) run
    Python checks before each replay: on an H200 a 0.5B model's compiled batch-1 step took 3.1 ms
    with them, of which the GPU ran 1.27 ms (docs/benchmarks.md). Not the default until measured
    on a GPU: an engine takes it with NANOHUATUO_CUDA_GRAPHS=manual.

    Each batch size's first call records its graph on the engine's static cache (`kv_cache`), with
    that call's own tokens and positions: the warm-up before the capture decodes them for real
    (writing their keys, which the replay that follows writes again, the same values at the same
    places), the capture runs nothing, and the replay gives the logits."""

    def __init__(self, model: Transformer, k, v, max_len):
        self.model, self.k, self.v, self.max_len = model, k, v, max_len
        self.graphs = {}  # batch -> (tokens, positions, replay, logits)

    def __call__(self, tokens, positions):
        B = tokens.shape[0]
        if B not in self.graphs:
            t, p, step = tokens.clone(), positions.clone(), compiled_decode("cuda", trees=False)
            self.graphs[B] = (t, p, *_record(lambda: step(self.model, t, p, self.k, self.v, self.max_len)))
        t, p, replay, logits = self.graphs[B]
        t.copy_(tokens)
        p.copy_(positions)
        replay()
        return logits


def _no_parameter_guards(guards):
    # a guard per parameter (its shape, strides, dtype) is checked before every step: the guard
    # manager's check of a 100M model's step took 27 us on an AMD EPYC, 20 us without these (timed
    # alone as bench/decode_profile.py --compile does; torch.profiler's "TorchDynamo Cache Lookup"
    # row shows some ten times more). A model's parameters keep their shapes while an engine
    # decodes; the guards on the values the code reads (the config, the layers' op keys) stay, so
    # another model still gets its own graph.
    return [not (g.guard_type == "TENSOR_MATCH" and isinstance(g.value, torch.nn.Parameter)) for g in guards]


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
