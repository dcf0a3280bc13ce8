"""A/B in one process: the engine's decode step with its matrices in oneDNN's packed layout against
the plain layouts (row- or column-major, each timed as `tune_cpu_kernels` does).

Two copies of bench/generate.py's Qwen2-shaped model (random weights, `for_inference`, as chat,
serve and evaluation load a model) are tuned in the same process, one allowed the plain layouts
only and one with every matrix packed, and each gets an Engine filled with `--batch` greedy
requests (32-token random prompts). Then `--rounds` rounds alternate between them, each timing 8
decode steps of one engine and then of the other (the order flipped every round), and the median
of the per-round ratios is printed. On a shared machine the same code's step time moves by tens of
percent from one process to the next (where its memory landed, the bandwidth of the moment), so
a change of a few percent is only visible this way, both sides in one process and interleaved.

    python bench/layout_ab.py --size 100M --batch 1
    python bench/layout_ab.py --size 500M --batch 8 --rounds 6
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nanohuatuo import cpu_kernels as ck  # noqa: E402
from nanohuatuo.engine import Engine, SamplingParams  # noqa: E402
from nanohuatuo.generate import for_inference  # noqa: E402
from decode_profile import qwen2_model  # noqa: E402  (bench/decode_profile.py: the same shapes)


def tuned_engine(size, batch, packed, seed):
    """An Engine over a fresh model whose layouts were timed among the plain ones only (packed
    False) or set to the packed layout for every matrix (packed True)."""
    model = for_inference(qwen2_model(size, torch.float32, seed))
    measure = ck._measure

    def choose(ws, batches, head, pack=False):
        if packed and pack:
            return "packed", {b: "onednn" for b in batches}
        return measure(ws, batches, head)  # the plain layouts only, timed
    ck._MEASURED.clear()
    ck._measure = choose
    try:
        ck.tune_cpu_kernels(model, batches=(1, batch) if batch > 1 else (1,))
    finally:
        ck._measure = measure
    eng = Engine(model, slots=batch)
    g = torch.Generator().manual_seed(seed)
    for _ in range(batch):
        eng.add(torch.randint(0, model.config.vocab_size, (32,), generator=g).tolist(),
                SamplingParams(max_new_tokens=1_000_000))
    return eng, model.cpu_kernels["layouts"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100M", choices=["100M", "500M"], help="model shape (default: 100M)")
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together (default: 1)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds of 8 steps each (default: 6)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default: 0)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = {}
    for name, packed in (("plain", False), ("packed", True)):
        engines[name], layouts = tuned_engine(args.size, args.batch, packed, args.seed)
        print(f"{name}: layouts {layouts}", flush=True)
    steps = {name: [] for name in engines}
    with torch.inference_mode():
        for eng in engines.values():
            for _ in range(3):  # prefill and warm-up
                eng.step()
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for name in order:
                times = []
                for _ in range(8):
                    t = time.perf_counter()
                    engines[name].step()
                    times.append(time.perf_counter() - t)
                steps[name].append(statistics.median(times) * 1e3)
    for name, ms in steps.items():
        print(f"{args.size} batch {args.batch} {name:6s} step " + " ".join(f"{x:.1f}" for x in ms)
              + f" ms, median {statistics.median(ms):.1f} ms")
    ratios = [a / b for a, b in zip(steps["plain"], steps["packed"])]
    print("plain / packed per round: " + " ".join(f"{x:.2f}" for x in ratios)
          + f", median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
