"""Benchmark: generation tokens/s of nanohuatuo's engine against a static batch and transformers'
generate, on the same weights, in one run. The static batch is the engine before continuous
batching: every row prefilled in one padded batch and decoded until the batch is done, on the
engine's own KV cache and decode step, so the two differ only in scheduling.

Builds Qwen2-shaped models with random weights (about 100M and 500M parameters, 1.5B for a GPU;
"tiny" for a smoke run), saves them in the Hugging Face layout, then times, for each size:

(a) fixed length: greedy, the same prompt length and number of new tokens in every row, batch 1
    and 8: transformers, the static path, the engine; at batch 1 also the share of the
    memory-bandwidth limit reached (weight bytes x tokens/s over the bandwidth this machine
    reaches in a large matrix-vector product, measured at the start and again right after each
    timing, the higher of the two counting);
(b) mixed workload: --mixed-requests requests with prompt and answer lengths drawn uniformly from
    --mixed-prompt and --mixed-new (answers fixed by max_new_tokens, EOS ignored, so every engine
    does the same useful work), --slots rows at a time: the engine (all requests queued at once),
    the static path and transformers in batches of --slots (each batch decodes until its longest
    answer is done). Tokens/s counts the requested tokens only;
(c) prefix reuse: --k samples of each of --k-prompts prompts (temperature 1, seeded), on the
    engine with add(prompt, n=k) (prompt prefilled once) and with k separate adds;
(d) with --compile, every table again with the decode step compiled (the engine's and the static
    path's: CUDA graphs on CUDA, on CPU the element-wise ops between the products fused);
    transformers is timed in the eager round only, its figure repeated in the compiled one;
(e) weight formats (with table (a), on CPU by default): the engine's greedy decode of (a) with the
    same weights loaded as each of --weights float32 bfloat16 int8 (int8: quant.quantize_int8 on the
    --dtype model, its kernel measured at load), batch 1 and 8, loaded and tuned again for each
    batch size as an engine of that many slots tunes it (batch 1: chat's one slot), and with
    --compile again compiled (as chat and serve run with --compile): tokens/s, the
    weight bytes a decode step reads, the share of the float32 matrix-vector bandwidth that
    reaches (weight bytes x steps/s), and the share of tokens identical to float32 greedy's (per
    row up to the first difference, so a near-tie that flips shows instead of hiding in a later
    match).

    python bench/generate.py                                  # CPU, float32, 100M and 500M
    python bench/generate.py --device cuda --dtype bfloat16 --compile
    bash bench/gpu.sh DIR          # the GPU table of docs/benchmarks.md: 0.5B and 1.5B, batch 1/8/64, mixed
    python bench/generate.py --tables fixed mixed --weights --compile   # CPU: eager, then compiled
    python bench/generate.py --sizes tiny --new-tokens 8 --mixed-requests 8 --slots 4 \\
        --mixed-prompt 8 32 --mixed-new 4 16 --k-prompts 4 --k-prompt-len 8 32 --k-new-tokens 8   # smoke run
    python bench/generate.py --tables fixed --weights float32 bfloat16 int8   # (a) and (e) only
    python bench/generate.py --sizes --model DIR --weights float32 bfloat16 int8   # (e) on a checkpoint
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanohuatuo import Transformer  # noqa: E402
from nanohuatuo import cpu_kernels as ck  # noqa: E402
from nanohuatuo.cpu_kernels import head_logits, opaque_products, tune_cpu_kernels  # noqa: E402
from nanohuatuo.engine import Engine, SamplingParams  # noqa: E402
from nanohuatuo.engine_runner import RowCache, compiled_decode, decode_logits, forward, key_mask, kv_cache  # noqa: E402
from nanohuatuo.generate import for_inference, generate, left_pad  # noqa: E402
from nanohuatuo.metrics import cpu_name  # noqa: E402
from nanohuatuo.quant import quantize_int8  # noqa: E402

SIZES = {
    # a smoke-test toy, a narrower, shallower model with Qwen2.5's vocabulary, Qwen2.5-0.5B's shape
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "100M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2),
    "500M": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),  # Qwen2.5-1.5B's shape (for a GPU)
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(size, workdir, dtype, device="cpu"):
    import transformers as tf
    path = os.path.join(workdir, f"qwen2-{size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        kw = dict(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
        kw.update(SIZES[size])
        with torch.device(device):  # random initialisation of a 1.5B model takes a while on a CPU
            tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw)).to(dtype).save_pretrained(path)
    return path


class Rows(list):
    """The measured rows: each printed as it comes and, with --out, the JSON file rewritten, so a
    run stopped part way (a time limit on a lent GPU) keeps what it measured."""

    def __init__(self, out, bandwidth):
        super().__init__()
        self.out, self.bandwidth = out, bandwidth

    def add(self, row):
        self.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            with open(self.out + ".tmp", "w") as f:
                json.dump(dict(bandwidth=self.bandwidth, rows=self), f, indent=1)
            os.replace(self.out + ".tmp", self.out)


def matvec_bandwidth(device, dtype, mbytes=512, reps=20, rounds=3, read=None):
    """Bytes/s read by a large matrix-vector product (the decode step's dominant operation): the
    fastest of the kernels the engine may choose on this machine (F.linear with the matrix row- and
    column-major; on CPU also oneDNN's linear kernel, which read a 512 MB matrix 1.2-1.3x faster
    than F.linear on an AMD EPYC, on the plain matrices and on oneDNN's packed layout), so the share
    reported against it is a share of what this machine's kernels can read, not of a slower
    kernel's speed. The best of `rounds` rounds: on a shared 2-core machine one round read anywhere
    between 20 and 30 GB/s. `read`: a `matvec_reader` already made (its matrix is reused)."""
    read = read or matvec_reader(device, dtype, mbytes)
    return max(read(reps) for _ in range(rounds))


def matvec_reader(device, dtype, mbytes=512):
    """A function reps -> bytes/s: one round of `matvec_bandwidth`'s products (every kernel and
    layout, reps calls each, the fastest), on one (mbytes) matrix made once, so a benchmark can
    measure the bandwidth again next to each of its own timings."""
    esize = torch.finfo(dtype).bits // 8
    n = int((mbytes * 2**20 / esize) ** 0.5)
    W = torch.randn(n, n, device=device).to(dtype)
    x = torch.randn(1, n, device=device).to(dtype)
    kernels = [torch.nn.functional.linear]
    onednn = device == "cpu" and (ck._ONEDNN_LINEAR and dtype == torch.float32 or ck._ONEDNN_BF16 and dtype == torch.bfloat16)
    if onednn:
        kernels.append(ck._onednn_linear)  # the engine's own oneDNN kernel, where tune_cpu_kernels would time it
    layouts = [(W, kernels), (W.t().contiguous().t(), kernels)]  # both layouts: the kernels differ, take the faster
    if onednn and ck._ONEDNN_PACK:  # and oneDNN's packed layout, which the engine may keep too
        layouts.append((ck._pack(W, 1), [ck._onednn_linear]))

    def read(reps):
        best = 0.0
        for w, fns in layouts:
            for fn in fns:
                for _ in range(3):
                    fn(x, w)
                sync(device)
                t = time.perf_counter()
                for _ in range(reps):
                    fn(x, w)
                sync(device)
                best = max(best, reps * W.numel() * esize / (time.perf_counter() - t))
        return best
    return read


def time_it(fn, device, repeats):
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------- the three engines

_kept = {}  # compiled static batch on CUDA: one cache kept (CUDA graphs replay on fixed addresses)


@torch.inference_mode()
def static_generate(model, prompts, max_new_tokens, compile=False):
    """Greedy, the engine before continuous batching: all rows right-padded into one prefill on the
    engine's cache (a row's tokens at their positions), then the engine's decode step for every row
    until the batch is done (EOS ignored). A padding key past a row's prompt is overwritten by the
    row's next token before any query can see it."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    tune_cpu_kernels(model, batches=(1, len(prompts)))
    B, lengths = len(prompts), torch.tensor([len(p) for p in prompts], device=device)
    P = int(lengths.max())
    S = P + max_new_tokens
    step = decode_logits
    graphs = compile and device.type == "cuda"
    if compile:  # the engine's compiled step (on CPU its products opaque)
        if not graphs:
            opaque_products(model)
        step = compiled_decode(device.type)
    if graphs:
        S = -(-S // 256) * 256  # few cache shapes, so few graphs recorded
        if _kept.get("shape") != (B, S):
            _kept.pop("cache", None)
            _kept["cache"], _kept["shape"] = kv_cache(model, B, S, dtype, device, static=False), (B, S)
            for t in _kept["cache"][0] + _kept["cache"][1]:
                torch._dynamo.mark_static_address(t)
        k, v = _kept["cache"]
    else:
        k, v = kv_cache(model, B, S, dtype, device, static=False)
    ids = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=device)
    pos = torch.arange(P, device=device)[None].expand(B, P)
    h = forward(model, ids, pos, RowCache(k, v, 0, pos, P), key_mask(model, pos, P, dtype))
    tok = head_logits(model, h[torch.arange(B, device=device), lengths - 1]).argmax(-1)
    out = [tok]
    for t in range(max_new_tokens - 1):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        tok = step(model, tok, lengths + t, k, v, S).argmax(-1)
        out.append(tok)
    return torch.stack(out, 1).tolist()


def hf_generate(hf, prompts, max_new_tokens, device):
    ids, mask = left_pad(prompts, 0, device)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


def engine_run(ours, prompts, news, slots, compile, n=1, sample=False, max_len=None):
    """All requests queued at once on one Engine (max_len: its cache's positions per row, by default
    just enough); returns the tokens per request."""
    eng = Engine(ours, slots=slots, max_len=max_len or max(map(len, prompts)) + max(news), compile=compile)
    reqs = []
    for i, (p, m) in enumerate(zip(prompts, news)):
        sp = SamplingParams(max_new_tokens=m, temperature=1.0 if sample else 0.0, seed=i)
        rids = eng.add(p, sp, n=n)
        reqs += [eng.requests[r] for r in (rids if n > 1 else [rids])]
    while eng.has_work():
        eng.step()
    return [r.tokens for r in reqs]


# ----------------------------------------------------------------------------- the tables

_hf_runs = {}  # transformers' tokens and tok/s per table, size (and batch): timed in the eager round only


def fixed_length(size, args, hf, ours, bar, compile, rows):
    dtype = getattr(torch, args.dtype)
    weight_bytes = ours.num_params() * torch.finfo(dtype).bits // 8
    n_new = args.new_tokens
    V = ours.config.vocab_size
    for B in args.batch_sizes:
        prompts = torch.randint(0, V, (B, args.prompt_len), generator=torch.Generator().manual_seed(B)).tolist()
        runs = {"static": lambda: static_generate(ours, prompts, n_new, compile=compile),
                "engine": lambda: generate(ours, prompts, max_new_tokens=n_new, compile=compile)}
        if args.no_static:
            del runs["static"]
        if ("fixed", size, B) not in _hf_runs:  # once per size and batch: the compiled round reuses it
            run = lambda: hf_generate(hf, prompts, n_new, args.device)  # noqa: E731
            toks, tok_s = run(), B * n_new / time_it(run, args.device, args.repeats)
            _hf_runs["fixed", size, B] = toks, tok_s, weight_bytes * tok_s / bar() if B == 1 else None
        ref, hf_tok_s, hf_share = _hf_runs["fixed", size, B]
        toks = {k: f() for k, f in runs.items()}
        row = dict(table="fixed", size=size, params=ours.num_params(), device=args.device, dtype=args.dtype,
                   compile=compile, batch=B, new_tokens=n_new, prompt_len=args.prompt_len,
                   same_tokens={k: toks[k] == ref for k in runs}, hf_tok_s=hf_tok_s,
                   same_share={k: same_prefix(toks[k], ref) for k in runs})
        if B == 1:
            row["hf_bw_share"] = hf_share
        for k, f in runs.items():
            row[f"{k}_tok_s"] = B * n_new / time_it(f, args.device, args.repeats)
            if B == 1:  # against the bandwidth measured again right after (bar: the higher of it and the start's)
                row[f"{k}_bw_share"] = weight_bytes * row[f"{k}_tok_s"] / bar()
        rows.add(row)


WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


def load_format(path, fmt, args):
    """The model at `path` with its weights in `fmt`: float32, bfloat16, or int8 on the --dtype model."""
    dtype = getattr(torch, args.dtype) if fmt == "int8" else getattr(torch, fmt)
    model = Transformer.from_pretrained(path, dtype=dtype, device="cpu" if fmt == "int8" else args.device)
    if fmt == "int8":
        quantize_int8(model)
        model.to(args.device)
    return for_inference(model)  # as load_for_inference marks what chat and serve load


def read_bytes(model):
    """Bytes a decode step reads in full: every parameter and buffer once, except an input embedding
    that is not also the output head (a step reads one row of it per token)."""
    head = getattr(model.lm_head, "weight", None)
    skip = None if model.embed_tokens.weight is head else model.embed_tokens.weight
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def same_prefix(toks, ref):
    """Share of ref's tokens matched by toks, each row counted up to its first difference."""
    same = 0
    for a, b in zip(toks, ref):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / sum(map(len, ref))


def eval_prompts(model_dir):
    """A function B -> the first B questions of data/eval_questions.json, each in the checkpoint's
    chat template (as chat and serve would send them): real text for a trained model, whose greedy
    tokens have real margins, unlike random ids on random weights."""
    from nanohuatuo.templates import render_prompt, tokenizer_and_template
    tok, template = tokenizer_and_template(model_dir, None, "auto")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "data", "eval_questions.json"), encoding="utf-8") as f:
        questions = [q["query"] for q in json.load(f)]
    return lambda B, V: [render_prompt([{"role": "user", "content": q}], tok, template) for q in questions[:B]]


def random_prompts(args):
    return lambda B, V: torch.randint(0, V, (B, args.prompt_len), generator=torch.Generator().manual_seed(B)).tolist()


def weight_formats(size, path, args, bar, rows, prompts_for=None):
    """(e): the engine's greedy decode of table (a) with the weights in each of args.weights (the
    prompts of (a), or prompts_for(B, vocabulary size)), eagerly and, with --compile, compiled. The
    model is loaded again for each batch size B and tuned as an engine of B slots tunes it, as chat
    (one slot) and serve would run it: batch 1 then gets the one-slot choices (eagerly the compiler's
    reduction called alone, `cpu_reduction.eager_alone`; compiled, read in the step's graph). Same
    tokens: against float32's eager greedy tokens."""
    n_new = args.new_tokens
    prompts_for = prompts_for or random_prompts(args)
    prompts, ref, params = {}, {}, None
    # float32 eagerly first (the reference, timed only if asked for), then each format asked for compiled
    runs = [(False, f) for f in ["float32"] + [f for f in args.weights if f != "float32"]]
    for compile, fmt in runs + ([(True, f) for f in args.weights] if args.compile else []):
        for B in args.batch_sizes:
            model = None  # the last batch size's model freed before the next is loaded
            model = load_format(path, fmt, args)
            tune_cpu_kernels(model, batches=(1, B), compiled=compile)
            if args.device == "cpu":
                print(f"{size} {fmt} batch {B}{' compiled' if compile else ''}: CPU kernels measured at load: "
                      f"{model.cpu_kernels}", flush=True)
            nbytes = read_bytes(model)
            params = params or model.num_params()  # float32's count: int8 weights are buffers, not parameters
            if B not in prompts:
                prompts[B] = prompts_for(B, model.config.vocab_size)
            run = lambda: generate(model, prompts[B], max_new_tokens=n_new, compile=compile)  # noqa: E731
            toks = run()  # (compiled: compiles here)
            ref.setdefault(B, toks)  # float32 eager comes first
            if fmt not in args.weights:
                continue
            tok_s = B * n_new / time_it(run, args.device, args.repeats)
            row = dict(table="weights", size=size, compile=compile, params=params, device=args.device, weights=fmt,
                       act_dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."), batch=B,
                       new_tokens=n_new, prompt_len=max(map(len, prompts[B])), tok_s=tok_s, step_bytes=nbytes,
                       bw_share=nbytes * tok_s / B / bar(), same_as_float32=same_prefix(toks, ref[B]))
            rows.add(row)


def mixed(size, args, hf, ours, compile, rows):
    g = torch.Generator().manual_seed(1)
    n, (p0, p1), (n0, n1), S = args.mixed_requests, args.mixed_prompt, args.mixed_new, args.slots
    V = ours.config.vocab_size
    plens = torch.randint(p0, p1 + 1, (n,), generator=g).tolist()
    news = torch.randint(n0, n1 + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(0, V, (L,), generator=g).tolist() for L in plens]
    wanted = sum(news)

    def batched(fn):
        return lambda: [t[:m] for s in range(0, n, S) for t, m in zip(fn(prompts[s:s + S], max(news[s:s + S])),
                                                                      news[s:s + S])]

    runs = {"hf": batched(lambda ps, m: hf_generate(hf, ps, m, args.device)),
            "static": batched(lambda ps, m: static_generate(ours, ps, m, compile=compile)),
            "engine": lambda: engine_run(ours, prompts, news, S, compile, max_len=max_len)}
    if args.no_static:
        del runs["static"]
    warm = [p[:8 + i % 2] for i, p in enumerate(prompts[:S])]
    # every batch size the engine meets, rows at one position and at several (a compiled step's
    # graphs), on a cache of the timed run's shape: CUDA graphs are recorded per cache shape
    max_len = max(plens) + max(news)
    engine_run(ours, warm, list(range(1, len(warm) + 1)), S, compile, max_len=max_len)
    if "static" in runs:
        static_generate(ours, warm, 4, compile=compile)
    if ("mixed", size) in _hf_runs:  # timed once a size: the compiled round reuses the eager round's
        del runs["hf"]
    else:
        hf_generate(hf, warm, 4, args.device)
    row = dict(table="mixed", size=size, device=args.device, dtype=args.dtype, compile=compile, requests=n,
               slots=S, prompt=args.mixed_prompt, new=args.mixed_new, tokens=wanted)
    toks = {}
    for k, f in runs.items():
        sync(args.device)
        t = time.perf_counter()
        toks[k] = f()
        sync(args.device)
        row[f"{k}_tok_s"] = wanted / (time.perf_counter() - t)
    if "hf" in runs:
        _hf_runs["mixed", size] = toks.pop("hf"), row.pop("hf_tok_s")
    ref, row["hf_tok_s"] = _hf_runs["mixed", size]
    row["same_tokens"] = {k: toks[k] == ref for k in toks}
    row["same_share"] = {k: same_prefix(toks[k], ref) for k in toks}
    rows.add(row)


def prefix_reuse(size, args, ours, compile, rows):
    g = torch.Generator().manual_seed(2)
    (p0, p1), V, K = args.k_prompt_len, ours.config.vocab_size, args.k
    prompts = [torch.randint(0, V, (int(L),), generator=g).tolist()
               for L in torch.randint(p0, p1 + 1, (args.k_prompts,), generator=g)]
    news = [args.k_new_tokens] * len(prompts)
    copies = [p for p in prompts for _ in range(K)]
    engine_run(ours, [p[:8] for p in prompts], [4] * len(prompts), args.slots, compile, n=K, sample=True)  # warm-up
    row = dict(table="prefix", size=size, device=args.device, dtype=args.dtype, compile=compile,
               prompts=len(prompts), k=K, prompt_len=args.k_prompt_len, new_tokens=args.k_new_tokens,
               slots=args.slots)
    for name, fn in (("reuse", lambda: engine_run(ours, prompts, news, args.slots, compile, n=K, sample=True)),
                     ("separate", lambda: engine_run(ours, copies, news * K, args.slots, compile, sample=True))):
        sync(args.device)
        t = time.perf_counter()
        fn()
        sync(args.device)
        row[f"{name}_tok_s"] = K * sum(news) / (time.perf_counter() - t)
    rows.add(row)


def run_table(failed, name, fn, *a):
    """One table of one size: its time printed and, if it fails, the traceback printed, the failure
    added to `failed` and the run going on (a GPU lent for one run: a failing compiled table must
    not cost the eager ones)."""
    t = time.perf_counter()
    try:
        fn(*a)
    except Exception as e:
        traceback.print_exc()
        failed.append(f"{name}: {type(e).__name__}: {e}")
    print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)


def _tok_s(r, k):
    return f"{r[k + '_tok_s']:.1f}" if k + "_tok_s" in r else "-"


def _same(r):
    """yes, or no with the share of transformers' tokens matched (each row up to its first difference:
    in bfloat16 on a GPU, other kernels' rounding flips near-ties, which random weights are full of)."""
    def one(k):
        if k not in r["same_tokens"]:
            return "-"
        share = r.get("same_share", {}).get(k)
        return "yes" if r["same_tokens"][k] else "no" if share is None else f"no ({share:.0%})"
    return ", ".join(one(k) for k in ("static", "engine"))


def report(rows):
    def label(r):
        return f"{r['size']}{' compiled' if r.get('compile') else ''}"

    fixed = [r for r in rows if r["table"] == "fixed"]
    if fixed:
        print("\n(a) fixed length\n\n| model | batch | transformers tok/s | static tok/s | engine tok/s | "
              "engine / transformers | same tokens (static, engine) | "
              "bandwidth share (transformers / static / engine) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in fixed:
            bw = " / ".join(f"{r[k + '_bw_share']:.0%}" if k + "_bw_share" in r else "-"
                            for k in ("hf", "static", "engine")) if r["batch"] == 1 else ""
            print(f"| {label(r)} ({r['params'] / 1e6:.0f}M) | {r['batch']} | {r['hf_tok_s']:.1f} | "
                  f"{_tok_s(r, 'static')} | {r['engine_tok_s']:.1f} | {r['engine_tok_s'] / r['hf_tok_s']:.2f}x | "
                  f"{_same(r)} | {bw} |")
    mix = [r for r in rows if r["table"] == "mixed"]
    if mix:
        print("\n(b) mixed workload\n\n| model | requests / slots | tokens | transformers tok/s | static tok/s | "
              "engine tok/s | engine / static | engine / transformers | same tokens (static, engine) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in mix:
            vs_static = f"{r['engine_tok_s'] / r['static_tok_s']:.2f}x" if "static_tok_s" in r else "-"
            print(f"| {label(r)} | {r['requests']} / {r['slots']} | {r['tokens']} | {r['hf_tok_s']:.1f} | "
                  f"{_tok_s(r, 'static')} | {r['engine_tok_s']:.1f} | {vs_static} | "
                  f"{r['engine_tok_s'] / r['hf_tok_s']:.2f}x | {_same(r)} |")
    wf = [r for r in rows if r["table"] == "weights"]
    if wf:
        print("\n(e) weight formats (engine, greedy; the prompts of (a), or for --model the evaluation questions)"
              "\n\n| model | weights | activations | batch | tok/s | weight MB read per step | "
              "bandwidth share (of the matvec bandwidth) | same tokens as float32 greedy |")
        print("|---|---|---|---|---|---|---|---|")
        for r in wf:
            print(f"| {label(r)} ({r['params'] / 1e6:.0f}M) | {r['weights']} | {r['act_dtype']} | {r['batch']} | "
                  f"{r['tok_s']:.1f} | {r['step_bytes'] / 1e6:.1f} | {r['bw_share']:.0%} | {r['same_as_float32']:.0%} |")
    pre = [r for r in rows if r["table"] == "prefix"]
    if pre:
        print("\n(c) prefix reuse\n\n| model | prompts x k | prompt tokens | new tokens | separate tok/s | "
              "reuse tok/s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for r in pre:
            print(f"| {label(r)} | {r['prompts']} x {r['k']} | {r['prompt_len'][0]}-{r['prompt_len'][1]} | "
                  f"{r['new_tokens']} | {r['separate_tok_s']:.1f} | {r['reuse_tok_s']:.1f} | "
                  f"{r['reuse_tok_s'] / r['separate_tok_s']:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sizes", nargs="*", default=["100M", "500M"], choices=list(SIZES),
                    help="random-weight models (none: only --model)")
    ap.add_argument("--model", default=None,
                    help="also table (e) on this checkpoint (Hugging Face layout), prompts from data/eval_questions.json")
    ap.add_argument("--tables", nargs="+", default=["fixed", "mixed", "prefix"], choices=["fixed", "mixed", "prefix"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="(a) batch sizes")
    ap.add_argument("--new-tokens", type=int, default=64, help="(a) new tokens per row")
    ap.add_argument("--prompt-len", type=int, default=32, help="(a) prompt tokens per row")
    ap.add_argument("--repeats", type=int, default=2, help="(a) timed runs after a warm-up; the best counts")
    ap.add_argument("--mixed-requests", type=int, default=64, help="(b) requests")
    ap.add_argument("--mixed-prompt", type=int, nargs=2, default=[16, 256], help="(b) prompt length range")
    ap.add_argument("--mixed-new", type=int, nargs=2, default=[8, 256], help="(b) new-token range")
    ap.add_argument("--slots", type=int, default=16, help="(b, c) engine slots and static/transformers batch size")
    ap.add_argument("--no-static", action="store_true", help="(a, b) leave the static path out (a shorter run)")
    ap.add_argument("--k", type=int, default=4, help="(c) samples per prompt")
    ap.add_argument("--k-prompts", type=int, default=16, help="(c) prompts")
    ap.add_argument("--k-prompt-len", type=int, nargs=2, default=[128, 256], help="(c) prompt length range")
    ap.add_argument("--k-new-tokens", type=int, default=32, help="(c) new tokens per sample")
    ap.add_argument("--compile", action="store_true",
                    help="every table again with the decode step compiled (CUDA graphs on CUDA; on CPU the "
                         "element-wise ops between the products fused)")
    ap.add_argument("--weights", nargs="*", default=None, choices=list(WEIGHT_FORMATS),
                    help="(e) weight formats to time with table (a) (default: all three on CPU, none on CUDA)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nanohuatuo-bench"))
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.weights is None:
        args.weights = [] if args.device.startswith("cuda") else list(WEIGHT_FORMATS)
    import transformers as tf
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    modes = [False, True] if args.compile else [False]
    read = matvec_reader(args.device, dtype)
    bandwidth = matvec_bandwidth(args.device, dtype, read=read)

    def bar():
        """The bandwidth measured again next to a timing, or the start's if that was higher: on a
        shared machine it drifts (a 500M step once read 135% of a bar measured low at the start), and
        a share should never flatter."""
        return max(bandwidth, read(20))
    print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else cpu_name()}), threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, transformers {tf.__version__}, "
          f"matvec bandwidth {bandwidth / 1e9:.1f} GB/s"
          + (", CUDA graphs the engine's own (NANOHUATUO_CUDA_GRAPHS=manual)"
             if cuda and args.compile and os.environ.get("NANOHUATUO_CUDA_GRAPHS") == "manual" else "")
          + ("" if cuda else f", huge pages for tensors of 2 MB or more (THP_MEM_ALLOC_ENABLE) "
             f"{'on' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else 'off'}"), flush=True)
    rows = Rows(args.out, bandwidth)
    failed = []
    table = functools.partial(run_table, failed)
    for size in args.sizes:
        path = build(size, args.workdir, dtype, args.device)
        hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        ours = None
        for compile in modes:
            name = f"{size}{' compiled' if compile else ''}"
            if ours is None or not cuda:
                # on CPU loaded and tuned again for the compiled round: its batch-1 graph may read some
                # matrices with the compiler's own loops, a choice that can change their layout (on
                # CUDA nothing is tuned, and the model is loaded once)
                ours = None  # the eager round's model freed before the next is loaded
                ours = for_inference(Transformer.from_pretrained(path, dtype=dtype, device=args.device))
                tune_cpu_kernels(ours, batches=sorted({1, args.slots, *args.batch_sizes}), compiled=compile)
                if not cuda:
                    print(f"{name}: CPU kernels measured at load: {ours.cpu_kernels}", flush=True)
            if "fixed" in args.tables:
                table(f"(a) {name}", fixed_length, size, args, hf, ours, bar, compile, rows)
            if "mixed" in args.tables:
                table(f"(b) {name}", mixed, size, args, hf, ours, compile, rows)
            if "prefix" in args.tables:
                table(f"(c) {name}", prefix_reuse, size, args, ours, compile, rows)
        del hf, ours
        if "fixed" in args.tables and args.weights:
            table(f"(e) {size}", weight_formats, size, path, args, bar, rows)
    if args.model:  # (e) on a real checkpoint, with real questions
        table(f"(e) {args.model}", lambda: weight_formats(os.path.basename(os.path.normpath(args.model)),
                                                          args.model, args, bar, rows, eval_prompts(args.model)))
    report(rows)
    if failed:
        print("\nfailed:\n" + "\n".join(failed), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
