"""Profile: where the engine's decode step spends its time, against the memory-bandwidth floor.

Builds the Qwen2-shaped "100M" model of bench/generate.py (hidden 512, 8 layers, 8 heads / 2 KV
heads, vocabulary 151,936 tied; or with --size 500M, Qwen2.5-0.5B's shape) with random weights
(no transformers needed), and for each batch size fills an Engine with that many greedy requests
(32-token prompts), then times `--steps` decode steps (`Engine.step`) after a warm-up. Printed
per batch size:

- the step's wall time, and the floor: the bytes a step reads (every weight once) over the
  bandwidth this machine reaches in a large float32 matrix-vector product, measured in the same
  run (bench/generate.py's measure; also for bfloat16 weights: bytes are bytes);
- the same share paired (`--pairs` rounds: 10 steps, then one round of the bandwidth measure, each
  round's steps over its own bandwidth; the median and range), since the bandwidth of a shared
  machine drifts between the measure at the start and the steps timed later;
- a breakdown of the step's wall time: embedding/positions/mask (before the first block), each
  block, the final norm, the output head, and the rest of the step (sampling, the repetition
  penalty's bookkeeping, stop checks, events), from timers around those calls;
- on CPU, the step split in two (in the same rounds, 10 more steps with every measured product
  returning a zeroed output of its shape without reading its weight): the time outside the
  products, and what is left, the products' time, as a read rate of the step's weight bytes
  against the bandwidth measured next to it. A step short of the bandwidth is then either work
  outside the products or products reading slower than the large matrix-vector product of the bar.
  Compiled at batch 1, the matrices the graph reads with its own loops (cpu_kernels' "reduce") can't
  be taken out: they count as outside;
- on CPU, the products alone (in the same rounds): the step's opaque products, recorded in its
  order with their inputs, replayed back to back 10 times: their read rate with nothing between
  them, in all and by matrix (q|k|v, o, gate|up, down, the head). Against the split's rate it
  shows what the work between the products costs them; by matrix, which shapes read slowly
  (small matrices pay each call's start);
- torch.profiler's ops by self CPU time (the top --top), after the matrix products' sum (oneDNN's
  linear, mm, addmm) and share.

With --compile the step is the engine's compiled one (on CUDA, CUDA graphs; the blocks can't be
timed one by one inside it): the breakdown is the compiled call (synchronised on CUDA) and the rest
of the step, and Dynamo's guard check before each call is timed on its own (torch.profiler's
"TorchDynamo Cache Lookup" row overstates it several times). With --device cuda the bandwidth is
the GPU's in --dtype, and torch.profiler also gives the GPU's kernel time a step: a step far
longer than that is the host's (launches, guards, the inputs' and the new tokens' copies), not
the GPU's. Eager on CUDA, a block's time is the host's
time to launch its kernels; the GPU's wait shows in the rest of the step (the new tokens' copy).
With NANOHUATUO_CUDA_GRAPHS=manual the compiled CUDA step replays the engine's own graphs
(engine_runner.GraphedDecode, no guards checked): the compiled call is that replay.

    python bench/decode_profile.py                       # 100M, batch 1 8 16, float32, 2 threads
    python bench/decode_profile.py --infer               # as chat, serve and evaluation load it (packed)
    python bench/decode_profile.py --batches 1 --steps 50 --top 25
    python bench/decode_profile.py --size 500M --batches 1 8
    python bench/decode_profile.py --dtype bfloat16 --infer      # bfloat16 as chat and serve load it
    python bench/decode_profile.py --lora 16                     # unmerged LoRA, as PPO/GRPO rollouts decode
    python bench/decode_profile.py --compile --batches 1         # the compiled CPU step
    python bench/decode_profile.py --device cuda --dtype bfloat16 --size 500M --batches 1 8 --compile
    NANOHUATUO_CUDA_GRAPHS=manual python bench/decode_profile.py --device cuda --dtype bfloat16 --size 500M --batches 1 8 --compile

On a machine shared with other work the absolute times drift: read the shares, and compare code
changes A/B (old and new interleaved, same weights and threads), not against another day's run.
"""

import argparse
import inspect
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanohuatuo import engine as engine_mod, engine_runner  # noqa: E402
from nanohuatuo.cpu_kernels import FusedLinear, KernelLinear, tune_cpu_kernels  # noqa: E402
from nanohuatuo.engine import Engine, SamplingParams  # noqa: E402
from nanohuatuo.generate import for_inference  # noqa: E402
from nanohuatuo.hf import ModelConfig  # noqa: E402
from nanohuatuo.lora import apply_lora, default_targets, lora_parameters  # noqa: E402
from nanohuatuo.model import Transformer  # noqa: E402
from generate import SIZES, matvec_bandwidth, matvec_reader, read_bytes, sync  # noqa: E402  (bench/generate.py: the same shapes and measure)


def qwen2_model(size, dtype, seed):
    """bench/generate.py's Qwen2-shaped "100M", "500M" (Qwen2.5-0.5B's shape) or "1.5B" with random weights."""
    g = SIZES[size]
    c = ModelConfig(arch="qwen2", vocab_size=151936, dim=g["hidden_size"], n_layers=g["num_hidden_layers"],
                    n_heads=g["num_attention_heads"], n_kv_heads=g["num_key_value_heads"],
                    ffn_dim=g["intermediate_size"], qkv_bias=True, tie_embeddings=True, norm_eps=1e-6,
                    max_seq_len=4096)
    m = Transformer(c)
    m.init_weights(seed=seed)
    return m.to(dtype).eval()


class Timers:
    """Wall time per label, from hooks on the blocks and wrappers around the runner's calls."""

    def __init__(self):
        self.t = {}
        self.mark = None

    def add(self, label, dt):
        self.t[label] = self.t.get(label, 0.0) + dt


def instrument(model, timers):
    """Hooks that split the decode step; returns a function that removes them."""
    handles, saved = [], {}

    def pre(label):
        def hook(*_):
            now = time.perf_counter()
            if timers.mark is not None:  # from the previous mark to here: what came before this module
                timers.add(label[1], now - timers.mark)
            timers.mark = now
        return hook

    def post(label):
        def hook(*_):
            now = time.perf_counter()
            timers.add(label, now - timers.mark)
            timers.mark = now
        return hook

    first = ("", "embed, positions, mask")
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(pre(first if i == 0 else ("", "between blocks"))))
        handles.append(layer.register_forward_hook(post(f"block {i}")))
    handles.append(model.norm.register_forward_pre_hook(pre(("", "between blocks"))))
    handles.append(model.norm.register_forward_hook(post("final norm")))

    def wrap(name, label):
        fn = saved[name] = getattr(engine_runner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            if label == "forward":
                timers.mark = t
            out = fn(*a, **k)
            if label == "head":
                timers.add("head", time.perf_counter() - t)
            return out
        setattr(engine_runner, name, timed)

    wrap("forward", "forward")
    wrap("head_logits", "head")

    def undo():
        for h in handles:
            h.remove()
        for name, fn in saved.items():
            setattr(engine_runner, name, fn)
    return undo


def filled_engine(model, B, prompt_len, new_tokens, seed, compile=False):
    eng = Engine(model, slots=B, max_len=prompt_len + new_tokens + 8, compile=compile)
    g = torch.Generator().manual_seed(seed + B)
    for _ in range(B):
        eng.add(torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist(),
                SamplingParams(max_new_tokens=new_tokens))
    eng.step()  # prefill and the first decode step
    return eng


PRODUCTS = {"mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::_weight_int8pack_mm"}


def compiled_call_timed(timers, device):
    """The engine's compiled step (or its replay of its own CUDA graphs, NANOHUATUO_CUDA_GRAPHS=manual)
    with its wall time (synchronised on CUDA) added to `timers`; device: "cpu", "cuda", ...
    (bench/generate.py's sync)."""
    real, replay = engine_mod.compiled_decode, engine_runner.GraphedDecode.__call__

    def timing(step):
        def timed(*args):
            sync(device)
            t = time.perf_counter()
            out = step(*args)
            sync(device)
            timers.add("compiled call (synchronised)", time.perf_counter() - t)
            return out
        return timed
    engine_mod.compiled_decode = lambda *a: timing(real(*a))
    engine_runner.GraphedDecode.__call__ = timing(replay)

    def undo():
        engine_mod.compiled_decode, engine_runner.GraphedDecode.__call__ = real, replay
    return undo


def guard_check_seconds(eng, n=1000):
    """Seconds Dynamo's guards take before one compiled decode call of `eng`: the guard checks of
    the graphs compiled for `decode_logits`, in the order Dynamo tries them up to the one that
    passes, on one step's own arguments and in its own state, timed alone `n` times during that
    step (torch.profiler's "TorchDynamo Cache Lookup" row shows several times more). None where no
    graph passes (the step compiled a new one)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    real, seen = engine_mod.compiled_decode, []

    def compiled_decode(*a):
        step = real(*a)

        def checked(*args):
            bound = inspect.signature(engine_runner.decode_logits).bind(*args)
            bound.apply_defaults()
            checks = []
            for entry in _debug_get_cache_entry_list(engine_runner.decode_logits.__code__):
                checks.append(entry.guard_manager.check)
                if checks[-1](bound.arguments):
                    t = time.perf_counter()
                    for _ in range(n):
                        for check in checks:
                            check(bound.arguments)
                    seen.append((time.perf_counter() - t) / n)
                    break
            return step(*args)
        return checked
    engine_mod.compiled_decode = compiled_decode
    try:
        eng.step()
    finally:
        engine_mod.compiled_decode = real
    return seen[0] if seen else None


def products_patched(kernel_linear, fused_product):
    """Every measured CPU product (a KernelLinear, a fused q|k|v or gate|up matrix: the tuned model's
    projections and head, eager or as a compiled step's opaque op, which calls these at run time)
    through kernel_linear(forward, self, x) and fused_product(product, self, x, parts), given the
    real methods; tracing a compiled step still gets the real forward (the op into the graph).
    Returns a function that restores them."""
    forward, product = KernelLinear.forward, FusedLinear.product
    KernelLinear.forward = lambda self, x: forward(self, x) if torch.compiler.is_compiling() \
        else kernel_linear(forward, self, x)
    FusedLinear.product = lambda self, x, parts: fused_product(product, self, x, parts)

    def undo():
        KernelLinear.forward, FusedLinear.product = forward, product
    return undo


def without_weight_reads():
    """Make every measured CPU product return a zeroed output of its shape instead of reading its
    weight (`products_patched`); returns a function that restores them. Writing the zeros stands in
    for the product writing its output. A product left a plain nn.Linear (F.linear chosen at every
    batch size) still reads; `measured_bytes` says how many bytes are covered."""
    return products_patched(lambda _, self, x: x.new_zeros((*x.shape[:-1], self.out_features)),
                            lambda _, self, x, parts: x.new_zeros((*x.shape[:-1], sum(self.sizes))))


def measured_bytes(model, reduced=False):
    """The weight bytes `without_weight_reads` takes out of a step: the KernelLinear and fused matrices',
    with `reduced` (a compiled batch-1 step) but those its graph reads with its own loops (`reduce`)."""
    seen = {}
    for m in model.modules():
        if type(m) is KernelLinear and not (reduced and m.reduce):
            seen[id(m.weight)] = m.weight
        fused = getattr(m, "fused", None)  # an attention's q|k|v, an MLP's gate|up
        if isinstance(fused, FusedLinear) and not (reduced and fused.reduce):
            seen[id(fused.weight)] = fused.weight
    return sum(w.nbytes for w in seen.values())


def median_step(eng, n=10):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def recorded_products(model, eng):
    """[(label, weight bytes, call)]: the measured products (KernelLinear, a fused matrix) one decode step of `eng`
    makes, in its order, each call that product again on a copy of the input it had (eager, or from
    a compiled step's opaque ops). Replayed back to back they are the step's weight reads without
    anything between them: the products alone."""
    names = {id(c): name.removesuffix("_proj") for m in model.modules() for name, c in m.named_children()}
    calls = []

    def kernel_linear(forward, self, x):
        calls.append((names.get(id(self), "?"), self.weight.nbytes, lambda m=self, x=x.clone(): forward(m, x)))
        return forward(self, x)

    def fused_product(product, self, x, parts):
        label = "|".join(names.get(id(m), "?") for m in parts)
        calls.append((label, self.weight.nbytes, lambda m=self, x=x.clone(), p=parts: product(m, x, p)))
        return product(self, x, parts)

    undo = products_patched(kernel_linear, fused_product)
    try:
        eng.step()
    finally:
        undo()
    return calls


def replay(calls, n=10):
    """{label: seconds}: the calls back to back, `n` times; per label the median replay's sum."""
    times = {}
    for _ in range(n):
        once = {}
        for label, _, call in calls:
            t = time.perf_counter()
            call()
            once[label] = once.get(label, 0.0) + time.perf_counter() - t
        for label, dt in once.items():
            times.setdefault(label, []).append(dt)
    return {label: statistics.median(ts) for label, ts in times.items()}


def paired_rounds(eng, read, rounds, split=False, calls=None):
    """[(step, step without the products' weight reads or None, bandwidth, products alone or None)]:
    `rounds` rounds of 10 steps (their median), with `split` 10 more with `without_weight_reads`, with
    `calls` (`recorded_products`) those products replayed alone 10 times ({label: seconds}), then one
    round of the matrix-vector measure. This machine's bandwidth drifts between runs and within one
    (20-56 GB/s), so a bar measured once at the start (the best of 3 rounds) and a median step taken
    later compare two different moments; a round compares one."""
    out = []
    for _ in range(rounds):
        step, free = median_step(eng), None
        if split:
            undo = without_weight_reads()
            try:
                free = median_step(eng)
            finally:
                undo()
        with torch.inference_mode():
            alone = replay(calls) if calls else None
        out.append((step, free, read(10), alone))
    return out


def print_split(split, nbytes, covered):
    """The split's medians; `covered` of the step's `nbytes` are the products taken out (the rest,
    plain F.linear products or, in a compiled batch-1 step, those its graph reads with its own
    loops, is read in both kinds of step and counts as outside)."""
    step, free, bw = (statistics.median(r[i] for r in split) for i in range(3))
    head = (f"  split ({len(split)} rounds of 10 steps as they are, 10 without the products' weight reads, one "
            f"bandwidth round): ")
    if covered == 0:
        print(head + "no product of this step could be taken out (all read inside a compiled graph)")
        return
    rates = [covered / (s - f) / b for s, f, b, _ in split]
    print(head + f"outside the products {free * 1e3:.2f} ms ({free / step:.0%} of a {step * 1e3:.2f} ms step); the "
          f"products {(step - free) * 1e3:.2f} ms, {covered / 1e6:.0f} MB at {covered / (step - free) / 1e9:.1f} GB/s "
          f"against {bw / 1e9:.1f} GB/s: {statistics.median(rates):.0%} of the bandwidth (median; "
          f"{min(rates):.0%}-{max(rates):.0%})"
          + (f"; the step's other {(nbytes - covered) / 1e6:.0f} MB (plain F.linear products; in a compiled batch-1 "
             f"step, those its graph reads with its own loops) are read in both kinds of step, outside"
             if covered < nbytes * 0.99 else ""))


def print_alone(split, calls):
    """The products replayed alone (`replay`) against the same rounds' bandwidth: in all, and by matrix.
    Only opaque products are recorded: none of those a compiled batch-1 graph reads with its own loops."""
    if not calls:
        return
    sizes = {}
    for label, size, _ in calls:
        n, b = sizes.get(label, (0, 0))
        sizes[label] = n + 1, b + size
    total = sum(b for _, b in sizes.values())
    alone = [sum(a.values()) for *_, a in split]
    rates = [total / t / bw for t, (_, _, bw, _) in zip(alone, split)]
    print(f"  the products alone ({len(calls)} of a step, replayed back to back 10 times a round, "
          f"{total / 1e6:.0f} MB): {statistics.median(alone) * 1e3:.2f} ms, {statistics.median(rates):.0%} of the "
          f"bandwidth (median; {min(rates):.0%}-{max(rates):.0%}); by matrix, share of the bandwidth (median; range) "
          f"and of the products' time:")
    for label, (n, b) in sizes.items():
        shares = [b / a[label] / bw for _, _, bw, a in split]
        part = statistics.median(a[label] / sum(a.values()) for *_, a in split)
        print(f"    {label:12s} {n:3d} x {b / n / 1e6:7.2f} MB  {statistics.median(shares):4.0%} "
              f"({min(shares):.0%}-{max(shares):.0%})  {part:4.0%} of the time")


def profile_batch(model, B, args, floor_s, nbytes, read):
    eng = filled_engine(model, B, args.prompt_len, 3 * args.steps + 20 * args.pairs + 16, args.seed, args.compile)
    for _ in range(3):  # on CUDA with --compile, the graph of this batch size recorded here
        eng.step()
    step = median_step(eng, args.steps)
    device = model.embed_tokens.weight.device
    print(f"\n== batch {B}: step {step * 1e3:.1f} ms median of {args.steps} ({B / step:.1f} tok/s); "
          f"floor {floor_s * 1e3:.1f} ms (weights over bandwidth) = {floor_s / step:.0%} of the step")
    if args.pairs:
        calls = recorded_products(model, eng) if device.type == "cpu" else None
        rounds = paired_rounds(eng, read, args.pairs, split=device.type == "cpu", calls=calls)
        shares = [nbytes / step / bw for step, _, bw, _ in rounds]
        print(f"  paired with the bandwidth measured next to it ({args.pairs} rounds of 10 steps and one "
              f"matrix-vector round): the step reads {statistics.median(shares):.0%} of the bandwidth "
              f"(median; {min(shares):.0%}-{max(shares):.0%})")
        if device.type == "cpu":
            print_split(rounds, nbytes, measured_bytes(model, reduced=args.compile and B == 1))
            print_alone(rounds, calls)

    timers = Timers()
    undo = compiled_call_timed(timers, device.type) if args.compile else instrument(model, timers)
    total = 0.0
    try:
        for _ in range(args.steps):
            t = time.perf_counter()
            eng.step()
            total += time.perf_counter() - t
    finally:
        undo()
    parts = dict(timers.t)
    parts["rest of the step (sampling, bookkeeping)"] = total - sum(parts.values())
    print(f"  breakdown (timed, {total / args.steps * 1e3:.1f} ms a step):")
    for label, s in parts.items():
        print(f"    {label:44s} {s / args.steps * 1e3:7.2f} ms  {s / total:6.1%}")
    if args.compile and eng.graphed is not None:
        print("  Dynamo's guard check: none, the engine replays CUDA graphs of its own (NANOHUATUO_CUDA_GRAPHS=manual)")
    elif args.compile:
        guards = guard_check_seconds(eng)
        print("  Dynamo's guard check before each compiled call, timed alone: "
              + (f"{guards * 1e6:.0f} us" if guards is not None else "no compiled graph passed"))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            eng.step()
    averages = prof.key_averages()
    if device.type == "cuda":  # the kernels' own time (a graph's kernels too): what the GPU was busy for;
        # only the device's events, as the table's own total counts them: a CPU range around a graph
        # replay (the compiled call's "## Call CompiledFxGraph" row) carries its kernels' time as well
        busy = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"  GPU kernel time: {busy / args.steps / 1e3:.2f} ms of the {step * 1e3:.2f} ms step; the "
              f"difference is the GPU waiting on the host")
    products = sum(e.self_cpu_time_total for e in averages if e.key in PRODUCTS)
    everything = sum(e.self_cpu_time_total for e in averages)
    print(f"  matrix products (oneDNN's linear, mm, addmm, int8 mm): {products / args.steps / 1e3:.2f} ms a step, "
          f"{products / everything:.0%} of the ops' self CPU time")
    print(f"  torch.profiler, ops by self CPU time (top {args.top}):")
    table = averages.table(sort_by="self_cpu_time_total", row_limit=args.top)
    print("\n".join("    " + line for line in table.splitlines()))
    if device.type == "cuda":
        print(f"  torch.profiler, by GPU time (top {args.top}):")
        table = averages.table(sort_by="self_device_time_total", row_limit=args.top)
        print("\n".join("    " + line for line in table.splitlines()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100M", choices=["100M", "500M", "1.5B"], help="model shape (default: 100M)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--compile", action="store_true",
                    help="the engine's compiled decode step (CUDA graphs on CUDA); the breakdown is then the "
                         "compiled call and the rest of the step")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16], help="batch sizes to profile (default: 1 8 16)")
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed per batch size (default: 30)")
    ap.add_argument("--prompt-len", type=int, default=32, help="tokens in every prompt (default: 32)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype (default: float32)")
    ap.add_argument("--infer", action="store_true",
                    help="mark the model inference_only, as chat and serve load it (weights may be packed in place)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--top", type=int, default=15, help="ops listed from torch.profiler (default: 15)")
    ap.add_argument("--pairs", type=int, default=5,
                    help="rounds of 10 steps each followed by a bandwidth measure, for the paired share (default: 5; 0: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default: 0)")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="wrap every attention and MLP projection in a rank-R LoRA adapter (random, non-zero), "
                         "unmerged, as the PPO/GRPO policy decodes its rollouts (default: 0, none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    model = qwen2_model(args.size, dtype, args.seed).to(device)
    if args.lora:
        apply_lora(model, r=args.lora, alpha=2 * args.lora, dropout=0.0, targets=default_targets(model))
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():  # a trained adapter: B no longer zero
            for p in lora_parameters(model):
                p.normal_(0, 0.01, generator=g)
    if args.infer:
        for_inference(model)
    # bytes per second of memory, on CPU measured in float32 (bench/generate.py's (e) does the same): a
    # bfloat16 matrix-vector product that reads slower than that is the kernel's shortfall, not the memory's
    bar_dtype = dtype if device.type == "cuda" else torch.float32
    read = matvec_reader(args.device, bar_dtype)
    bw = matvec_bandwidth(args.device, bar_dtype, read=read)
    nbytes = read_bytes(model)
    tune_cpu_kernels(model, batches=(1, *args.batches), compiled=args.compile)  # as an Engine with max(batches) slots would
    print(f"{args.size} ({model.num_params() / 1e6:.0f}M params, {nbytes / 1e6:.0f} MB a step), {args.dtype}, "
          f"{f'LoRA r={args.lora} unmerged, ' if args.lora else ''}"
          f"{'compiled, ' if args.compile else ''}{args.device}, {args.threads} threads, "
          f"matrix-vector bandwidth {bw / 1e9:.1f} GB/s ({str(bar_dtype).removeprefix('torch.')})")
    for B in args.batches:
        profile_batch(model, B, args, nbytes / bw, nbytes, read)
    if device.type == "cpu":
        print(f"\nCPU kernels chosen at load: {model.cpu_kernels}")


if __name__ == "__main__":
    main()
