"""Engine(keep_prefixes=True) under random schedules: conversations started, continued, branched and
repeated (some under a shared system prompt), single requests and n samples, added between steps or
through generate(), cancelled, the cache grown. Every request gets what a fresh engine without kept
keys gives it (greedy tokens, seeded samples, log-probs), and at every step each running or kept
row's keys and values are the ones a fresh prefill of its tokens computes."""

import random
from dataclasses import replace

import pytest
import torch

import nanohuatuo.engine as engine_mod
from nanohuatuo.engine import PREFIX_MIN, Engine, SamplingParams, sample_seed
from nanohuatuo.engine_runner import RowCache, forward, key_mask, kv_cache
from nanohuatuo.multi_lora import AdapterBank, MultiLoRALinear, select_adapters
from test_engine import CONFIGS, tiny

V = 101  # tiny()'s vocabulary
TOP = 128  # tiny()'s max_seq_len: the longest rows grow() may ask for
ATOL = 5e-5


class Reference:
    """What a fresh engine without kept keys gives each (prompt, params), and the keys a fresh prefill
    of some tokens computes, both memoised."""

    def __init__(self, model):
        self.m, self.outs, self.keys = model, {}, {}

    def run(self, prompt, sp, adapter=0):
        key = (tuple(prompt), repr(sp), adapter)
        if key not in self.outs:
            eng = Engine(self.m, slots=1, max_len=TOP)
            rid = eng.add(prompt, sp, adapter=adapter)
            o = {"tokens": [], "logprobs": [], "top": [], "reason": None, "prompt": None}
            while eng.has_work():
                for ev in eng.step():
                    collect(o, ev)
            assert eng.requests == {} and rid == 0
            self.outs[key] = o
        return self.outs[key]

    def kv(self, tokens, adapter=0):
        """Per layer (keys, values) (n_kv_heads, len, head_dim) of tokens prefilled from position 0."""
        key = (tuple(tokens), adapter)
        if key not in self.keys:
            n = len(tokens)
            k, v = kv_cache(self.m, 1, n, torch.float32, "cpu", static=False)
            pos = torch.arange(n)[None]
            select_adapters(self.m, [adapter])
            with torch.inference_mode():
                forward(self.m, torch.tensor([tokens]), pos, RowCache(k, v, 0, pos, n, start=0),
                        key_mask(self.m, pos, n, torch.float32))
            self.keys[key] = [(a[0], b[0]) for a, b in zip(k, v)]
        return self.keys[key]


def collect(o, ev):
    if ev.token is not None:
        o["tokens"].append(ev.token)
        o["logprobs"].append(ev.logprob)
        o["top"].append(ev.top_logprobs)
    if ev.prompt_logprobs is not None:
        o["prompt"] = ev.prompt_logprobs
    o["reason"] = ev.finish_reason


def close(a, b):
    return a is None and b is None or a is not None and b is not None and abs(a - b) <= ATOL


def check_output(ref, prompt, sp, adapter, got, max_len, where):
    """got (tokens, log-probs, top log-probs, finish reason, prompt log-probs) against the fresh
    engine's: the same, or for a cancelled request or one whose cache row (max_len when it finished)
    filled up, a prefix of it."""
    want = ref.run(prompt, sp, adapter)
    n = len(got["tokens"])
    assert got["tokens"] == want["tokens"][:n], (where, prompt, sp, got["tokens"], want["tokens"])
    if got["reason"] == "cancelled":
        assert n <= len(want["tokens"]), where
    elif got["reason"] == "length" and n < sp.max_new_tokens and len(prompt) - 1 + n == max_len:
        assert n <= len(want["tokens"]), where  # its row was full: the fresh engine's row is longer
    else:
        assert n == len(want["tokens"]) and got["reason"] == want["reason"], (where, got, want)
    assert all(close(a, b) for a, b in zip(got["logprobs"], want["logprobs"])), (where, got, want)
    for a, b in zip(got["top"], want["top"]):
        assert (a is None) == (b is None), where
        if a is not None:
            assert all(close(x, y) for (_, x), (_, y) in zip(a, b)), (where, a, b)
            assert [t for t, _ in a] == [t for t, _ in b], (where, a, b)
    if sp.prompt_logprobs and got["reason"] != "cancelled":
        assert [t for t, _, _ in got["prompt"] or []] == [t for t, _, _ in want["prompt"] or []], where
        assert all(close(x, y) for (_, x, _), (_, y, _) in zip(got["prompt"] or [], want["prompt"] or [])), where


def check_rows(eng, ref, where):
    """Running rows are [0, n); kept rows are free ones; each holds the keys (and values) of its
    tokens as a fresh prefill computes them."""
    assert [r.slot for r in eng.running] == list(range(len(eng.running))), where
    assert all(len(eng.running) <= row < eng.slots for row in eng.held), (where, list(eng.held))
    rows = [(r.slot, (r.prompt + r.tokens)[:r.length], r.adapter) for r in eng.running]
    rows += [(row, tokens, adapter) for row, (tokens, adapter) in eng.held.items()]
    for row, tokens, adapter in rows:
        if not tokens:
            continue
        assert len(tokens) <= eng.max_len, where
        for layer, (k, v) in enumerate(ref.kv(tokens, adapter)):
            for name, got, want in (("k", eng.k[layer], k), ("v", eng.v[layer], v)):
                err = (got[row, :, :len(tokens)] - want).abs().max().item()
                assert err <= 1e-4, (where, f"row {row} layer {layer} {name}: off by {err}", tokens)


def with_adapters(m, k=2, r=4, seed=0):
    """m with k random LoRA adapters attached (ids 1..k) on k_proj, v_proj and down_proj, as
    multi_lora.attach_adapters attaches saved ones: a row's keys depend on its adapter."""
    g = torch.Generator().manual_seed(seed)
    bank = AdapterBank()
    for name, mod in list(m.named_modules()):
        if name.endswith(("k_proj", "v_proj", "down_proj")):
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, MultiLoRALinear(mod, bank))
    for a in range(k):
        for mod in m.modules():
            if isinstance(mod, MultiLoRALinear):
                out_f, in_f = mod.base.weight.shape
                mod.grow(torch.randn(r, in_f, generator=g) * 0.5, torch.randn(out_f, r, generator=g) * 0.5, r)
        bank.names.append(f"a{a}")
        bank.ranges.append((a * r, a * r + r, 1.0))
    bank.rows = torch.zeros(1 + k, bank.width)
    for i, (lo, hi, scaling) in enumerate(bank.ranges):
        bank.rows[i + 1, lo:hi] = scaling
    m.adapter_bank = bank
    return m


def run_schedule(kind, seed, ops=14, stats=None, compile=False, adapters=False):
    """One random schedule of ops on one keep_prefixes engine, every output and row checked (with
    adapters: each request under the base model or one of two LoRA adapters, a conversation mostly
    keeping its own). Adds to stats the counts of what it did. compile: the engine's (for a run by hand
    of the CUDA-graph path on CPU, engine.cuda_graphs patched to True; such an engine does not grow)."""
    rng = random.Random(seed)
    m = with_adapters(tiny(kind), seed=seed) if adapters else tiny(kind)
    ref = Reference(m)
    stats = {} if stats is None else stats

    def count(name):
        stats[name] = stats.get(name, 0) + 1

    slots = rng.choice([1, 2, 3, 4])
    eng = Engine(m, slots=slots, max_len=rng.choice([40, 48, 64]), keep_prefixes=True, compile=compile)
    top = eng.max_len if eng.graphs else TOP  # a CUDA-graph engine cannot grow
    systems = [[rng.randrange(V) for _ in range(PREFIX_MIN + rng.randrange(6))] for _ in range(2)]
    history = []  # (prompt + answer, adapter) of every request that got tokens: the conversations so far
    live = {}  # rid -> (prompt, params, adapter, the events collected)
    prompts_seen = []  # (prompt, adapter)

    def words(lo, hi):
        return [rng.randrange(V) for _ in range(rng.randint(lo, hi))]

    def adapter(a=None):
        if not adapters:
            return 0
        return a if a is not None and rng.random() < 0.8 else rng.choice([0, 0, 1, 2])

    def new_prompt():
        """(prompt, adapter): a conversation's next turn, a prompt again, a branch, or a new one."""
        for _ in range(20):
            r = rng.random()
            if r < 0.3 and history:
                h, a = rng.choice(history)
                p, a = h + words(1, 8), adapter(a)
                count("op:continue")
            elif r < 0.4 and prompts_seen:
                p, a = rng.choice(prompts_seen)
                p, a = list(p), adapter(a)
                count("op:repeat")
            elif r < 0.5 and history:  # a branch or a shorter prefix of a conversation
                h, a = rng.choice(history)
                p, a = h[:rng.randint(1, len(h))] + (words(1, 6) if rng.random() < 0.6 else []), adapter(a)
                count("op:branch")
            elif r < 0.75:
                p, a = rng.choice(systems) + words(1, 10), adapter()
                count("op:system")
            else:
                p, a = words(1, 24), adapter()
                count("op:fresh")
            if len(p) <= eng.max_len:
                return p, a
            if eng.max_len < top and len(p) <= top and rng.random() < 0.7:
                eng.grow(min(top, max(len(p), eng.max_len + rng.choice([8, 16, 32]))))
                count("grow")
                return p, a
        return words(1, 8), adapter()

    def new_params():
        sp = SamplingParams(max_new_tokens=rng.choice([1, 2, 3, 5, 8, 12, 30]), logprobs=rng.random() < 0.5,
                            top_logprobs=rng.choice([0, 0, 0, 3]))
        if rng.random() < 0.25:
            sp = replace(sp, temperature=rng.choice([0.7, 1.0, 1.3]), seed=rng.randrange(1000),
                         top_k=rng.choice([0, 0, 20]), top_p=rng.choice([1.0, 1.0, 0.9]))
            count("sampled")
        if rng.random() < 0.25:
            sp = replace(sp, stop_ids=tuple(rng.randrange(V) for _ in range(3)))
        if rng.random() < 0.1:
            sp = replace(sp, repetition_penalty=1.3)
        if rng.random() < 0.08:
            sp = replace(sp, prompt_logprobs=True)
        return sp

    def finish(prompt, sp, a, o, where):
        check_output(ref, prompt, sp, a, o, eng.max_len, where)
        count("checked")
        if o["tokens"]:
            history.append((prompt + o["tokens"], a))
        prompts_seen.append((tuple(prompt), a))

    def step(where):
        for ev in eng.step():
            prompt, sp, a, o = live[ev.rid]
            collect(o, ev)
            if ev.finish_reason is not None:
                del live[ev.rid]
                finish(prompt, sp, a, o, (where, ev.rid))
        check_rows(eng, ref, where)

    def add(prompt, a, sp, n=1):
        rids = eng.add(prompt, sp, n=n, adapter=a)
        for j, rid in enumerate(rids if n > 1 else [rids]):
            own = replace(sp, seed=sample_seed(sp.seed, j)) if sp.seed is not None else sp
            live[rid] = (prompt, own, a, {"tokens": [], "logprobs": [], "top": [], "reason": None, "prompt": None})
        count("add" if n == 1 else "add n>1")

    for op in range(ops):
        where = (kind, seed, op)
        r = rng.random()
        if r < 0.45:  # requests join between steps, while others run
            for _ in range(rng.randint(1, slots)):
                add(*new_prompt(), new_params(), n=min(slots, rng.choice([1, 1, 1, 1, 2, slots])))
            for _ in range(rng.randint(1, 6)):
                step(where)
        elif r < 0.55 and not live and len(history) > 1 and slots > 1:  # conversations go on in one step
            for h, a in rng.sample(history, rng.randint(2, min(slots, len(history)))):
                more = words(0, 6) if rng.random() < 0.8 else [rng.randrange(V)] * (eng.max_len - len(h))
                add((h + more)[:eng.max_len], adapter(a), replace(new_params(), prompt_logprobs=False))
            count("turns")
            step(where)
        elif r < 0.65 and not live:  # generate() drives the steps itself (the base model only)
            k = rng.randint(1, slots + 1)
            prompts = [p for p, a in (new_prompt() for _ in range(k))]
            if k > 1 and rng.random() < 0.3:
                prompts[-1] = list(prompts[0])  # an identical prompt: generate groups them
            params = [replace(new_params(), prompt_logprobs=False) for _ in prompts]
            for p, sp, o in zip(prompts, params, eng.generate(prompts, params)):
                got = {"tokens": o.tokens, "logprobs": o.logprobs or [None] * len(o.tokens),
                       "top": o.top_logprobs or [None] * len(o.tokens), "reason": o.finish_reason}
                finish(p, sp, 0, got, where)
            count("generate")
            check_rows(eng, ref, where)
        elif r < 0.75 and live:
            rid = rng.choice(list(live))
            eng.cancel(rid)
            count("cancel")
            if rng.random() < 0.5:  # stopped mid-answer (chat's Ctrl-C), the next turn asked at once
                prompt, _, a, o = live[rid]
                add((prompt + o["tokens"] + words(1, 6))[:eng.max_len], a, replace(new_params(), prompt_logprobs=False))
                count("cancel+turn")
            step(where)
        elif r < 0.85 and eng.max_len < top:
            eng.grow(min(top, eng.max_len + rng.choice([4, 8, 16])))
            count("grow")
            if live:
                step(where)
        else:
            while eng.has_work():
                step(where)
    while eng.has_work():
        step((kind, seed, "drain"))
    assert not live and not eng.requests
    return stats


def spy(monkeypatch):
    """Counts of the engine paths taken: prefills from kept keys (several of them in one forward)
    and kept keys moved to another row."""
    seen = {"reused": 0, "reused together": 0, "moved": 0}
    real_forward, real_move = engine_mod.forward, Engine._move

    def spied(model, ids, positions, *a):  # the engine's prefills (its decode steps call the runner's own)
        starts = positions[:, 0]
        seen["reused"] += int(starts.max() > 0)
        seen["reused together"] += int((starts > 0).sum() > 1)
        return real_forward(model, ids, positions, *a)

    def move(self, src, dst):
        seen["moved"] += src != dst
        return real_move(self, src, dst)

    monkeypatch.setattr(engine_mod, "forward", spied)
    monkeypatch.setattr(Engine, "_move", move)
    return seen


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_random_schedules_match_a_fresh_engine(monkeypatch, kind):
    """Six random schedules per model (RoPE, ALiBi, sliding window; 1 to 4 slots): every request's
    greedy tokens, seeded samples and log-probs are a fresh engine's, and every running and kept row
    holds a fresh prefill's keys at every step. The seeds are ones whose schedules reuse kept keys
    (several turns in one forward too), move them, grow the cache, cancel, and add n samples."""
    seen = spy(monkeypatch)
    stats = {}
    for seed in (0, 4, 5, 7, 8, 11):
        run_schedule(kind, seed, stats=stats)
    assert all(stats.get(k) for k in ("grow", "cancel", "cancel+turn", "add n>1", "generate", "turns", "sampled"))
    assert stats["checked"] > 100 and seen["reused"] >= 10 and seen["reused together"] and seen["moved"], seen


def test_random_schedules_under_lora_adapters(monkeypatch):
    """The same with two LoRA adapters attached, each request under the base model or one of them: a
    kept row is taken only by a request under the adapter that computed its keys (seeds where an
    adapter-blind match would hand a turn another adapter's keys), and the outputs are a fresh
    engine's under the request's own adapter."""
    seen = spy(monkeypatch)
    for seed in (5, 7, 8):
        run_schedule("llama", seed, adapters=True)
    assert seen["reused"] >= 5 and seen["moved"], seen
