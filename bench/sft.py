"""Benchmark: one LoRA SFT step of nanohuatuo (sft.train_step) against transformers + peft, same model and batch.

A Qwen2-shaped model with random weights (about 100M parameters, bench/generate.py's "100M" shape,
vocabulary 151936, tied embeddings) is saved once in the Hugging Face layout. Each engine then runs
in a fresh subprocess: load the model, LoRA r=8 alpha=16 dropout 0 on every attention and MLP
projection, AdamW (weight decay 0.1 on matrices), the same batch of random tokens whose first
(1 - answer_frac) of each row is prompt (no loss), gradient clipping at 1.0; a few warm-up steps,
then timed steps. Reported: tokens/s (all tokens of the batch, prompt included, per second of
step), peak RSS (ru_maxrss of the subprocess) and RSS once the model is loaded, and the first
step's loss of each engine (the same weights give the same loss).

    python bench/sft.py                                   # CPU, float32, 4 x 256 tokens, answer 70% and 100%
    python bench/sft.py --device cuda --dtype bfloat16 --batch 8 --seq-len 1024
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# bench/generate.py's 100M shape: Qwen2.5-0.5B's vocabulary on a narrower, shallower trunk
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(workdir):
    import transformers as tf
    path = os.path.join(workdir, "qwen2-100M")  # the same directory bench/generate.py writes
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        cfg = tf.Qwen2Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096, **SHAPE)
        tf.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def make_batch(batch, seq_len, answer_frac, vocab=151936):
    """Random ids (B, T) and the mask of answer tokens (the last answer_frac of each row)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[:, seq_len - round(answer_frac * seq_len):] = True
    return ids, mask


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(args):
    """One engine in this (fresh) process; prints a JSON row."""
    from nanohuatuo import sft
    torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    ids, mask = make_batch(args.batch, args.seq_len, args.answer_frac)
    n_targets = int(mask[:, 1:].sum())
    autocast = lambda: torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    if args.engine == "ours":
        from nanohuatuo import Transformer
        from nanohuatuo.lora import apply_lora
        model = Transformer.from_pretrained(args.path, dtype=dtype, device=device)
        apply_lora(model, r=8, alpha=16, dropout=0.0, targets=TARGETS)
        model.train()
        wrapped = sft.SFTLoss(model)
        labels = torch.where(mask[:, 1:], ids[:, 1:], sft.IGNORE)  # labels[t] = ids[t+1] where trained
        labels = torch.cat([labels, torch.full((args.batch, 1), sft.IGNORE)], dim=1)
        d = sft.Dist(0, 1, torch.device(device))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(sft.param_groups(model, 0.1), lr=1e-4)

        def step():
            loss_sum, _ = sft.train_step(wrapped, optimizer, params, [(ids, labels)], n_targets, 1e-4, 1.0, d, autocast)
            return loss_sum / n_targets
    else:
        import transformers as tf
        from peft import LoraConfig, get_peft_model
        model = tf.AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype).to(device)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
        model.train()
        labels = torch.where(mask, ids, -100).to(device)  # transformers shifts labels itself
        ids_d = ids.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-4)

        def step():
            with autocast():
                loss = model(input_ids=ids_d, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

    loaded_mb, load_peak = rss_mb(), peak_mb()
    first_loss = None
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        loss = step()
        sync(device)
        if i == 0:
            first_loss = loss
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    row = dict(engine=args.engine, tok_s=args.batch * args.seq_len * len(times) / sum(times),
               step_s=sum(times) / len(times), first_loss=first_loss, peak_rss_mb=peak_mb(), loaded_rss_mb=loaded_mb,
               load_peak_rss_mb=load_peak)
    if device.startswith("cuda"):
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--answer-fracs", type=float, nargs="+", default=[0.7, 1.0],
                    help="share of each row that is answer (trained) tokens; the rest is prompt")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="subprocesses per engine and setting; the best is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nanohuatuo-bench"))
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    # internal: run one engine in this process
    ap.add_argument("--engine", choices=["ours", "hf"])
    ap.add_argument("--path")
    ap.add_argument("--answer-frac", type=float)
    args = ap.parse_args()
    if args.engine:
        return run_engine(args)

    path = build(args.workdir)
    print(f"model {path}, device {args.device} {args.dtype}, batch {args.batch} x {args.seq_len}, "
          f"threads {args.threads}, {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    results = []
    for frac in args.answer_fracs:
        best = {}
        for _ in range(args.rounds):
            for engine in ("hf", "ours"):
                cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--path", path,
                       "--answer-frac", str(frac), "--device", args.device, "--dtype", args.dtype,
                       "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
                if out.returncode:
                    sys.exit(f"{engine} failed:\n{out.stderr[-4000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps({"answer_frac": frac, **row}), flush=True)
                if engine not in best or row["tok_s"] > best[engine]["tok_s"]:
                    best[engine] = row
        results.append((frac, best))

    mem = "cuda_peak_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    print("\n| answer tokens | transformers+peft tok/s | nanohuatuo tok/s | speed ratio | "
          "peak memory MB (hf / ours) | RSS after load MB (hf / ours) | first loss (hf / ours) |")
    print("|---|---|---|---|---|---|---|")
    for frac, best in results:
        hf, ours = best["hf"], best["ours"]
        print(f"| {frac:.0%} | {hf['tok_s']:.0f} | {ours['tok_s']:.0f} | {ours['tok_s'] / hf['tok_s']:.2f}x | "
              f"{hf[mem]:.0f} / {ours[mem]:.0f} | {hf['loaded_rss_mb']:.0f} / {ours['loaded_rss_mb']:.0f} | "
              f"{hf['first_loss']:.4f} / {ours['first_loss']:.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([{"answer_frac": frac, **best} for frac, best in results], f, indent=1)


if __name__ == "__main__":
    main()
