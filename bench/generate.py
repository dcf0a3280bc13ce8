"""Benchmark: generation tokens/s of nanohuatuo against transformers' generate on the same weights.

Builds Qwen2-shaped models with random weights (about 100M and 500M parameters), saves them in the
Hugging Face layout, then times greedy generation of the same prompts for both engines at batch 1
and batch 8, in one run. At batch 1 it also reports the share of the memory-bandwidth limit
reached: weight bytes x tokens/s over the bandwidth this machine reaches in a large
matrix-vector product.

    python bench/generate.py                       # CPU, float32
    python bench/generate.py --device cuda --dtype bfloat16 --compile
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanohuatuo import Transformer  # noqa: E402
from nanohuatuo.generate import generate  # noqa: E402

SIZES = {
    # Qwen2.5-0.5B's shape, and a narrower, shallower one with the same vocabulary
    "100M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2),
    "500M": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(size, workdir, dtype):
    import transformers as tf
    path = os.path.join(workdir, f"qwen2-{size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        cfg = tf.Qwen2Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
                             **SIZES[size])
        tf.Qwen2ForCausalLM(cfg).to(dtype).save_pretrained(path)
    return path


def matvec_bandwidth(device, dtype, mbytes=512, reps=20):
    """Bytes/s read by a large matrix-vector product (the decode step's dominant operation)."""
    esize = torch.finfo(dtype).bits // 8
    n = int((mbytes * 2**20 / esize) ** 0.5)
    W = torch.randn(n, n, device=device).to(dtype)
    x = torch.randn(1, n, device=device).to(dtype)
    best = 0.0
    for w in (W, W.t().contiguous().t()):  # both layouts: the kernels differ, take the faster
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        sync(device)
        best = max(best, reps * W.numel() * esize / (time.perf_counter() - t))
    return best


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


def bench_size(size, args, bandwidth, rows):
    import transformers as tf
    dtype = getattr(torch, args.dtype)
    path = build(size, args.workdir, dtype)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    ours = Transformer.from_pretrained(path, dtype=dtype, device=args.device)
    n_params = ours.num_params()
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    n_new = args.new_tokens
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, 151936, (B, args.prompt_len), generator=g)
        ids = prompts.to(args.device)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                   min_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None)

        plist = prompts.tolist()

        def run_ours():
            return generate(ours, plist, max_new_tokens=n_new, compile=args.compile)

        same = run_hf()[:, args.prompt_len:].tolist() == run_ours()
        t_hf = time_it(run_hf, args.device, args.repeats)
        t_ours = time_it(run_ours, args.device, args.repeats)
        row = dict(size=size, params=n_params, device=args.device, dtype=args.dtype, batch=B,
                   new_tokens=n_new, prompt_len=args.prompt_len, compile=args.compile,
                   hf_tok_s=B * n_new / t_hf, ours_tok_s=B * n_new / t_ours, speedup=t_hf / t_ours,
                   same_tokens=same)
        if B == 1:
            row["hf_bw_share"] = weight_bytes * row["hf_tok_s"] / bandwidth
            row["ours_bw_share"] = weight_bytes * row["ours_tok_s"] / bandwidth
        rows.append(row)
        print(json.dumps(row), flush=True)
    del hf, ours


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sizes", nargs="+", default=["100M", "500M"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nanohuatuo-bench"))
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    bandwidth = matvec_bandwidth(args.device, dtype)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}),"
          f" threads {torch.get_num_threads()}, matvec bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for size in args.sizes:
        bench_size(size, args, bandwidth, rows)
    print("\n| model | batch | transformers tok/s | nanohuatuo tok/s | ratio | bandwidth share (hf / ours) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        bw = f"{r['hf_bw_share']:.0%} / {r['ours_bw_share']:.0%}" if "hf_bw_share" in r else ""
        print(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['batch']} | {r['hf_tok_s']:.1f} | "
              f"{r['ours_tok_s']:.1f} | {r['speedup']:.2f}x | {bw} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(bandwidth=bandwidth, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
