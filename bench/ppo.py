"""Benchmark: time per PPO step (rollout + update) and peak memory, nanohuatuo against TRL's PPOTrainer.

Both engines train the same Llama-shaped model with random weights (about 45M parameters, saved in
the Hugging Face layout with a 32k word-level tokenizer) on the same prompts, with the same batch,
response length (EOS is practically never sampled, so every answer is full length), micro-batch,
PPO epochs, temperature and a reward model of the same size:
- nanohuatuo (`ppo.train`): one copy of the base serves policy (LoRA r=16 on all linear layers),
  reference (adapters off) and value (head on the policy trunk); the reward model is a second copy.
- TRL (`trl.experimental.ppo.PPOTrainer`, TRL 1.5.x): its standard setup, four models (policy,
  reference copy, value model and reward model, the last two `AutoModelForSequenceClassification`
  on the same base) with full-weight AdamW on policy and value; `--trl-lora` adds a run with a
  PEFT LoRA policy (r=16, all linear layers; reference = adapter off), whose value model is still a
  full trainable copy.
Each engine runs in its own subprocess, so peak memory is that process's ru_maxrss (and on CUDA
also torch.cuda.max_memory_allocated). The first step (warm-up) is reported apart; the step time
is the mean wall time between the ends of the later steps (logging included, no checkpoints).

TRL is never installed into the project's virtualenv. Setup used for the numbers in the report:
    python3 -m venv /tmp/trlenv
    /tmp/trlenv/bin/pip install torch==2.13.0 'trl==1.5.*' 'peft==0.21.*'
    # (TRL 1.5.1 pulled transformers 5.24.0, accelerate 1.15.0, datasets 5.2.0; CPU torch wheel)
Run (CPU, 2 threads per engine):
    .venv/bin/python bench/ppo.py --trl-python /tmp/trlenv/bin/python [--trl-lora] [--steps 3]
    .venv/bin/python bench/ppo.py --engines ours            # without TRL
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "45M": dict(vocab_size=32000, dim=512, n_layers=4, n_heads=8, ffn_dim=1376),  # CPU
    "0.5B": dict(vocab_size=32000, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864),  # GPU: Qwen2.5-0.5B's trunk
}


# ----------------------------------------------------------------------------- setup (project venv)

def build(workdir, prompt_len, n_prompts, shape):
    """Policy dir (model + tokenizer), reward-model dir (LlamaRewardModel layout), prompt files."""
    sys.path.insert(0, ROOT)
    import torch
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from nanohuatuo import ModelConfig, Tokenizer, Transformer
    from nanohuatuo.templates import render_prompt
    policy, rm = os.path.join(workdir, "policy"), os.path.join(workdir, "rm")
    if os.path.exists(os.path.join(workdir, "prompt_ids.json")):
        return policy, rm
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + ["User", "Assistant", ":"] + [f"w{i}" for i in range(shape["vocab_size"] - 7)]
    for d in (policy, rm):
        os.makedirs(d, exist_ok=True)
        tk = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.add_special_tokens(specials)
        tk.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                       "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False}, f)
    torch.manual_seed(0)
    cfg = dict(arch="llama", max_seq_len=1024, **shape)
    model = Transformer(ModelConfig(**cfg, extra={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
    model.init_weights(seed=0)
    model.save_pretrained(policy)
    reward = Transformer(ModelConfig(**cfg, lm_head=False, value_head=True))
    reward.init_weights(seed=1)
    reward.save_pretrained(rm)
    with open(os.path.join(rm, "reward_config.json"), "w") as f:  # as train_rm.py writes a full-weight RM
        json.dump({"base": os.path.abspath(rm), "sft_adapter": None, "template": "plain", "bias": 0.0, "gain": 1.0,
                   "lora": False, "max_len": 1024}, f)
    tok = Tokenizer(policy)
    g = torch.Generator().manual_seed(0)
    overhead = len(render_prompt([{"role": "user", "content": "w0"}], tok, "plain")) - 1
    rows, ids = [], []
    for _ in range(n_prompts):
        n = prompt_len - overhead  # every prompt renders to exactly prompt_len tokens
        text = " ".join(f"w{int(i)}" for i in torch.randint(0, shape["vocab_size"] - 7, (n,), generator=g))
        msgs = [{"role": "user", "content": text}]
        rows.append({"messages": msgs})
        ids.append(render_prompt(msgs, tok, "plain"))
    assert all(len(i) == prompt_len for i in ids)
    with open(os.path.join(workdir, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(workdir, "prompt_ids.json"), "w") as f:
        json.dump(ids, f)
    return policy, rm


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def step_times(ends):
    """(first step seconds, mean of the later steps) from the wall-clock ends of the steps and the start."""
    d = [b - a for a, b in zip(ends, ends[1:])]
    return d[0], sum(d[1:]) / max(len(d) - 1, 1)


# ----------------------------------------------------------------------------- workers

def worker_ours(a):
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(a.threads)
    from nanohuatuo import ppo
    out = os.path.join(a.workdir, "out_ours")
    shutil.rmtree(out, ignore_errors=True)
    cfg = ppo.PPOConfig(model=os.path.join(a.workdir, "policy"), reward=os.path.join(a.workdir, "rm"),
                        data=os.path.join(a.workdir, "prompts.jsonl"), out=out, template="plain",
                        max_prompt_len=4096, max_steps=a.steps, batch_size=a.batch, max_new_tokens=a.response,
                        micro_batch_size=a.micro, num_mini_batches=1, ppo_epochs=a.epochs, temperature=0.7,
                        lora_r=16, lora_alpha=32, lr=5e-5, kl_coef=0.05, missing_eos_penalty=-1.0,
                        sample_every=0, save_every=10**9, device=a.device, dtype=a.dtype, seed=0, compile=a.compile)
    t0 = time.time()
    res = ppo.train(cfg)
    ends = [t0] + [r["time"] for r in res["history"]]
    first, later = step_times(ends)
    h = res["history"]
    return {"engine": "nanohuatuo", "first_step_s": first, "step_s": later,
            "rollout_s": sum(r["rollout_s"] for r in h[1:]) / max(len(h) - 1, 1),
            "update_s": sum(r["update_s"] for r in h[1:]) / max(len(h) - 1, 1),
            "response_length": h[-1]["response_length"]}


def worker_trl(a, lora):
    import torch
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    policy_dir = os.path.join(a.workdir, "policy")
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: torch.float32}[a.dtype]
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype)
    ref = None if lora else AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=dtype)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    with open(os.path.join(a.workdir, "prompt_ids.json")) as f:
        ids = json.load(f)
    data = Dataset.from_dict({"input_ids": ids})
    out = os.path.join(a.workdir, "out_trl_lora" if lora else "out_trl")
    cuda = a.device == "cuda"
    args = PPOConfig(output_dir=out, per_device_train_batch_size=a.micro, gradient_accumulation_steps=a.batch // a.micro,
                     num_mini_batches=1, num_ppo_epochs=a.epochs, response_length=a.response, temperature=0.7,
                     local_rollout_forward_batch_size=a.batch, total_episodes=a.batch * a.steps, learning_rate=5e-5,
                     kl_coef=0.05, stop_token="eos", missing_eos_penalty=1.0, report_to=[], logging_steps=1,
                     save_strategy="no", num_sample_generations=0, bf16=a.dtype == "bfloat16",
                     gradient_checkpointing=False, use_cpu=not cuda, seed=0, disable_tqdm=True)
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.time())

    peft_config = None
    if lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=data, callbacks=[Clock()], peft_config=peft_config)
    t0 = time.time()
    trainer.train()
    first, later = step_times([t0] + ends)
    return {"engine": "trl-lora" if lora else "trl", "first_step_s": first, "step_s": later}


# ----------------------------------------------------------------------------- driver

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where models and runs go (default: a folder per shape in the temp dir)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="45M")
    p.add_argument("--trl-python", default="/tmp/trlenv/bin/python", help="python of the venv that has TRL")
    p.add_argument("--engines", default="ours,trl", help="comma list of ours, trl, trl-lora")
    p.add_argument("--trl-lora", action="store_true", help="also run TRL with a PEFT LoRA policy")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per engine (alternating); the fastest is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="nanohuatuo: torch.compile the decode step (CUDA graphs)")
    p.add_argument("--worker", choices=["ours", "trl", "trl-lora"], help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        a.workdir = a.workdir or os.path.join(tempfile.gettempdir(), f"nanohuatuo_bench_ppo_{a.shape}")
        res = worker_ours(a) if a.worker == "ours" else worker_trl(a, lora=a.worker == "trl-lora")
        res["peak_rss_mib"] = peak_rss_mib()
        import torch
        if a.device == "cuda":
            res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(res), flush=True)
        return

    a.workdir = a.workdir or os.path.join(tempfile.gettempdir(), f"nanohuatuo_bench_ppo_{a.shape}")
    os.makedirs(a.workdir, exist_ok=True)
    build(a.workdir, a.prompt_len, a.batch * a.steps, SHAPES[a.shape])
    engines = a.engines.split(",") + (["trl-lora"] if a.trl_lora else [])
    shared = ["--workdir", a.workdir, "--steps", str(a.steps), "--batch", str(a.batch), "--micro", str(a.micro),
              "--response", str(a.response), "--epochs", str(a.epochs), "--threads", str(a.threads),
              "--device", a.device] + (["--dtype", a.dtype] if a.dtype else []) + (["--compile"] if a.compile else [])
    runs = {}  # engine -> results of its repeats, run alternately so that load from elsewhere hits all alike
    for _ in range(a.repeat):
        for engine in engines:
            python = sys.executable if engine == "ours" else shutil.which(a.trl_python)
            if not python:
                print(f"{engine}: {a.trl_python} not found; set up TRL's venv as the docstring says, or pass --trl-python")
                continue
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
            r = subprocess.run([python, os.path.abspath(__file__), "--worker", engine, *shared], capture_output=True,
                               text=True, env=env)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"{engine} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
                continue
            runs.setdefault(engine, []).append(json.loads(line[-1][len("RESULT "):]))
            print(json.dumps(runs[engine][-1]), flush=True)
    # the fastest repeat: other load on the machine only ever makes a run slower
    results = [min(rs, key=lambda r: r["step_s"]) for rs in runs.values()]

    print(f"\nPPO step (best of {a.repeat}): {a.shape} model {SHAPES[a.shape]}, batch {a.batch}, prompt {a.prompt_len}, response {a.response}, "
          f"micro-batch {a.micro}, {a.epochs} epochs, device {a.device}, {a.threads} threads")
    print(f"{'engine':12} {'first step s':>12} {'step s':>8} {'peak RSS MiB':>13}" +
          (f" {'CUDA peak MiB':>14}" if a.device == "cuda" else ""))
    for r in results:
        print(f"{r['engine']:12} {r['first_step_s']:12.2f} {r['step_s']:8.2f} {r['peak_rss_mib']:13.0f}" +
              (f" {r['cuda_peak_mib']:14.0f}" if a.device == "cuda" else ""))
    ours = next((r for r in results if r["engine"] == "nanohuatuo"), None)
    for r in results:
        if ours and r is not ours:
            print(f"nanohuatuo / {r['engine']}: time {ours['step_s'] / r['step_s']:.2f}x, "
                  f"peak RSS {ours['peak_rss_mib'] / r['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
