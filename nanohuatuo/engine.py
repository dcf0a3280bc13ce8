"""Continuous-batching generation engine: requests join and leave a running batch at every step.

    eng = Engine(model, tokenizer=None, slots=16, max_len=None, compile=False)
    rid = eng.add(prompt_ids, SamplingParams(temperature=0.7, seed=1))   # any thread
    rids = eng.add(prompt_ids, params, n=4)        # 4 samples, the prompt prefilled once
    while eng.has_work():
        for ev in eng.step():                      # one thread only
            ...                                    # Event(rid, token, logprob, top_logprobs, finish_reason)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=64))   # blocking -> [Output]

Built like nano-vllm, in three parts that each fit on a screen:
- the cache: one key and one value tensor per layer, (slots, n_kv_heads, max_len, head_dim),
  allocated once. A running request owns one row ("slot"); its tokens sit left-aligned, so a
  token's slot index is its RoPE position. Running requests always fill rows [0, n): when one
  finishes, the last row moves into its place (one row's keys copied), so a decode step is one
  batch of n rows with no gather.
- the runner: `forward` runs the model's blocks on some rows, each with its own positions, and
  masks every query to the keys of its own row at or before its position. `decode_logits` is one
  token per running row; on CUDA with compile=True it is compiled (CUDA graphs) for a few fixed
  batch sizes, idle rows padding the batch up to the next size.
- the scheduler: `Engine.step` drops cancelled requests, admits waiting ones into free rows
  (prefilling all but the last prompt token: the last one is fed by the decode step, which so
  produces every request's tokens, its first one included), decodes one token for every running
  row, applies each request's own sampling settings, and retires the rows that finished.

Exactness: a request's tokens do not depend on what else is in the batch (greedy: the tokens of
running it alone; seeded sampling: one torch.Generator per request, one uniform draw per token).
Log-probs are those of logits / temperature before top-k/top-p and the repetition penalty, what
PPO's importance ratios need; they match a plain forward pass to float rounding.

For a server, `EngineLoop` steps an engine from its own thread and hands each request's text
(decoded incrementally, cut at stop strings) to a queue that any other thread reads; see below.
"""

import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import Transformer, rope_cos_sin
from .tokenizer import StreamDecoder


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop_ids: tuple = ()  # a request ends on one of these tokens (it is kept)
    stop_strings: tuple = ()  # ... or on the token that completes one of these (needs the tokenizer)
    seed: int | None = None  # None: drawn from torch's global RNG when the request is added
    logprobs: bool = False  # log-prob of each token under logits / temperature
    top_logprobs: int = 0  # also the n most likely tokens and their log-probs at each step


@dataclass
class Event:
    rid: int
    token: int | None  # None only for a cancelled request
    logprob: float | None  # None unless the request asked for log-probs
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while the request runs; "stop" | "length" | "cancelled" at its end


@dataclass
class Output:
    rid: int
    prompt: list[int]
    tokens: list[int]  # new tokens, the stop token included
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str  # "stop" (stop id or string) | "length" (max_new_tokens or cache row full) | "cancelled"
    text: str | None  # the tokens decoded, if the engine has a tokenizer


def sample_seed(seed: int, j: int) -> int:
    """The seed of sample j of a request seeded with `seed` (sample 0 keeps it): n samples differ."""
    return seed if j == 0 else (seed * 6364136223846793005 + j * 1442695040888963407) % 2**63


# ----------------------------------------------------------------------------- sampling

def process_rows(logits, temperature, top_k, top_p, penalty, seen):
    """Each row's repetition penalty, temperature, top-k and top-p (in that order, as transformers does).

    logits (B, V); the settings are lists of B numbers (temperature <= 0: unscaled, top_k 0 and
    top_p 1: off); seen (B, V) marks the tokens each row has seen, or None. A setting that is off
    in every row costs nothing, and a row's result never depends on the other rows.
    """
    dev, dt, V = logits.device, logits.dtype, logits.shape[-1]

    def col(xs):
        return torch.tensor(xs, dtype=dt, device=dev)[:, None]  # (B, 1)

    if seen is not None and any(p != 1.0 for p in penalty):
        pen = col(penalty)
        logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    if any(t > 0 for t in temperature):
        logits = logits / col([t if t > 0 else 1.0 for t in temperature])
    ks = [k if 0 < k < V else 0 for k in top_k]
    if any(ks):
        kth = torch.topk(logits, max(ks), dim=-1).values  # (B, max k), descending
        thr = kth.gather(-1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        thr = thr.masked_fill(torch.tensor([k == 0 for k in ks], device=dev)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < thr, float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, idx = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= col([1 - p if p < 1.0 else -1.0 for p in top_p])
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def process_logits(logits, temperature, top_k, top_p, repetition_penalty, seen):
    """`process_rows` with the same settings for every row of logits (B, V)."""
    B = logits.shape[0]
    return process_rows(logits, [temperature] * B, [top_k] * B, [top_p] * B, [repetition_penalty] * B, seen)


def sample_rows(logits, temperature, generators):
    """One token per row of logits (B, V): argmax where temperature <= 0, else a draw from
    softmax(logits) by inverse CDF with one uniform from that row's generator.

    One uniform number per row against the cumulative probabilities: torch.multinomial draws an
    exponential variate per vocabulary entry, which on a CPU costs more than the rest of a small
    model's decode step. right=True never lands on a zero-probability (masked) token, and the clamp
    to the last token with mass guards the top end against rounding.
    """
    tok = logits.argmax(-1)
    rows = [i for i, t in enumerate(temperature) if t > 0]
    if not rows:
        return tok
    sub = logits if len(rows) == len(temperature) else logits[rows]
    probs = sub.float().softmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64, device=cdf.device) for i in rows])
    u = u[:, None] * cdf[:, -1:]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # the last token with mass
    drawn = torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(-1), last)
    if len(rows) == len(temperature):
        return drawn
    tok[rows] = drawn
    return tok


def sample(logits, temperature, generator):
    """`sample_rows` with one temperature and one generator for every row."""
    return sample_rows(logits, [temperature] * logits.shape[0], [generator] * logits.shape[0])


# ----------------------------------------------------------------------------- CPU kernels

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_MEASURED = {}  # (what, weight shape, dtype, threads, batches) -> decision: measured once per process


def _seconds(fn):
    """Best-of-3 (best-of-2 past 20 ms) seconds per call of fn, each timing at least ~2 ms long."""
    t = time.perf_counter()
    fn()  # warm-up, and a first estimate
    first = time.perf_counter() - t
    n = max(1, min(200, int(2e-3 / max(first, 1e-7))))
    best = float("inf")
    for _ in range(3 if first < 0.02 else 2):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def _onednn_linear(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _column_major(w):
    return w.t().contiguous().t()  # same values, (in, out) in memory


def _measure(w, batches, head):
    """('row' | 'col', {batch: 'linear' | 'onednn'}) for weight w (out, in): the faster layout over
    all batches; for the head also the faster kernel at each batch."""
    key = ("head" if head else "proj", tuple(w.shape), w.dtype, torch.get_num_threads(), batches)
    if key not in _MEASURED:
        kernels = {"linear": F.linear}
        if head and _ONEDNN_LINEAR and w.dtype == torch.float32:
            kernels["onednn"] = _onednn_linear
        times = {}  # (layout, kernel, batch) -> seconds
        for layout, wl in (("row", w), ("col", _column_major(w))):
            for b in batches:
                x = torch.randn(b, w.shape[1], dtype=w.dtype)
                for name, fn in kernels.items():
                    times[layout, name, b] = _seconds(lambda: fn(x, wl))
            del wl
        best = {layout: sum(min(times[layout, k, b] for k in kernels) for b in batches) for layout in ("row", "col")}
        layout = min(best, key=best.get)
        _MEASURED[key] = (layout, {b: min(kernels, key=lambda k: times[layout, k, b]) for b in batches})
    return _MEASURED[key]


def tune_cpu_kernels(model: Transformer, batches=(1, 8)):
    """Choose, by timing on this machine, the layout of the CPU weight matrices and the head's kernel.

    A decode step is dominated by reading every weight once per token. Which layout the CPU BLAS
    reads fastest for a few rows of activations depends on the processor: on one Intel Xeon an
    (out, in) matrix stored column-major was read about twice as fast for the (vocab, dim) output
    matrix and 1.3-1.5x for the projections at batch 8; on an AMD EPYC much less. And MKL's sgemm
    reads a tall (vocab, dim) matrix far below memory speed on some processors where oneDNN's
    linear kernel does not. So nothing is fixed: for each distinct (out, in) shape of the blocks'
    projections, and for the output head, this times F.linear on a random (b, in) activation for
    each b in `batches` (at most 16) with the weight row-major (as loaded) and column-major (same
    values, transposed strides), and keeps for every matrix of that shape the layout with the
    smaller summed time; for the head it also times oneDNN's kernel against F.linear at each b,
    and `head_logits` uses the winner for the measured batch size nearest in ratio. Decisions are
    cached per shape, dtype, thread count and batches for the process, so a second model (or a
    second Engine) costs no timing. A large head is multiplied 3 times per layout, kernel and
    batch size (24 products: a few seconds for a 150k-token vocabulary on 2 cores), a test
    model's matrices take milliseconds.

    The parameter objects are kept (tied embeddings stay tied; saving writes the usual row-major
    tensors), the values are unchanged, and it runs outside inference mode, so training can go on
    using the weights. No-op off CPU, for non-float (quantised) weights, and when already done.
    """
    head = model.lm_head
    w = getattr(head, "weight", None)
    if getattr(model, "cpu_kernels", None) is not None or w is None or w.device.type != "cpu":
        return
    # beyond 16 rows the products are compute-bound and timing a big head there would take seconds
    batches = tuple(sorted(set(min(int(b), 16) for b in batches)))
    choice = {"batches": batches, "layouts": {}, "head": {}}
    with torch.inference_mode(False), torch.no_grad():
        by_shape = {}
        for name, m in model.layers.named_modules():
            # LoRA's own small matrices stay as they are; quantised (int8) weights are not floats
            if isinstance(m, torch.nn.Linear) and "lora_" not in name and m.weight.is_floating_point() \
                    and m.weight.is_contiguous():
                by_shape.setdefault((tuple(m.weight.shape), m.weight.dtype), []).append(m.weight)
        for (shape, dtype), ws in by_shape.items():
            layout, _ = _measure(ws[0].data, batches, head=False)
            choice["layouts"][shape] = layout
            if layout == "col":
                for p in ws:
                    p.data = _column_major(p.data)
        if w.is_floating_point() and w.is_contiguous():
            layout, kernels = _measure(w.data, batches, head=True)
            choice["layouts"]["head"] = layout
            if layout == "col":
                w.data = _column_major(w.data)
            if type(head) is torch.nn.Linear and not (model.config.norm_head and w.requires_grad):
                choice["head"] = kernels  # NormHead while training must go through model.logits
    model.cpu_kernels = choice


def head_logits(model: Transformer, h):
    """float32 logits (B, vocab) of the last hidden states h (B, dim), with the kernel that
    `tune_cpu_kernels` measured fastest for the nearest batch size (model.logits otherwise)."""
    kernels = (getattr(model, "cpu_kernels", None) or {}).get("head") if h.device.type == "cpu" else None
    if kernels and h.dtype == torch.float32:
        b = min(kernels, key=lambda m: max(m, h.shape[0]) / min(m, h.shape[0]))
        if kernels[b] == "onednn":
            return _onednn_linear(h, model.lm_head.weight)
    return model.logits(h).float()


# ----------------------------------------------------------------------------- the runner

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
    """Final-normed hidden states (B, T, dim) of ids (B, T) at positions (B, T), through `cache`.

    `Transformer.hidden_states` takes one cache position for all rows; here each row has its own,
    so this runs the same blocks with the row cache and a per-row mask (None: plain causal, for a
    prefill that starts at position 0)."""
    c = model.config
    x = model.embed_tokens(ids)
    if c.embed_norm:
        x = model.embed_norm(x)
    cos_sin = rope_cos_sin(model.inv_freq, positions, x.dtype) if c.pos == "rope" else None
    for layer in model.layers:
        x = layer(x, cos_sin, mask, cache, positions)
    return model.norm(x)


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


# ----------------------------------------------------------------------------- the scheduler

@dataclass(eq=False)
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    slot: int = -1  # its cache row while running; -1 waiting or done
    length: int = 0  # tokens whose keys are in its row
    next: int = 0  # the token the next decode step feeds
    finish_reason: str | None = None


class Engine:
    """A fixed number of slots in one preallocated KV cache, shared by requests that come and go.

    slots: rows decoded together; max_len: positions per row (prompt + new tokens - 1), default
    min(model max_seq_len, 2048); compile: on CUDA, compile the decode step (CUDA graphs) for batch
    sizes 1, 2, 4, ... slots (the first step at each size is slow). On CPU the weight layouts and
    the head kernel are chosen by timing when the engine is made (see `tune_cpu_kernels`).
    add/cancel are thread-safe; step is called from one thread only; generate drives step itself.
    """

    def __init__(self, model: Transformer, tokenizer=None, slots: int = 16, max_len: int | None = None,
                 compile: bool = False):
        if model.lm_head is None:
            raise ValueError("this model has no output head (lm_head): a reward or value model cannot generate")
        if slots < 1:
            raise ValueError(f"Engine: slots={slots}; it needs at least one")
        c = model.config
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self.max_len = max_len or min(c.max_seq_len, 2048)
        p = model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.compile = compile and self.device.type == "cuda"  # CUDA graphs are what pays; CPU stays eager
        self.buckets = sorted({min(2 ** i, slots) for i in range(slots.bit_length() + 1)})
        tune_cpu_kernels(model, batches=(1, slots))
        self.k, self.v = kv_cache(model, slots, self.max_len, self.dtype, self.device, static=self.compile)
        self.seen = torch.zeros((slots, c.vocab_size), dtype=torch.bool, device=self.device)  # repetition penalty
        self.running: list[_Request] = []  # running[i] owns cache row i
        self.waiting = deque()  # groups of requests sharing one prompt (n samples), first come first served
        self.requests = {}  # rid -> _Request, until it finishes
        self.cancelled = set()
        self.lock = threading.Lock()
        self.next_rid = 0

    # -- called from any thread

    def add(self, prompt_ids, params: SamplingParams | list | None = None, n: int = 1):
        """Queue a request; returns its id (a list of n ids if n > 1).

        n > 1: n samples of the prompt, prefilled once; params is one SamplingParams for all
        (seeded samples j > 0 get `sample_seed(seed, j)`) or a list of n.
        """
        prompt = [int(t) for t in prompt_ids]
        shared = not isinstance(params, (list, tuple))  # one setting for all n: seeds derived per sample
        plist = [params or SamplingParams()] * n if shared else list(params)
        if len(plist) != n:
            raise ValueError(f"add: {len(plist)} SamplingParams for n={n} samples")
        V = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty; it needs at least one token (add a BOS token or some text)")
        if not all(0 <= t < V for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {V}) for this model; got {min(prompt)}..{max(prompt)}")
        if len(prompt) > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the engine's max_len={self.max_len}")
        if not 1 <= n <= self.slots:
            raise ValueError(f"n={n} samples must be between 1 and the engine's {self.slots} slots")
        group, drawn = [], None
        for j, sp in enumerate(plist):
            if sp.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens={sp.max_new_tokens}; ask for at least one token")
            if not 0 <= sp.top_logprobs <= V:
                raise ValueError(f"top_logprobs={sp.top_logprobs}; it must lie in [0, {V}]")
            if sp.stop_strings and self.tokenizer is None:
                raise ValueError("stop_strings need a tokenizer to decode the generated text (Engine(tokenizer=...))")
            gen = None
            if sp.temperature > 0:
                if sp.seed is None and drawn is None:
                    drawn = int(torch.randint(2**62, ()))  # from torch's RNG: torch.manual_seed makes it repeatable
                seed = sample_seed(drawn, j) if sp.seed is None else sample_seed(sp.seed, j) if shared else sp.seed
                gen = torch.Generator(device=self.device)
                gen.manual_seed(seed)
            group.append(_Request(-1, prompt, sp, frozenset(int(i) for i in sp.stop_ids), gen))
        with self.lock:
            for r in group:
                r.rid, self.next_rid = self.next_rid, self.next_rid + 1
                self.requests[r.rid] = r
            self.waiting.append(group)
        return group[0].rid if n == 1 else [r.rid for r in group]

    def cancel(self, rid: int):
        """Stop a request; its row is freed at the next step (which reports it as "cancelled")."""
        with self.lock:
            if rid in self.requests:
                self.cancelled.add(rid)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.running or self.waiting or self.cancelled)

    # -- called from the engine thread

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Drop cancelled requests, admit waiting ones into free rows (first come first served; n
        samples of one prompt wait until n rows are free), decode one token for every running row,
        retire the finished ones. Returns this step's events (one per running request)."""
        events = []
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            for group in self.waiting:
                group[:] = [r for r in group if r.rid not in cancelled]
            for rid in cancelled:
                r = self.requests.get(rid)
                if r is not None and r.slot < 0:  # still waiting
                    r.finish_reason = "cancelled"
                    del self.requests[rid]
                    events.append(Event(rid, None, None, None, "cancelled"))
        for r in [r for r in self.running if r.rid in cancelled]:
            self._retire(r, "cancelled")
            events.append(Event(r.rid, None, None, None, "cancelled"))
        with self.lock:
            admitted = []
            while self.waiting and len(self.waiting[0]) <= self.slots - len(self.running) - sum(map(len, admitted)):
                group = self.waiting.popleft()
                if group:
                    admitted.append(group)
        for group in admitted:
            self._prefill(group)
        if self.running:
            events += self._decode()
        return events

    def _prefill(self, group):
        """Keys of all but the last prompt token, computed once into the first row of the group and
        copied into the others (prefix reuse); the last token is fed by the next decode step."""
        prompt, first = group[0].prompt, len(self.running)
        P = len(prompt) - 1
        if P:
            ids = torch.tensor([prompt[:-1]], device=self.device)
            pos = torch.arange(P, device=self.device)[None]  # (1, P)
            c = self.model.config
            plain = c.pos == "rope" and c.sliding_window is None  # SDPA's own causal mask fits
            mask = None if plain else key_mask(self.model, pos, P, self.dtype)
            forward(self.model, ids, pos, RowCache(self.k, self.v, first, pos, P), mask)
        prompt_ids = torch.tensor(prompt, device=self.device)
        for j, r in enumerate(group):
            r.slot, r.length, r.next = first + j, P, prompt[-1]
            if j and P:
                for t in self.k + self.v:
                    t[r.slot, :, :P] = t[first, :, :P]
            self.seen[r.slot] = False
            self.seen[r.slot, prompt_ids] = True
            self.running.append(r)

    def _decode(self):
        rows, n = self.running, len(self.running)
        B = next(b for b in self.buckets if b >= n) if self.compile else n
        tokens = torch.tensor([r.next for r in rows] + [0] * (B - n), device=self.device)
        positions = torch.tensor([r.length for r in rows] + [0] * (B - n), device=self.device)
        if self.compile:  # fixed shapes: all max_len keys, idle rows see their key 0 only
            torch.compiler.cudagraph_mark_step_begin()
            logits = compiled_decode()(self.model, tokens, positions, self.k, self.v, self.max_len)[:n]
        else:
            n_keys = max(r.length for r in rows) + 1
            logits = decode_logits(self.model, tokens, positions, self.k, self.v, n_keys)
        ps = [r.params for r in rows]
        want_lp = [p.logprobs or p.top_logprobs > 0 for p in ps]
        lp = None
        if any(want_lp):  # under logits / temperature, before the penalty and top-k/top-p
            temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in ps], device=self.device)
            lp = torch.log_softmax(logits / temp[:, None], -1)
        x = process_rows(logits, [p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps],
                         [p.repetition_penalty for p in ps], self.seen[:n])
        tok = sample_rows(x, [p.temperature for p in ps], [r.generator for r in rows])
        self.seen[torch.arange(n, device=self.device), tok] = True
        toks = tok.tolist()
        tok_lp = lp.gather(-1, tok[:, None]).squeeze(-1).tolist() if lp is not None else None
        n_top = max(p.top_logprobs for p in ps)
        tops = lp.topk(n_top, dim=-1) if n_top else None
        top_v, top_i = (tops.values.tolist(), tops.indices.tolist()) if tops is not None else (None, None)
        events, done = [], []
        for i, r in enumerate(rows):
            p, t = r.params, toks[i]
            r.length += 1
            r.next = t
            r.tokens.append(t)
            logprob = tok_lp[i] if p.logprobs else None
            top = list(zip(top_i[i][:p.top_logprobs], top_v[i][:p.top_logprobs])) if p.top_logprobs else None
            if p.logprobs:
                r.logprobs.append(logprob)
            if top is not None:
                r.top_logprobs.append(top)
            reason = None
            if t in r.stop_ids or (p.stop_strings and self._stop_string(r)):
                reason = "stop"
            elif len(r.tokens) >= p.max_new_tokens or r.length >= self.max_len:
                reason = "length"
            events.append(Event(r.rid, t, logprob, top, reason))
            if reason:
                done.append((r, reason))
        for r, reason in done:
            self._retire(r, reason)
        return events

    def _stop_string(self, r):
        tail = max(len(s) for s in r.params.stop_strings) + 8  # tokens decoded per check
        text = self.tokenizer.decode(r.tokens[-tail:])
        return any(s in text for s in r.params.stop_strings)

    def _retire(self, r, reason):
        """Free r's row: the last running row moves into it (its keys copied), so rows stay [0, n)."""
        i, last = r.slot, self.running[-1]
        if last is not r:
            for t in self.k + self.v:
                t[i, :, :last.length] = t[last.slot, :, :last.length]
            self.seen[i] = self.seen[last.slot]
            last.slot = i
            self.running[i] = last
        self.running.pop()
        r.slot, r.finish_reason = -1, reason
        with self.lock:
            self.requests.pop(r.rid, None)
            self.cancelled.discard(r.rid)

    # -- blocking convenience

    def generate(self, prompts, params: SamplingParams | list | None = None, n: int = 1) -> list[Output]:
        """Outputs for every prompt (n per prompt, prompt-major), driving step() until all finish.

        params: one SamplingParams, or one per prompt. Identical prompts (with n == 1) are grouped,
        so each distinct prompt is prefilled once. Not to be called while another thread steps.
        """
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"generate: {len(plist)} SamplingParams for {len(prompts)} prompts")
        if n == 1:
            order = [None] * len(prompts)  # one _Request per output, in output order
            groups = {}
            for i, p in enumerate(prompts):
                groups.setdefault(tuple(int(t) for t in p), []).append(i)
            for key, idx in groups.items():
                for s in range(0, len(idx), self.slots):  # a group never exceeds the slots
                    part = idx[s:s + self.slots]
                    rids = self.add(list(key), [plist[i] or SamplingParams() for i in part], n=len(part))
                    for i, rid in zip(part, rids if isinstance(rids, list) else [rids]):
                        order[i] = self.requests[rid]
        else:
            order = []
            for p, sp in zip(prompts, plist):
                order += [self.requests[rid] for rid in self.add(p, sp, n=n)]
        while any(r.finish_reason is None for r in order):
            self.step()
        return [self._output(r) for r in order]

    def _output(self, r: _Request) -> Output:
        p = r.params
        text = self.tokenizer.decode(r.tokens) if self.tokenizer is not None else None
        return Output(r.rid, r.prompt, r.tokens, r.logprobs if p.logprobs else None,
                      r.top_logprobs if p.top_logprobs else None, r.finish_reason, text)


# ----------------------------------------------------------------------------- one engine thread, many clients

def held_back(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class Choice:
    """One answer being generated: its text so far, what was sent, its pending logprobs."""

    def __init__(self, index, rid, tok, stops, strip_end):
        self.index, self.rid = index, rid
        self.decoder = StreamDecoder(tok)
        self.stops, self.strip_end = stops, strip_end
        self.text, self.sent = "", 0
        self.stopped = False  # a stop string was found (the text is cut before it)
        self.tokens = 0  # generated tokens, the stop token included (what usage counts)
        self.logprobs = []  # (token, logprob, top, offset in text) not yet sent
        self.finish_reason = None

    def put(self, token):
        """Add a token's text; True if a stop string is now complete (the text is cut before it)."""
        piece = self.decoder.put(token)
        if not piece:
            return False
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=1) + 1)
        self.text += piece
        return self._cut(start)

    def _cut(self, start=0):
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return bool(hits)

    def close(self, reason):
        """The answer is complete: take what the decoder still holds (never a half character)."""
        if not self.stopped:
            self.text += self.decoder.flush().rstrip("\ufffd")
            self._cut()
        self.finish_reason = "stop" if self.stopped else reason

    def take(self):
        """(new text safe to send, its logprobs): held back is what might start a stop string and,
        with strip_end (chat), trailing white space (a template puts a space or newline before its end token)."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= held_back(self.text, self.stops)
        if self.strip_end:
            end = len(self.text[:end].rstrip())
        delta = self.text[self.sent:end] if end > self.sent else ""
        if not delta and self.finish_reason is None:
            return "", []
        self.sent = max(self.sent, end)
        lps, self.logprobs = self.logprobs, []
        return delta, lps


class QueueFull(Exception):
    """EngineLoop.submit: the sequences in flight plus this request's would exceed the capacity."""


class GenerationFailed(RuntimeError):
    """Ticket.pieces: the engine step (or the loop around it) failed while the request ran."""


class Ticket:
    """A submitted request: its choices and the queue the engine thread answers on."""

    def __init__(self, params, prompt_tokens):
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.choices = []
        self.queue = queue.Queue()  # ("delta", index, text, logprobs, finish_reason) | ("error", message)
        self.t0 = time.perf_counter()

    def pieces(self, idle=None, poll=0.2):
        """(index, text, logprobs, finish_reason) as the engine thread sends them, until every choice
        finished. idle() is called after each `poll` seconds without news (it may raise, to give up:
        the caller then cancels the ticket). A failed generation raises GenerationFailed."""
        unfinished = len(self.choices)
        while unfinished:
            try:
                item = self.queue.get(timeout=poll)
            except queue.Empty:
                if idle is not None:
                    idle()
                continue
            if item[0] == "error":
                raise GenerationFailed(item[1])
            unfinished -= item[4] is not None
            yield item[1:]


class EngineLoop:
    """Owns an Engine and the one thread that steps it; turns each request's tokens into text on its
    ticket's queue. Text is decoded incrementally (a StreamDecoder: no half characters), a stop string
    ends the request as soon as it is complete, and text that may be the start of one is held back.

        loop = EngineLoop(engine, tok, capacity=80); loop.start()
        ticket = loop.submit([prompt_ids], SamplingParams(...), n=2, stops=["\\n\\n"])   # any thread
        for index, text, logprobs, finish_reason in ticket.pieces(): ...
        loop.cancel(ticket)   # a client gone: its rows are freed at the next step
        loop.stop()
    """

    def __init__(self, engine, tok, capacity):
        self.engine, self.tok, self.capacity = engine, tok, capacity
        self.lock = threading.Lock()  # guards rows and in_flight, and keeps add/cancel paired with them
        self.rows = {}  # rid -> (ticket, choice)
        self.in_flight = 0  # sequences added and not finished
        self.cancelled = 0  # sequences cancelled before they finished (their client went away)
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.fail_all("the server is shutting down", log=False)  # no waiting caller blocks for ever

    def submit(self, prompts, params, n=1, stops=(), strip_end=False) -> Ticket:
        """Add n samples of each prompt; raises QueueFull (retry later) or ValueError (a prompt the
        engine refuses, or more sequences than the capacity: neither is worth a retry)."""
        ticket = Ticket(params, sum(len(p) for p in prompts))
        want = len(prompts) * n
        if want > self.capacity:
            raise ValueError(f"the request needs {want} sequences; at most {self.capacity} fit")
        with self.lock:
            if self.in_flight + want > self.capacity:
                raise QueueFull()
            try:
                for prompt in prompts:
                    rids = self.engine.add(prompt, params, n=n)
                    for rid in rids if isinstance(rids, list) else [rids]:
                        choice = Choice(len(ticket.choices), rid, self.tok, stops, strip_end)
                        ticket.choices.append(choice)
                        self.rows[rid] = (ticket, choice)
            except ValueError:  # the engine refused a prompt: take back what was added
                for c in ticket.choices:
                    self.engine.cancel(c.rid)
                    del self.rows[c.rid]
                raise
            self.in_flight += want
        self.wake.set()
        return ticket

    def cancel(self, ticket):
        """Drop a request's unfinished rows (the client went away); their slots free at the next step."""
        with self.lock:
            for choice in ticket.choices:
                if self.rows.pop(choice.rid, None) is not None:
                    self.engine.cancel(choice.rid)
                    self.in_flight -= 1
                    self.cancelled += 1

    @torch.inference_mode()
    def loop(self):
        while not self.stopping:
            self.wake.clear()  # cleared before the check, so an add between the two still wakes us
            if not self.engine.has_work():
                self.wake.wait(0.5)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                self.fail_all(f"generation failed: {type(e).__name__}: {e}")
                continue
            try:
                with self.lock:
                    for ev in events:
                        self.on_event(ev)
            except Exception as e:  # a bug here must not stop the thread every request waits on
                self.fail_all(f"internal error: {type(e).__name__}: {e}")

    def on_event(self, ev):
        row = self.rows.get(ev.rid)
        if row is None:  # cancelled while the step ran
            return
        ticket, choice = row
        choice.tokens += 1
        reason = ev.finish_reason
        stop_token = reason == "stop" and ev.token in ticket.params.stop_ids
        if not stop_token:
            if ticket.params.logprobs:
                choice.logprobs.append((ev.token, ev.logprob, ev.top_logprobs, len(choice.text)))
            if choice.put(ev.token) and reason is None:
                reason = "stop"  # a stop string: the engine need not go on
                self.engine.cancel(ev.rid)
        if reason is not None:
            choice.close("stop" if reason == "stop" else "length")
            del self.rows[ev.rid]
            self.in_flight -= 1
        text, lps = choice.take()
        if text or lps or reason is not None:
            ticket.queue.put(("delta", choice.index, text, lps, choice.finish_reason))

    def fail_all(self, message, log=True):
        if log:
            print(f"error: {message}", file=sys.stderr, flush=True)
        with self.lock:
            tickets = {id(t): t for t, _ in self.rows.values()}
            for rid in list(self.rows):
                self.engine.cancel(rid)
            self.rows.clear()
            self.in_flight = 0
        for t in tickets.values():
            t.queue.put(("error", message))
