"""Benchmark: serve.py's aggregate tokens/s with 1, 4 and 16 concurrent clients, and time to first token.

Builds a Qwen2-shaped model with random weights (the ~100M shape of bench/generate.py, with the
Qwen2 vocabulary) and a word-level tokenizer covering that vocabulary, starts `serve.py` on it in a
subprocess on a free loopback port, then for each number of clients C runs C threads, each sending
--requests streaming /v1/completions requests one after another: a --prompt-len token prompt
(random ids, different per request) and exactly --new-tokens answer tokens (greedy, ignore_eos).

Reported per C: aggregate tokens/s (all answer tokens / wall time of the round), time to first
token (request sent -> first text chunk; median and 90th percentile), and each client's own
decode rate. The clients are plain http.client readers, so they cost the server's CPU little.

    python bench/serve.py                                   # CPU, float32, ~100M
    python bench/serve.py --device cuda --dtype bfloat16 --clients 1 4 16 64 --slots 64
    python bench/serve.py --size tiny --new-tokens 8 --requests 1     # a few-second smoke run
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nanohuatuo.metrics import cpu_name  # noqa: E402
VOCAB = 151936  # Qwen2's
SIZES = {
    "100M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=VOCAB),
    "500M": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=VOCAB),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),  # for checking the script, not for numbers
}


def build(size, workdir):
    """A random Qwen2 model and a word-level tokenizer with one word per id, in the HF layout."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    path = os.path.join(workdir, f"serve-qwen2-{size}")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(tie_word_embeddings=True, max_position_embeddings=4096, **SIZES[size])
    tf.Qwen2ForCausalLM(cfg).save_pretrained(path)
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(4, SIZES[size]["vocab_size"])]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(words[:4])
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "add_bos_token": False}, f)
    return path


def start_server(path, args):
    """serve.py in a subprocess; returns (process, host, port) once it listens."""
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--model", path, "--port", "0", "--served-model-name", "bench",
           "--batch-size", str(args.slots), "--max-queue", str(4 * max(args.clients)), "--template", "plain",
           "--max-len", str(args.prompt_len + args.new_tokens + 8), "--device", args.device, "--dtype", args.dtype,
           "--no-log-requests"] + (["--compile"] if args.compile else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"serve.py did not start: {line!r} (exit code {proc.poll()})")
    return proc, m.group(1), int(m.group(2))


def one_request(host, port, prompt, new_tokens):
    """(seconds to first text, total seconds, answer tokens) of one streaming completion."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens = None, 0
    for line in resp:  # http.client undoes the chunked encoding
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if first is None and event["choices"] and event["choices"][0]["text"]:
            first = time.perf_counter() - t0
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    conn.close()
    return first, total, tokens


def run_round(host, port, clients, args, vocab, seed):
    """All clients at once, each sending args.requests requests back to back."""
    results, errors = [], []
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, vocab, (clients, args.requests, args.prompt_len), generator=gen).tolist()

    def client(c):
        try:
            for r in range(args.requests):
                results.append(one_request(host, port, prompts[c][r], args.new_tokens))
        except Exception as e:  # reported after the round; a thread's exception would be lost
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    decode = [(r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]]
    return dict(clients=clients, requests=len(results), tokens=tokens, wall_s=wall, tok_s=tokens / wall,
                ttft_median_s=statistics.median(ttft), ttft_p90_s=ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
                client_decode_tok_s=statistics.median(decode) if decode else float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100M", choices=sorted(SIZES))
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=3, help="requests per client in each round")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nanohuatuo-bench"))
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    path = build(args.size, args.workdir)
    proc, host, port = start_server(path, args)
    try:
        vocab = SIZES[args.size]["vocab_size"]
        one_request(host, port, list(range(4, 4 + args.prompt_len)), 4)  # warm-up (and compilation)
        rows = []
        for i, c in enumerate(args.clients):
            rows.append(run_round(host, port, c, args, vocab, seed=i))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"\n{args.size} Qwen2-shaped model, {args.device} ({device}, {os.cpu_count()} CPUs), {args.dtype}, "
          f"torch {torch.__version__}; {args.slots} slots, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, {args.requests} requests per client\n")
    print("| clients | aggregate tok/s | vs 1 client | time to first token, median / p90 | per-client tok/s |")
    print("|---|---|---|---|---|")
    base = rows[0]["tok_s"] if rows[0]["clients"] == 1 else None
    for r in rows:
        ratio = f"{r['tok_s'] / base:.1f}x" if base else ""
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {ratio} | {r['ttft_median_s'] * 1000:.0f} / "
              f"{r['ttft_p90_s'] * 1000:.0f} ms | {r['client_decode_tok_s']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(size=args.size, device=args.device, device_name=device, dtype=args.dtype,
                           torch=torch.__version__, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
