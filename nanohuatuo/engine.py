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
  token per running row. With compile=True it is compiled: on CUDA into CUDA graphs for a few
  fixed batch sizes, idle rows padding the batch up to the next size; on CPU into fused loops
  for the element-wise work between the matrix products, which keep their measured kernels.
- the scheduler: `Engine.step` drops cancelled requests, admits waiting ones into free rows
  (prefilling all but the last prompt token: the last one is fed by the decode step, which so
  produces every request's tokens, its first one included; single requests admitted in one step
  share one padded forward), decodes one token for every running
  row, applies each request's own sampling settings, and retires the rows that finished. With
  keep_prefixes (chat, serve, evaluation) a retired row keeps its keys while free, and a request
  whose prompt begins with them (the conversation's next turn) takes that row and prefills only
  the rest.

Exactness: a request's tokens do not depend on what else is in the batch (greedy: the tokens of
running it alone; seeded sampling: one torch.Generator per request, one uniform draw per token),
up to float rounding: a batch of rows is multiplied with other roundings than one row (logits
apart by about 1e-6), which flips a token only at a near-tie, or where a draw falls that close to
the edge between two tokens.
Log-probs are those of logits / temperature before top-k/top-p and the repetition penalty, what
PPO's importance ratios need; they match a plain forward pass to float rounding. Prompt
log-probs (`prompt_logprobs`, for scoring a text) are read off the prefill, plain log-softmax, and
arrive on the request's first event. `add(..., adapter=i)` runs a request under the i-th LoRA
adapter attached with multi_lora.attach_adapters: each row of a step picks its own.

The cache and runner live in engine_runner.py and the sampling in token_sampling.py, each one
screen; this module is the scheduler. Two neighbours hold what the engine uses but is not the
engine: cpu_kernels.py chooses, by timing,
the CPU weight layout and the output head's kernel (`tune_cpu_kernels`, `head_logits`), and
engine_loop.py holds the serving loop (`EngineLoop` steps an engine from its own thread and hands
each request's text, decoded incrementally and cut at stop strings, to a queue that any other
thread reads).
"""

import os
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from .cpu_kernels import head_logits, opaque_products, room_for, tune_cpu_kernels
from .engine_runner import GraphedDecode, RowCache, compiled_decode, decode_logits, forward, key_mask, kv_cache
from .model import Transformer
from .multi_lora import select_adapters
from .token_sampling import SamplingParams, next_tokens, sample_seed, token_logprobs

# single requests admitted in one step are prefilled together while right padding costs at most a
# quarter more tokens than the prompts hold, and at most this many padded tokens in one forward
PAD_WASTE = 1.25
PREFILL_TOKENS = 8192
# keep_prefixes: a kept row is taken for a request only when it holds this many of its prompt's tokens;
# a shorter match saves less than a forward of its own costs (one read of every weight)
PREFIX_MIN = 16


def common_prefix(a: list, b: list) -> int:
    """How many leading items two lists share (by halving, each test one slice comparison in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


@dataclass
class Event:
    rid: int
    token: int | None  # None only for a cancelled request
    logprob: float | None  # None unless the request asked for log-probs
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while the request runs; "stop" | "length" | "cancelled" at its end
    # on a request's first event, if it asked for them: (token, logprob, top) for prompt tokens 1.. (the
    # first token has no context to be predicted from)
    prompt_logprobs: list[tuple[int, float, list | None]] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys a kept row held (keep_prefixes), not computed again


@dataclass
class Output:
    rid: int
    prompt: list[int]
    tokens: list[int]  # new tokens, the stop token included
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str  # "stop" (stop id or string) | "length" (max_new_tokens or cache row full) | "cancelled"
    text: str | None  # the tokens decoded, if the engine has a tokenizer
    cached_tokens: int = 0  # as Event's


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
    adapter: int = 0  # which LoRA adapter of a multi_lora model the request runs under (0: none)
    prompt_logprobs: list | None = None  # until its first event carries them
    cached: int = 0  # prompt tokens whose keys a kept row held (`_reuse`)


def cuda_graphs(device):
    """Whether a compiled decode step records CUDA graphs there (on CUDA; a test takes this path on CPU)."""
    return device.type == "cuda"


class Engine:
    """A fixed number of slots in one preallocated KV cache, shared by requests that come and go.

    slots: rows decoded together; max_len: positions per row (prompt + new tokens - 1), default
    min(model max_seq_len, 2048); compile: compile the decode step, on CUDA into CUDA graphs for batch
    sizes 1, 2, 4, ... slots (the first steps compile; the first at each new size records a graph;
    torch.compile's graph trees, or with NANOHUATUO_CUDA_GRAPHS=manual the engine's own, `GraphedDecode`),
    on CPU with the element-wise ops between the matrix products fused (needs a C++ compiler; the
    first steps take seconds to tens of seconds; without a compiler it warns and decodes eagerly).
    On CPU the weight layouts and the head kernel are chosen by timing when the engine is made (see
    `tune_cpu_kernels`).
    keep_prefixes: a finished request's keys stay in its row while the row is free, and a single
    request whose prompt begins with PREFIX_MIN or more of the tokens they hold (an earlier turn of
    its conversation: that turn's prompt and answer) takes that row (longest matches first, so rows
    sharing only a system prompt do not steal a conversation's turn) and prefills only the rest, so
    a chat's next turn costs its new tokens, not the whole conversation again. Only for a model
    whose weights stay as they are while the engine lives (chat, serve, evaluation's answers).
    A prompt prefilled afresh moves the kept keys out of the rows it takes, into free rows that keep
    nothing, while there are any. `grow(max_len)` lengthens the rows, running and kept keys carried over.
    Kept keys were computed by other forwards (the decode steps of the answer, a prefill of other
    rows), whose kernels may round differently from a fresh prefill's: where greedy logits nearly
    tie, the next turn's tokens can then differ from a fresh engine's (docs/benchmarks.md).
    add/cancel are thread-safe; step is called from one thread only; generate drives step itself.
    """

    def __init__(self, model: Transformer, tokenizer=None, slots: int = 16, max_len: int | None = None,
                 compile: bool = False, keep_prefixes: bool = False):
        if model.lm_head is None:
            raise ValueError("this model has no output head (lm_head): a reward or value model cannot generate")
        if slots < 1:
            raise ValueError(f"Engine: slots={slots}; it needs at least one")
        c = model.config
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self.max_len = max_len or min(c.max_seq_len, 2048)
        p = model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        # a compiled step would freeze a multi-LoRA model's per-row adapter mask
        self.compile = compile and getattr(model, "adapter_bank", None) is None
        self.graphs = self.compile and cuda_graphs(self.device)  # CUDA graphs: bucketed batches, a static cache
        self.buckets = sorted({min(2 ** i, slots) for i in range(slots.bit_length() + 1)})
        tune_cpu_kernels(model, batches=(1, slots), compiled=self.compile)
        if self.compile and self.device.type == "cpu":
            opaque_products(model)
        # on CPU a bfloat16 model's keys and values may be kept in float32, where its attention was timed
        # faster so (tune_cpu_kernels), if the wider cache fits (cpu_kernels.room_for)
        kv = (getattr(model, "cpu_kernels", None) or {}).get("kv_dtype") or self.dtype
        if kv != self.dtype and not room_for(2 * c.n_layers * slots * c.n_kv_heads * self.max_len * c.head_dim
                                             * (kv.itemsize - self.dtype.itemsize)):
            kv = self.dtype
        # a compiled CPU step is specialised on the kind of tensor the cache is: always an inference
        # tensor (only the steps, in inference mode, write it), whether or not the caller is in inference mode
        with torch.inference_mode(self.compile and not self.graphs):
            self.k, self.v = kv_cache(model, slots, self.max_len, kv, self.device, static=self.graphs)
        # CUDA graphs recorded by the engine instead of torch.compile's graph trees: opt-in until measured
        self.graphed = GraphedDecode(model, self.k, self.v, self.max_len) \
            if self.graphs and os.environ.get("NANOHUATUO_CUDA_GRAPHS") == "manual" else None
        self.seen = torch.zeros((slots, c.vocab_size), dtype=torch.bool, device=self.device)  # repetition penalty
        self.running: list[_Request] = []  # running[i] owns cache row i
        self.keep_prefixes, self.held = keep_prefixes, {}  # free row -> (token ids its keys hold, adapter)
        self.waiting = deque()  # groups of requests sharing one prompt (n samples), first come first served
        self.requests = {}  # rid -> _Request, until it finishes
        self.cancelled = set()
        self.lock = threading.Lock()
        self.next_rid = 0

    # -- called from any thread

    def add(self, prompt_ids, params: SamplingParams | list | None = None, n: int = 1, adapter: int = 0):
        """Queue a request; returns its id (a list of n ids if n > 1).

        n > 1: n samples of the prompt, prefilled once; params is one SamplingParams for all
        (seeded samples j > 0 get `sample_seed(seed, j)`) or a list of n. adapter: the id of a
        LoRA adapter attached with multi_lora.attach_adapters (0: the base model).
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
        bank = getattr(self.model, "adapter_bank", None)
        if not 0 <= adapter <= (len(bank.names) if bank else 0):
            raise ValueError(f"adapter={adapter}: the model has {len(bank.names) if bank else 0} adapters attached")
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
            group.append(_Request(-1, prompt, sp, frozenset(int(i) for i in sp.stop_ids), gen, adapter=adapter))
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

    def grow(self, max_len: int):
        """Rows of max_len positions from now on (no shorter than now), the keys of running and kept rows
        carried over: for a caller whose conversations outgrow the cache it sized (evaluate's
        consultations). Between steps, from the engine's thread; not with CUDA graphs, recorded on
        the cache's addresses (make a new engine there)."""
        if max_len <= self.max_len:
            return
        if self.graphs:
            raise ValueError("Engine.grow: a compiled CUDA engine's graphs are recorded on its cache; "
                             "make a new engine")
        with torch.inference_mode(self.compile):  # the kind of tensor __init__ made
            k, v = kv_cache(self.model, self.slots, max_len, self.k[0].dtype, self.device, static=False)
            for new, old in zip(k + v, self.k + self.v):
                new[:, :, :self.max_len] = old
        self.k, self.v, self.max_len = k, v, max_len

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
        self._admit(admitted)
        if self.running:
            events += self._decode()
        return events

    def _admit(self, groups):
        """Prefill the admitted groups into the rows after the running ones. Single requests go
        together, sorted by length and cut where right padding would exceed PAD_WASTE of a batch's
        prompt tokens (or PREFILL_TOKENS in all): one forward reads the weights once for the batch,
        where one forward per request read them once each. A group of n samples of one prompt is
        prefilled on its own (its keys copied into its n rows). With keep_prefixes, first, the requests
        that begin with a kept row's keys, batched the same way, each from where its keys stop (`_reuse`)."""
        if self.keep_prefixes and self.held:
            groups = self._reuse(groups)
        self._batches(sorted(((g, 0) for g in groups if len(g) == 1), key=lambda gs: len(gs[0][0].prompt)))
        for g in groups:
            if len(g) > 1:
                self._prefill([(g, 0)])

    def _batches(self, items):
        """Prefill (single request's group, start) items, ascending by the tokens each has to prefill,
        in as few forwards as PAD_WASTE and PREFILL_TOKENS allow (see `_admit`)."""
        batch, tokens = [], 0
        for g, start in items:  # ascending: the newest is the longest, so it sets the padded length
            P = len(g[0].prompt) - 1 - start
            if batch and ((len(batch) + 1) * P > PAD_WASTE * (tokens + P) or (len(batch) + 1) * P > PREFILL_TOKENS):
                self._prefill(batch)
                batch, tokens = [], 0
            batch.append((g, start))
            tokens += P
        if batch:
            self._prefill(batch)

    def _reuse(self, groups):
        """Prefill the single requests (no prompt log-probs) whose prompt begins with PREFIX_MIN or more
        of the tokens a kept row of their adapter holds, from where those stop; returns the groups
        left. Pairs are taken longest match first, each row and request once, so a conversation's next
        turn finds its own row even where another kept row shares its system prompt. The rows' keys
        are moved (`_move`) into the next free rows, in the order of what is left to prefill, which
        then goes through `_batches` like fresh prompts."""
        singles = [g for g in groups if len(g) == 1 and not g[0].params.prompt_logprobs]
        pairs = sorted(((common_prefix(held, g[0].prompt[:-1]), row, i) for row, (held, adapter) in self.held.items()
                        for i, g in enumerate(singles) if g[0].adapter == adapter), reverse=True)
        rows, taken = set(), {}
        for n, row, i in pairs:
            if n < PREFIX_MIN:
                break
            if row not in rows and i not in taken:
                rows.add(row)
                taken[i] = (self.held[row], n)  # the entry itself: _move carries it from row to row
        order = sorted(taken, key=lambda i: len(singles[i][0].prompt) - taken[i][1])
        for j, i in enumerate(order):
            dst = len(self.running) + j
            self._move(next(row for row, kept in self.held.items() if kept is taken[i][0]), dst)
            del self.held[dst]  # taken: the prefill below goes on from its keys
        self._batches([(singles[i], taken[i][1]) for i in order])
        return [g for g in groups if not any(g is singles[i] for i in taken)]

    def _swap(self, i, j, n_i, n_j):
        """Row i's first n_i keys (and values) into row j, row j's first n_j into row i, every layer."""
        for t in self.k + self.v:
            kept = t[i, :, :n_i].clone() if n_i else None
            t[i, :, :n_j] = t[j, :, :n_j]
            if n_i:
                t[j, :, :n_i] = kept

    def _move(self, src, dst):
        """Swap two free rows' keys with what each keeps (`held`), so the keys kept in `src` are in `dst`."""
        if src != dst:
            a, b = self.held.pop(src), self.held.pop(dst, None)
            self._swap(src, dst, len(a[0]), len(b[0]) if b else 0)
            self.held[dst] = a
            if b:
                self.held[src] = b

    def _prefill(self, items):
        """Keys of all but the last prompt token of each (group, start) item, computed in one forward
        into the first row of each group and copied into the group's other rows (prefix reuse); the
        last token is fed by the next decode step. Several items: one row each (only single
        requests are batched, so their rows are consecutive). An item's start: the keys of its first
        `start` prompt tokens are in its row already (`_reuse`), and its tokens go in from there.
        Rows are right-padded: a row's padding keys lie past its prompt, where its own tokens
        overwrite them before any query can see them (with different starts, a padding position
        past the end of the cache row is written at its last position instead)."""
        first = len(self.running)
        rows = range(first, first + sum(len(g) for g, _ in items))
        spare = [row for row in range(rows.stop, self.slots) if row not in self.held]
        for row in rows:  # about to be overwritten: kept keys go to a free row that keeps nothing, if any is left
            if row in self.held and spare:
                self._move(row, spare.pop())
            self.held.pop(row, None)
        lengths = [len(g[0].prompt) - 1 for g, _ in items]
        starts = [s for _, s in items]
        T = max(n - s for n, s in zip(lengths, starts))
        if T > 0:
            ids = torch.tensor([g[0].prompt[s:-1] + [0] * (T - n + s) for (g, s), n in zip(items, lengths)],
                               device=self.device)
            if len(set(starts)) == 1:  # one slice of positions for every row: written without scattering
                pos = torch.arange(starts[0], starts[0] + T, device=self.device)[None].expand(len(items), T)
                cache = RowCache(self.k, self.v, first, pos, starts[0] + T, start=starts[0])
            else:
                pos = (torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device))
                pos = pos.clamp(max=self.max_len - 1)
                cache = RowCache(self.k, self.v, first, pos, int(pos.max()) + 1)
            c = self.model.config
            plain = c.pos == "rope" and c.sliding_window is None and not any(starts)  # SDPA's causal mask fits
            mask = None if plain else key_mask(self.model, pos, cache.n_keys, self.k[0].dtype)
            select_adapters(self.model, [g[0].adapter for g, _ in items])
            h = forward(self.model, ids, pos, cache, mask)
            for j, ((g, s), n) in enumerate(zip(items, lengths)):
                if n and not s and any(r.params.prompt_logprobs for r in g):  # (reused rows never ask)
                    lps = self._prompt_logprobs(h[j, :n], g[0].prompt, max(r.params.top_logprobs for r in g))
                    for r in g:
                        r.prompt_logprobs = lps if r.params.prompt_logprobs else None
        for (g, start), n in zip(items, lengths):
            prompt_ids = torch.tensor(g[0].prompt, device=self.device)
            head = len(self.running)  # the group's first row, which the forward filled
            for j, r in enumerate(g):
                r.slot, r.length, r.next, r.cached = head + j, n, g[0].prompt[-1], start
                if j and n:
                    for t in self.k + self.v:
                        t[r.slot, :, :n] = t[head, :, :n]
                self.seen[r.slot] = False
                self.seen[r.slot, prompt_ids] = True
                self.running.append(r)

    def _prompt_logprobs(self, h, prompt, n_top, chunk=512):
        """(token, logprob, top) of prompt tokens 1.. from the prefill's hidden states h (P, dim): the
        plain log-softmax of the logits (no temperature), in chunks so a long prompt's (P, vocab)
        log-probs never sit in memory at once."""
        out = []
        targets = torch.tensor(prompt[1:], device=self.device)
        for s in range(0, h.shape[0], chunk):
            lp = torch.log_softmax(head_logits(self.model, h[s:s + chunk]), -1)
            picked = lp.gather(-1, targets[s:s + chunk, None]).squeeze(-1).tolist()
            if n_top:
                top = lp.topk(n_top, dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            else:
                tops = [None] * len(picked)
            out += list(zip(prompt[1 + s:1 + s + chunk], picked, tops))
        return out

    def _compiled_cpu(self, args):
        try:
            return compiled_decode(self.device.type)(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ compiler, most often: slower, not wrong
            cause = getattr(e, "inner_exception", None) or e
            warnings.warn(f"compile=True: torch.compile failed on {self.device.type} ({type(cause).__name__}: "
                          f"{(str(cause).strip() or '?').splitlines()[0]}); this engine decodes eagerly")
            self.compile = False
            return decode_logits(*args)

    def _decode(self):
        rows, n = self.running, len(self.running)
        B = next(b for b in self.buckets if b >= n) if self.graphs else n
        for row in range(n, B):  # idle rows padding a graph's batch write a key at position 0 of theirs
            self.held.pop(row, None)
        tokens = torch.tensor([r.next for r in rows] + [0] * (B - n), device=self.device)
        positions = torch.tensor([r.length for r in rows] + [0] * (B - n), device=self.device)
        select_adapters(self.model, [r.adapter for r in rows] + [0] * (B - n))
        if self.graphed is not None:  # fixed shapes as below, the graphs the engine's own
            logits = self.graphed(tokens, positions)[:n]
        elif self.graphs:  # fixed shapes: all max_len keys, idle rows see their key 0 only
            torch.compiler.cudagraph_mark_step_begin()
            logits = compiled_decode()(self.model, tokens, positions, self.k, self.v, self.max_len)[:n]
        else:
            lengths = [r.length for r in rows]
            n_keys = max(lengths) + 1
            # rows all at one position (always at batch 1): keys written as a slice, no mask; compiled,
            # only at batch 1, so a model needs two graphs (batch 1 and more), each compiled once
            same = min(lengths) + 1 == n_keys and (n == 1 or not self.compile)
            args = (self.model, tokens, positions, self.k, self.v, n_keys, same)
            logits = self._compiled_cpu(args) if self.compile else decode_logits(*args)
        ps = [r.params for r in rows]
        temps = [p.temperature for p in ps]
        tok = next_tokens(logits, temps, [p.top_k for p in ps], [p.top_p for p in ps],
                          [p.repetition_penalty for p in ps], self.seen[:n], [r.generator for r in rows])
        if any(p.repetition_penalty != 1.0 for p in ps):  # only a penalised row reads its own row of seen
            self.seen[torch.arange(n, device=self.device), tok] = True
        toks = tok.tolist()
        tok_lp = top_v = top_i = None
        if any(p.logprobs or p.top_logprobs > 0 for p in ps):  # under logits / temperature, before the penalty
            lp, tops = token_logprobs(logits, temps, tok, max(p.top_logprobs for p in ps))
            tok_lp = lp.tolist()
            if tops is not None:
                top_v, top_i = tops[0].tolist(), tops[1].tolist()
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
            events.append(Event(r.rid, t, logprob, top, reason, r.prompt_logprobs, r.cached))
            r.prompt_logprobs = None
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
        """Free r's row: the last running row moves into it (its keys copied), so rows stay [0, n).
        With keep_prefixes r's keys move the other way, into the row freed, and stay there."""
        i, last = r.slot, self.running[-1]
        if last is not r:
            self._swap(i, last.slot, r.length if self.keep_prefixes else 0, last.length)
            self.seen[i] = self.seen[last.slot]
            last.slot = i
            self.running[i] = last
        self.running.pop()
        if self.keep_prefixes:
            self.held[len(self.running)] = ((r.prompt + r.tokens)[:r.length], r.adapter)
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
                      r.top_logprobs if p.top_logprobs else None, r.finish_reason, text, r.cached)
