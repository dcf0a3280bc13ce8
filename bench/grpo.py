"""Benchmark: time per GRPO step (generation + update) and peak memory, nanohuatuo against TRL's GRPOTrainer.

Both train the same Llama-shaped model with random weights (about 45M parameters, saved in the
Hugging Face layout with a 32k word-level tokenizer; bench/ppo.py's `build`) with a LoRA (r=16,
alpha 32, every attention and MLP linear) on the same prompts, with the same rule reward (the share
of even token ids in the answer, computed on the answer's ids), K answers per prompt, prompts per
step, answer length (EOS is practically never sampled, so every answer is full length), micro-batch,
temperature 0.7 (top-k 0, top-p 1), beta 0.04 (k3 KL to the reference = adapter off), clip 0.2,
group-scaled advantages, the token-level loss (TRL's loss_type "dapo"), one update per generation:
- nanohuatuo (`grpo.train`): generation on the continuous-batching engine, the K copies of a
  prompt prefilled once; the sampling policy's log-probs come from the update's own forward.
- TRL (`trl.GRPOTrainer`, TRL 1.16, PEFT LoRA; transformers' generate, no vLLM).
nanohuatuo's training process on CPU has glibc return freed blocks of 1 MiB or more to the OS
(`heap.return_large_blocks`); the engine "trl-mmap" runs TRL with the same allocator
setting (MALLOC_MMAP_THRESHOLD_=1048576 in its environment), so the memory ratio can be read
with and without it.
Each engine runs in its own subprocess, so peak memory is that process's ru_maxrss (and on CUDA
also torch.cuda.max_memory_allocated), the same measure for both. The first step (warm-up) is
reported apart; the step time is the mean wall time between the ends of the later steps.

TRL is never installed into the project's virtualenv. Setup used for the numbers in the report:
    python3 -m venv /tmp/venv-trl-grpo
    /tmp/venv-trl-grpo/bin/pip install torch==2.13.0 trl peft transformers
    # (TRL 1.16.0, peft 0.21.2, transformers 5.24.0, datasets 5.2.0; CPU torch wheel)
Run (CPU, 2 threads per engine):
    .venv/bin/python bench/grpo.py --trl-python /tmp/venv-trl-grpo/bin/python --engines ours,trl,trl-mmap \
        --steps 3 --repeat 2
    .venv/bin/python bench/grpo.py --engines ours            # without TRL
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_ppo", os.path.join(ROOT, "bench", "ppo.py"))
bench_ppo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ppo)  # the model and prompt files, and the measures, are PPO's bench's
SHAPES, build, peak_rss_mib, step_times = bench_ppo.SHAPES, bench_ppo.build, bench_ppo.peak_rss_mib, bench_ppo.step_times


def even_share(ids):
    """The rule reward both engines maximise: the share of even token ids in an answer."""
    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)


# ----------------------------------------------------------------------------- workers

def worker_ours(a):
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(a.threads)
    from nanohuatuo import grpo
    out = os.path.join(a.workdir, "out_ours")
    shutil.rmtree(out, ignore_errors=True)
    cfg = grpo.GRPOConfig(model=os.path.join(a.workdir, "policy"), data=os.path.join(a.workdir, "prompts.jsonl"),
                          out=out, template="plain", max_prompt_len=4096, max_steps=a.steps, batch_size=a.prompts,
                          k=a.k, max_new_tokens=a.response, temperature=0.7, micro_batch_size=a.micro, beta=0.04,
                          clip_range=0.2, lora_r=16, lora_alpha=32, lr=5e-5, missing_eos_penalty=None,
                          sample_every=0, save_every=10**9, device=a.device, dtype=a.dtype, seed=0, compile=a.compile)
    t0 = time.time()
    res = grpo.train(cfg, reward_fn=lambda prompts, responses, rows, texts: [even_share(r) for r in responses])
    h = res["history"]
    first, later = step_times([t0] + [r["time"] for r in h])
    return {"engine": "nanohuatuo", "first_step_s": first, "step_s": later,
            "rollout_s": sum(r["rollout_s"] for r in h[1:]) / max(len(h) - 1, 1),
            "update_s": sum(r["update_s"] for r in h[1:]) / max(len(h) - 1, 1),
            "response_length": h[-1]["response_length"]}


def worker_trl(a):
    import torch
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    policy_dir = os.path.join(a.workdir, "policy")
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: torch.float32}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype)
    with open(os.path.join(a.workdir, "prompt_ids.json")) as f:
        ids = json.load(f)
    texts = [tok.decode(p) for p in ids]  # the same prompts as text, re-tokenised by TRL to the same ids
    assert all(tok(t, add_special_tokens=False)["input_ids"] == p for t, p in zip(texts, ids)), "prompt ids differ"
    data = Dataset.from_dict({"prompt": texts})
    rows = a.prompts * a.k
    cuda = a.device == "cuda"
    args = GRPOConfig(output_dir=os.path.join(a.workdir, "out_trl"), per_device_train_batch_size=a.micro,
                      gradient_accumulation_steps=rows // a.micro, num_generations=a.k,
                      max_completion_length=a.response, temperature=0.7, top_p=1.0, top_k=0, beta=0.04, epsilon=0.2,
                      loss_type="dapo", scale_rewards="group", num_iterations=1, learning_rate=5e-5,
                      max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[],
                      bf16=a.dtype == "bfloat16", use_cpu=not cuda, seed=0, disable_tqdm=True, disable_dropout=True,
                      gradient_checkpointing=False)
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.time())

    def reward(prompts, completions, completion_ids, **kw):
        return [even_share(c) for c in completion_ids]

    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()], peft_config=peft_config)
    t0 = time.time()
    trainer.train()
    first, later = step_times([t0] + ends)
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"engine": "trl-mmap" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "trl", "first_step_s": first, "step_s": later,
            "response_length": lengths[-1] if lengths else None}


# ----------------------------------------------------------------------------- driver

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where the model and runs go (default: a folder per shape in the temp dir)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="45M")
    p.add_argument("--trl-python", default="/tmp/venv-trl-grpo/bin/python", help="python of the venv that has TRL")
    p.add_argument("--engines", default="ours,trl,trl-mmap", help="comma list of ours, trl, trl-mmap (TRL with "
                   "glibc's mmap threshold at 1 MiB, as nanohuatuo sets it)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--k", type=int, default=4, help="answers per prompt")
    p.add_argument("--micro", type=int, default=8, help="answers per forward/backward")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per engine (alternating); the fastest is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="nanohuatuo: torch.compile the decode step (CUDA graphs on CUDA; fused element-wise ops on CPU)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.workdir = a.workdir or os.path.join(tempfile.gettempdir(), f"nanohuatuo_bench_grpo_{a.shape}")

    if a.worker:
        res = worker_ours(a) if a.worker == "ours" else worker_trl(a)
        res["peak_rss_mib"] = peak_rss_mib()
        import torch
        if a.device == "cuda":
            res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(res), flush=True)
        return

    if (a.prompts * a.k) % a.micro:
        p.error(f"--micro {a.micro} must divide the {a.prompts * a.k} answers of a step")
    os.makedirs(a.workdir, exist_ok=True)
    build(a.workdir, a.prompt_len, a.prompts * a.steps, SHAPES[a.shape])
    shared = ["--workdir", a.workdir, "--steps", str(a.steps), "--prompts", str(a.prompts), "--k", str(a.k),
              "--micro", str(a.micro), "--response", str(a.response), "--threads", str(a.threads),
              "--device", a.device] + (["--dtype", a.dtype] if a.dtype else []) + (["--compile"] if a.compile else [])
    runs = {}  # engine -> results of its repeats, run alternately so that load from elsewhere hits all alike
    for _ in range(a.repeat):
        for engine in a.engines.split(","):
            python = sys.executable if engine == "ours" else shutil.which(a.trl_python)
            if not python:
                print(f"{engine}: {a.trl_python} not found; set up TRL's venv as the docstring says, or pass --trl-python")
                continue
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
            if engine == "trl-mmap":
                env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
            worker = "trl" if engine.startswith("trl") else engine
            r = subprocess.run([python, os.path.abspath(__file__), "--worker", worker, *shared], capture_output=True,
                               text=True, env=env)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"{engine} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
                continue
            runs.setdefault(engine, []).append(json.loads(line[-1][len("RESULT "):]))
            print(json.dumps(runs[engine][-1]), flush=True)
    results = [min(rs, key=lambda r: r["step_s"]) for rs in runs.values()]  # load elsewhere only slows a run

    cuda = a.device == "cuda"
    print(f"\nGRPO step (best of {a.repeat}): {a.shape} model {SHAPES[a.shape]}, {a.prompts} prompts x K={a.k}, "
          f"prompt {a.prompt_len}, response {a.response}, micro-batch {a.micro}, LoRA r=16, device {a.device}, "
          f"{a.threads} threads")
    print(f"{'engine':12} {'first step s':>12} {'step s':>8} {'peak RSS MiB':>13}" + (f" {'CUDA peak MiB':>14}" if cuda else ""))
    for r in results:
        print(f"{r['engine']:12} {r['first_step_s']:12.2f} {r['step_s']:8.2f} {r['peak_rss_mib']:13.0f}" +
              (f" {r['cuda_peak_mib']:14.0f}" if cuda else ""))
    ours = next((r for r in results if r["engine"] == "nanohuatuo"), None)
    for r in results:
        if ours and r is not ours:
            print(f"nanohuatuo / {r['engine']}: time {ours['step_s'] / r['step_s']:.2f}x, "
                  f"peak RSS {ours['peak_rss_mib'] / r['peak_rss_mib']:.2f}x" +
                  (f", CUDA peak {ours['cuda_peak_mib'] / r['cuda_peak_mib']:.2f}x" if cuda else ""))


if __name__ == "__main__":
    main()
