"""Benchmark: LoRA DPO of nanohuatuo (dpo.train) against TRL's DPOTrainer, same model, data and steps.

A Llama-shaped model with random weights (about 58M parameters: vocabulary 32000, width 512, 8
layers, untied output matrix) and a word-level tokenizer (one token per word) with a small Jinja
chat template are saved once in the Hugging Face layout. The preference data is one file of
TRL's conversational rows ({"prompt": [user turn], "chosen": [assistant turn], "rejected": [...]},
random words, every prompt and answer the same length), read as it is by both engines. Each
engine then runs in a fresh subprocess: LoRA r=8 alpha=16 dropout 0 on every attention and MLP
projection, sigmoid loss, beta 0.1, AdamW, lr 5e-6 cosine without warm-up, clipping at 1.0, the
same pairs per step in one forward (no accumulation), no gradient checkpointing, float32.

Reported per engine: the seconds per step over all steps but the first two, amortised: nanohuatuo
computes the reference log-probs of every answer once before step 1 (TRL does a reference forward
inside each step), so that time is spread over the steps; peak RSS (ru_maxrss) less the RSS
before the model is loaded (the same for both); and the first step's loss (log 2 for both: the
policy starts as the reference).

    PYTHONPATH=/path/to/trl python bench/dpo.py                 # CPU, float32, 8 pairs x 256 tokens, 8 steps
    python bench/dpo.py --device cuda --dtype bfloat16 --pairs 16 --prompt-len 256 --answer-len 256
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {{ eos_token }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def build(workdir, n_rows, prompt_len, answer_len):
    """The model + tokenizer directory and the preference file (made once per shape)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    path = os.path.join(workdir, "llama-58M-words")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE)).save_pretrained(path)
        words = SPECIALS + ["user", "assistant"] + [f"w{i}" for i in range(SHAPE["vocab_size"] - 6)]
        tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tk.add_special_tokens(SPECIALS)
        tk.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                       "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False,
                       "chat_template": CHAT_TEMPLATE}, f)
    data = os.path.join(workdir, f"prefs-{n_rows}x{prompt_len}+{answer_len}.jsonl")
    if not os.path.exists(data):
        rng = random.Random(0)
        text = lambda n: " ".join(f"w{rng.randrange(SHAPE['vocab_size'] - 6)}" for _ in range(n))  # noqa: E731
        with open(data, "w") as f:
            for _ in range(n_rows):
                f.write(json.dumps({"prompt": [{"role": "user", "content": text(prompt_len)}],
                                    "chosen": [{"role": "assistant", "content": text(answer_len)}],
                                    "rejected": [{"role": "assistant", "content": text(answer_len)}]}) + "\n")
    return path, data


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_engine(args):
    """One engine in this (fresh) process; prints a JSON row."""
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    base_mb = rss_mb()
    out = tempfile.mkdtemp(prefix=f"bench-dpo-{args.engine}-")
    max_len = args.prompt_len + args.answer_len + 8  # room for the template's words: nothing is cut
    if args.engine == "ours":
        from nanohuatuo import dpo
        res = dpo.train(dpo.DPOConfig(
            model=args.path, data=[args.data], out=out, lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lr=5e-6,
            warmup_frac=0.0, beta=0.1, batch_size=args.pairs, micro_batch_size=args.pairs, max_steps=args.steps,
            max_len=max_len, eval_frac=0.0, save_every=10**9, device=args.device, dtype=args.dtype, seed=0))
        stamps = [r["time"] for r in res["history"]]
        step_times = [b - a for a, b in zip(stamps, stamps[1:])]  # step 1 has no start stamp: dropped
        first_loss, extra = res["history"][0]["loss"], res["ref_seconds"]
    else:
        import uuid

        import datasets
        import transformers as tf
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer
        stamps = []

        class Timer(tf.TrainerCallback):
            def on_step_end(self, *a, **k):
                if cuda:
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

            def on_step_begin(self, *a, **k):
                if not stamps:
                    stamps.append(time.perf_counter())

        # datasets fingerprints tables by pickling them, which some pyarrow + dill pairs cannot do; the
        # fingerprint only names cache files, so a random one changes nothing timed here
        datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
        dtype = getattr(torch, args.dtype)
        model = tf.AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype)
        tok = tf.AutoTokenizer.from_pretrained(args.path)
        rows = [json.loads(line) for line in open(args.data)]
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
                        max_steps=args.steps, learning_rate=5e-6, lr_scheduler_type="cosine", warmup_steps=0,
                        beta=0.1, loss_type=["sigmoid"], max_length=max_len, max_grad_norm=1.0,
                        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
                        use_cpu=not cuda, bf16=args.dtype == "bfloat16", seed=0, dataloader_num_workers=0)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok,
                             peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                    task_type="CAUSAL_LM"))
        trainer.add_callback(Timer())
        trainer.train()
        step_times = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # like ours: from step 2 on
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        first_loss, extra = losses[0] if losses else float("nan"), 0.0
    timed = step_times[1:]  # steps 3.. (step 2 still warms the allocator)
    row = dict(engine=args.engine, step_s=(sum(timed) + extra * len(timed) / args.steps) / len(timed),
               ref_s=extra, first_loss=first_loss, peak_rss_mb=peak_mb(), base_rss_mb=base_mb,
               mem_mb=peak_mb() - base_mb)
    if cuda:
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (one forward of 2 x pairs answers)")
    ap.add_argument("--prompt-len", type=int, default=128, help="words (= tokens) per prompt")
    ap.add_argument("--answer-len", type=int, default=128, help="words (= tokens) per answer")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nanohuatuo-bench"))
    # internal: run one engine in this process
    ap.add_argument("--engine", choices=["ours", "trl"])
    ap.add_argument("--path")
    ap.add_argument("--data")
    args = ap.parse_args()
    if args.engine:
        return run_engine(args)

    os.makedirs(args.workdir, exist_ok=True)
    path, data = build(args.workdir, args.pairs * args.steps, args.prompt_len, args.answer_len)
    print(f"model {path}, device {args.device} {args.dtype}, {args.pairs} pairs x ({args.prompt_len} + "
          f"{args.answer_len}) tokens per step, {args.steps} steps, threads {args.threads}", flush=True)
    rows = {}
    for engine in ("trl", "ours"):
        cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--path", path, "--data", data,
               "--device", args.device, "--dtype", args.dtype, "--pairs", str(args.pairs), "--steps", str(args.steps),
               "--prompt-len", str(args.prompt_len), "--answer-len", str(args.answer_len),
               "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"{engine} failed:\n{out.stderr[-4000:]}")
        rows[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[engine]), flush=True)
    trl, ours = rows["trl"], rows["ours"]
    mem = "cuda_peak_mb" if args.device.startswith("cuda") else "mem_mb"
    print("\n| engine | s/step | memory MB | first loss |\n|---|---|---|---|")
    for name, r in (("TRL DPOTrainer + peft", trl), ("nanohuatuo dpo", ours)):
        print(f"| {name} | {r['step_s']:.3f} | {r[mem]:.0f} | {r['first_loss']:.4f} |")
    print(f"| ratio ours / TRL | {ours['step_s'] / trl['step_s']:.2f}x | {ours[mem] / trl[mem]:.2f}x | |")


if __name__ == "__main__":
    main()
