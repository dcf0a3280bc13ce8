"""The whole HuatuoGPT recipe end to end, evaluation included: on the bundled data, on a CPU, in minutes.

Each stage calls the same code the real commands run; this module only chains them and writes
the report:

    0. data:      the four bundled SFT sources (with --llm-base-url: plus a few items of each made
                  by distill.py: self-instruct, patient/doctor conversations, polished replies)
    1. base:      a sentencepiece tokenizer and a tiny random Llama-style model (or --model DIR)
    2. SFT:       sft.train on the four sources (full fine-tuning of the tiny model; LoRA on --model)
    3. samples:   sampling.sample_answers, K answers per real-doctor prompt on the engine
    4. feedback:  the offline judge (or an LLM) ranks them against the doctor's reply
    5. RM:        reward.train on the rankings
    6. PPO:       ppo.train, policy = SFT model + LoRA, reference = adapters off, value head
    7. eval:      HuatuoGPT's evaluation of PPO against SFT: reference metrics (BLEU, GLEU, ROUGE,
                  Distinct) on held-out doctor answers, pairwise judging on the KUAKE-QIC-format
                  questions with the order swapped, and a multi-turn round on the Med-dialog-format
                  cases with a patient (an offline stand-in unless an LLM plays it)
    8. report:    runs/demo/report.md with the numbers, plots, sample answers and time per stage

A tiny model trained from scratch for a few minutes speaks broken Chinese; the point is to watch
every stage work and its numbers move the right way, then run the same commands on a real model.
"""

import cProfile
import io
import json
import os
import platform
import pstats
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from . import distill, dpo, evaluate, grpo, ppo, reward, sft
from .cli import UserError, arg, cli_main, prepare_out, resolve_device, resolve_dtype, write_config
from .cpu_kernels import native_bf16
from .data import load_conversations, read_jsonl, to_prompt, write_jsonl
from .feedback import EndpointRanker, OfflineRanker, rankings_to_preferences
from .generate import for_inference
from .hf import ModelDirError, check_model_dir, count_params
from .metrics import cpu_name, strict_json
from .model import ModelConfig, Transformer
from .reward_model import as_messages, load_reward_model, score_texts
from .sampling import sample_answers
from .templates import resolve_template
from .tokenizer import Tokenizer, train_sentencepiece
from .demo_report import eval_digest, ppo_trend, write_report
from .winrate import paired_diff

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SOURCES = ["distilled_instructions", "real_doctor_instructions", "distilled_conversations",
           "real_doctor_conversations"]
MARKER = "demo.json"  # written first: a directory holding it is an earlier demo run, safe to replace


@dataclass
class DemoSize:
    """How much each stage does. The defaults are the "tiny" profile: a model trained from scratch,
    the whole recipe in about five minutes on two CPU cores."""
    vocab: int = 1200  # the tiny model's own tokenizer and shape (unused with --model)
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn: int = 352
    lora_r: int = 0  # 0: full fine-tuning (a random model has nothing to adapt)
    sft_steps: int = 120
    sft_batch: int = 16
    sft_micro: int = 16  # rows per forward/backward (gradient accumulation makes up sft_batch)
    sft_evals: int = 4  # held-out loss passes, the first before training (one costs most of a step)
    sft_lr: float = 3e-3
    max_len: int = 384
    rl_prompts: int = 96  # prompts sampled and judged for the reward model
    k: int = 4
    sample_tokens: int = 80
    rm_epochs: int = 2
    rm_lr: float = 3e-4
    ppo_steps: int = 24
    ppo_epochs: int = 2  # passes over each rollout batch (DeepSpeed-Chat uses 1; the default 4 doubles the time)
    ppo_batch: int = 16
    ppo_micro: int = 16
    ppo_minibatches: int = 1  # optimizer steps per pass over a rollout batch
    dpo_steps: int = 24  # DPO on the same rankings the reward model learns from (--algo dpo|all)
    dpo_batch: int = 16  # pairs per step
    dpo_lr: float = 5e-4  # GRPO (--algo grpo|all) takes PPO's steps, lr and lengths, ppo_batch // k prompts x k
    ppo_tokens: int = 80
    ppo_lr: float = 3e-4
    kl_coef: float = 0.1
    lam: float = 0.95  # PPO's GAE lambda
    rl_prompt_len: int = 512  # PPO's and GRPO's --max-prompt-len: longer prompts are skipped
    length_debias: float = 1.0  # PPO's --length-debias: the offline judge, and so the RM, likes short answers
    eos_penalty: float | None = -1.0  # PPO's --missing-eos-penalty
    eval_prompts: int = 32  # held-out real-doctor prompts (reference metrics)
    eval_questions: int = 50  # KUAKE-QIC-format questions judged pairwise
    eval_cases: int = 8  # Med-dialog-format cases consulted
    eval_turns: int = 3
    eval_tokens: int = 80
    distill_items: int = 4  # with --llm-base-url: items of each distilled source
    grad_checkpointing: bool = False
    compile: bool = False  # CUDA-graph decode (CUDA only)


# Size profiles. "tiny" trains a model from scratch. The others put LoRA on a real checkpoint with
# learning rates for pretrained weights (SFT 2e-4 at most, as sft.py allows without
# --allow-high-lr; RM 5e-5 to 3e-4, the top for the few steps of a CPU run: 7 RM steps at 1e-4 left the
# reward model at chance on one run; PPO 2e-5 to 5e-5): a rate meant for random weights destroys them.
PROFILES = {
    "tiny": DemoSize(),
    # a 100-700M checkpoint on two CPU cores in under 20 minutes (measured in docs/benchmarks.md)
    "cpu": DemoSize(lora_r=16, sft_steps=8, sft_batch=8, sft_micro=4, sft_lr=2e-4, sft_evals=2, max_len=192,
                    rl_prompts=32, k=4, sample_tokens=48, rm_epochs=1, rm_lr=3e-4, ppo_steps=12, ppo_epochs=2,
                    ppo_batch=6, ppo_micro=4, ppo_minibatches=2, dpo_steps=10, dpo_batch=8, dpo_lr=2e-4,
                    ppo_tokens=48, kl_coef=0.05, length_debias=1.0, eval_prompts=8,
                    # 2e-4 let a 0.5B model (Qwen2.5-Coder-0.5B) drift to KL 10 and few-word answers the
                    # reward model likes; 5e-5 kept KL under 3 and the answers' length (docs/benchmarks.md)
                    ppo_lr=5e-5,
                    eval_questions=16, eval_cases=2, eval_turns=2, eval_tokens=48, distill_items=2,
                    # 48 tokens cut most answers of a small model (Chinese is 1-3 tokens a character):
                    # a penalty on every cut answer would leave PPO nothing to learn from
                    eos_penalty=None,
                    # 72 answers are too few for the critic (V = 0 at first) to learn much: with lambda 0.95
                    # an answer's first token would get 0.95^47 = 9% of the score, lambda 1 hands every
                    # token all of it
                    lam=1.0,
                    # a batch is as long as its longest prompt (up to 446 tokens here, median 121): capped,
                    # a PPO step costs about a third less and buys more steps
                    rl_prompt_len=160),
    # a 0.5-7B checkpoint on one 24 GB GPU in bf16 within the hour: gradient checkpointing and small
    # micro-batches keep a 7B base (14 GB) and its activations inside 24 GB, the compiled decode
    # path serves the rollouts, and K = 8 answers per prompt give the judge more to rank
    "gpu-24g": DemoSize(lora_r=16, sft_steps=200, sft_batch=16, sft_micro=2, sft_lr=1e-4, max_len=1024,
                        rl_prompts=256, k=8, sample_tokens=256, rm_epochs=1, rm_lr=5e-5, ppo_steps=50, ppo_epochs=2,
                        ppo_batch=32, ppo_micro=4, ppo_minibatches=4, ppo_tokens=256, ppo_lr=2e-5, kl_coef=0.05,
                        length_debias=1.0, dpo_steps=100, dpo_batch=16, dpo_lr=5e-5,
                        eval_prompts=64, eval_questions=50, eval_cases=8, eval_turns=4, eval_tokens=384,
                        distill_items=16, grad_checkpointing=True, compile=True),
}
CPU_PARAMS = 700e6  # above this, a CPU run of the recipe takes over 20 minutes: said before it starts


def quick(size: DemoSize, tiny: bool) -> DemoSize:
    """--quick: the same recipe with fewer steps, prompts and tokens (what the tests run); learning
    rates, LoRA and lengths of the profile stay. The tiny model also shrinks its width."""
    q = replace(size, sft_steps=min(size.sft_steps, 12), sft_batch=8, sft_micro=min(size.sft_micro, 8),
                max_len=min(size.max_len, 256), rl_prompts=12, k=2, sample_tokens=24, rm_epochs=1, ppo_steps=3,
                ppo_epochs=1, ppo_batch=4,
                dpo_steps=3, dpo_batch=4, ppo_micro=4, ppo_tokens=24, eval_prompts=4, eval_questions=6, eval_cases=2,
                eval_turns=2, eval_tokens=24, distill_items=2)
    return replace(q, vocab=400, dim=32, n_layers=2, n_heads=4, ffn=64) if tiny else q


def choose_size(cfg, device: str, n_params: int | None) -> tuple[str, DemoSize, str]:
    """(profile name, its sizes, why): --size, else from the device and the model's parameter count."""
    if not cfg.model:
        if cfg.size not in ("auto", "tiny"):
            raise UserError(f"--size {cfg.size} is for a real checkpoint: pass --model DIR too")
        name, why = "tiny", "no --model: a tiny model trained from scratch"
    elif cfg.size == "tiny":
        raise UserError("--size tiny trains a model from scratch; with --model choose cpu or gpu-24g (or auto)")
    elif cfg.size != "auto":
        name, why = cfg.size, "--size"
    else:
        name = "gpu-24g" if device.startswith("cuda") else "cpu"
        why = f"{n_params / 1e6:.0f}M parameters on {device}"
    if name == "cpu" and n_params and n_params > CPU_PARAMS:
        why += (f"; warning: the cpu profile is sized for 100-700M parameters, this model has "
                f"{n_params / 1e9:.1f}B: expect over 20 minutes, hours for a few billion (a GPU and --size "
                "gpu-24g fit it)")
    size = PROFILES[name]
    return name, quick(size, name == "tiny") if cfg.quick else size, why


# share of the wall time per stage, measured on a 2-core CPU, for the ETA printed as each stage starts
ALGOS = ["ppo", "dpo", "grpo", "all"]
BUDGET = {"data": 0.005, "base": 0.005, "sft": 0.32, "samples": 0.06, "feedback": 0.005, "rm": 0.14, "ppo": 0.43,
          "dpo": 0.15, "grpo": 0.43,
          "eval": 0.04}


@dataclass
class DemoConfig:
    out: str = arg("runs/demo", "output directory (report.md, every stage's outputs); an earlier demo run there "
                                "is replaced")
    quick: bool = arg(False, "fewer steps, prompts and tokens, same recipe (what the tests run): under a minute "
                             "with the tiny model")
    model: str = arg("", "run the recipe with LoRA on this real checkpoint (Hugging Face layout) instead of the "
                         "tiny model trained from scratch; evaluated against the base model and against SFT")
    size: str = arg("auto", "size profile: auto (tiny without --model; with it cpu or gpu-24g from the device), "
                            "cpu (100-700M parameters, under 20 min on 2 cores), gpu-24g (0.5-7B on one 24 GB GPU, "
                            "bf16, gradient checkpointing, compiled decode)", choices=["auto", *PROFILES])
    llm_base_url: str = arg("", "one OpenAI-compatible endpoint as teacher (distill.py), judge and patient; "
                                "default: offline stand-ins", metavar="URL")
    llm_model_name: str = arg("", "the model name at --llm-base-url", metavar="NAME", old=("--llm-model",))
    llm_api_key: str | None = arg(None, "API key of --llm-base-url (default: $NANOHUATUO_API_KEY, then "
                                        "$OPENAI_API_KEY)")
    algo: str = arg("ppo", "the RL step after SFT: ppo (HuatuoGPT's), dpo (on the judge's rankings), grpo (groups of "
                           "sampled answers scored by the reward model), or all three, compared in one report table",
                    choices=ALGOS)
    profile: bool = arg(False, "profile every stage with cProfile; the top functions go to OUT/profile/STAGE.txt")
    overwrite: bool = arg(False, "replace --out even if it holds something other than an earlier demo run")
    device: str = arg("auto", "auto (cuda if available), cpu, cuda, ...; the tiny demo (no --model) runs on the CPU")
    dtype: str = arg("auto", "auto (bfloat16 on CUDA, and with --model on a CPU that has bfloat16 instructions; "
                             "float32 otherwise), float32, bfloat16")
    seed: int = arg(0, "random seed of every stage")


# ----------------------------------------------------------------------------- stage bookkeeping

class Stages:
    """Runs the stages one after another: a header with the ETA, wall time each, optional profiles."""

    def __init__(self, out: str, names: list[str], profile: bool):
        self.out, self.names, self.profile = out, names, profile
        self.seconds: dict[str, float] = {}
        self.hot: dict[str, list] = {}  # stage -> [(function, own seconds)] with --profile
        self.t0 = time.time()

    def run(self, name: str, title: str, fn, *args, **kw):
        i = self.names.index(name)
        done = sum(BUDGET[n] for n in self.names[:i])
        elapsed = time.time() - self.t0
        if done > 0.05:  # extrapolate from the stages so far once they are a fair sample
            left = elapsed / done * (1 - done)
            eta = f", about {left / 60:.1f} min left in all"
        else:
            eta = ""
        print(f"\n=== [{i + 1}/{len(self.names)}] {title} ({elapsed / 60:.1f} min so far{eta})", flush=True)
        prof = cProfile.Profile() if self.profile else None
        t = time.time()
        if prof:
            prof.enable()
        try:
            return fn(*args, **kw)
        finally:
            if prof:
                prof.disable()
            self.seconds[name] = time.time() - t
            print(f"--- {name}: {self.seconds[name]:.1f} s", flush=True)
            if prof:
                self.write_profile(name, prof)

    def write_profile(self, name, prof):
        os.makedirs(os.path.join(self.out, "profile"), exist_ok=True)
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("cumulative").print_stats(30)
        with open(os.path.join(self.out, "profile", f"{name}.txt"), "w") as f:
            f.write(buf.getvalue())
        # the report's "where the time goes": the functions with the most time of their own
        own = sorted(((tt, fn) for fn, (_, _, tt, _, _) in stats.stats.items()), reverse=True)[:4]
        self.hot[name] = [(f"{os.path.basename(file)}:{func}" if not file.startswith("~") else func, tt)
                          for tt, (file, _, func) in own]

    def total(self) -> float:
        return time.time() - self.t0


# ----------------------------------------------------------------------------- the stages

def load_bundled() -> tuple[list[dict], list[str]]:
    paths = [os.path.join(DATA, f"sft_{s}.jsonl") for s in SOURCES]
    rows = []
    for p in paths:
        rows += load_conversations(p)
    return rows, paths


def llm_cache(out: str, name: str) -> str:
    """Where the demo keeps an endpoint's replies: beside --out (OUT.llm_cache/NAME), which every run replaces,
    so a rerun against the same endpoint does not pay again for the requests it repeats."""
    return os.path.join(f"{os.path.normpath(out)}.llm_cache", name)


def distill_sources(out: str, cfg: DemoConfig, size: DemoSize, rows: list[dict]) -> list[str]:
    """A few items of each LLM-made source, through distill.py's own commands."""
    d = os.path.join(out, "distilled")
    os.makedirs(d, exist_ok=True)
    common = dict(teacher_base_url=cfg.llm_base_url, teacher_model_name=cfg.llm_model_name,
                  teacher_api_key=cfg.llm_api_key, seed=cfg.seed)
    real_single = [r for r in rows if r["source"] == "real_doctor_instructions"][:size.distill_items]
    real_multi = [r for r in rows if r["source"] == "real_doctor_conversations"][:size.distill_items]
    cases = os.path.join(d, "cases.jsonl")
    write_jsonl(cases, real_single)
    to_polish = os.path.join(d, "to_polish.jsonl")
    write_jsonl(to_polish, real_single + real_multi)
    made = []
    for name, run_fn, conf in (
            ("instructions", distill.run_instructions,
             distill.InstructionsConfig(out=os.path.join(d, "instructions.jsonl"), limit=size.distill_items, **common)),
            ("conversations", distill.run_conversations,
             distill.ConversationsConfig(out=os.path.join(d, "conversations.jsonl"), data=[cases], max_turns=3,
                                         **common)),
            ("polish", distill.run_polish,
             distill.PolishConfig(out=os.path.join(d, "polished.jsonl"), data=[to_polish], **common))):
        print(f"distill {name}:", flush=True)
        conf = replace(conf, cache=llm_cache(out, f"distill_{name}.sqlite"))
        run_fn(conf)
        made.append(conf.out)
    return made


def build_base(out: str, size: DemoSize, rows: list[dict], seed: int) -> int:
    """Tokenizer trained on the bundled text, and a random tiny Llama-style model, saved together."""
    texts = [m["content"] for r in rows for m in r["messages"]]
    tok = train_sentencepiece(texts, out, vocab_size=size.vocab)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, dim=size.dim, n_layers=size.n_layers,
                      n_heads=size.n_heads, n_kv_heads=max(1, size.n_heads // 2), ffn_dim=size.ffn,
                      max_seq_len=1024, extra={"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                               "pad_token_id": tok.pad_id})
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    model.save_pretrained(out)
    return model.num_params()


def sample_stage(out, sft_dir, adapter, template, prompts, size, seed, device, dtype):
    # merged: sampling only, so the adapter is folded into the weights and decoding costs what the base does
    model = for_inference(Transformer.from_pretrained(sft_dir, adapter=adapter, device=device, merge=True,
                                                      dtype=resolve_dtype(dtype, torch.device(device))))
    tok = Tokenizer.from_pretrained(sft_dir)
    items = sample_answers(model, tok, resolve_template(sft_dir, template, tok), prompts, k=size.k, max_new_tokens=size.sample_tokens,
                           temperature=1.0, batch_size=32, seed=seed, compile=size.compile and device.startswith("cuda"))
    path = os.path.join(out, "samples.jsonl")
    write_jsonl(path, items)
    return items


def feedback_stage(out, cfg: DemoConfig, items):
    if cfg.llm_base_url:
        judge = EndpointRanker(base_url=cfg.llm_base_url, model=cfg.llm_model_name, api_key=cfg.llm_api_key,
                               cache_path=llm_cache(out, "judge.sqlite"), truncated="last")
        name = f"OpenAI-compatible judge {cfg.llm_model_name}"
    else:
        judge, name = OfflineRanker(truncated="last"), "offline judge (similarity to the doctor's reply)"
    # a small model's answers are often cut by the token limit: rank them below every finished one
    # instead of dropping them, so the reward model still learns from every prompt
    results = judge.rank(items)
    prefs = rankings_to_preferences(items, results)
    write_jsonl(os.path.join(out, "prefs.jsonl"), prefs)
    print(f"{name}: {len(prefs)} usable rankings of {len(items)}")
    return name, prefs


def eval_stage(out, cfg: DemoConfig, size: DemoSize, policy, sft_adapter, trained: dict, rm_dir, template,
               eval_prompts, device):
    """HuatuoGPT's three automatic evaluations of each trained policy (A: PPO, DPO, GRPO) against SFT (B),
    through evaluate.py's API; with a real checkpoint, single-turn questions and reference metrics against
    the base model too (what the whole recipe bought, not only what RL added to SFT). The first policy's
    results keep the plain names (pairwise, dialogue, pairwise_base); the others' carry their name."""
    d = os.path.join(out, "eval")
    answers = os.path.join(d, "answers")  # one answer file per candidate, shared by the comparisons
    qa = os.path.join(d, "qa_heldout.jsonl")
    write_jsonl(qa, [{"id": p["id"], "messages": p["messages"] + [{"role": "assistant", "content": p["reference"]}],
                      "source": "real_doctor_instructions"} for p in eval_prompts])
    online = bool(cfg.llm_base_url)
    judge = dict(judge="endpoint", judge_base_url=cfg.llm_base_url, judge_model_name=cfg.llm_model_name,
                 judge_api_key=cfg.llm_api_key) if online else dict(judge="offline")
    patient = dict(patient="endpoint", patient_base_url=cfg.llm_base_url, patient_model_name=cfg.llm_model_name,
                   patient_api_key=cfg.llm_api_key) if online else dict(patient="offline")
    gen = dict(device=device, dtype=cfg.dtype, batch_size=32, max_new_tokens=size.eval_tokens, seed=cfg.seed,
               answers_dir=answers, overwrite=True, compile=size.compile and device.startswith("cuda"),
               cache=llm_cache(out, "evaluate"))
    # the tiny model's "base" is random weights: nothing to compare against
    others = {"SFT": sft_adapter, **({"base": None} if cfg.model else {})}
    res = {"metrics": {}, "patient": f"{cfg.llm_model_name} (LLM)" if online else "offline stand-in reciting the case"}
    for name, adapter in (*trained.items(), *others.items()):
        res["metrics"][name] = evaluate.run_metrics(evaluate.MetricsConfig(
            out=os.path.join(d, f"metrics_{name.lower()}"), data=[qa], model=policy, adapter=adapter, name=name,
            template=template, **gen))
    for i, (algo, adapter_dir) in enumerate(trained.items()):
        suffix = "" if i == 0 else f"_{algo.lower()}"
        a = dict(a_model=policy, a_adapter=adapter_dir, a_name=algo, a_template=template)
        for name, adapter in (others.items() if i == 0 else [("SFT", sft_adapter)]):
            key = ("pairwise" if name == "SFT" else f"pairwise_{name}") + suffix
            res[key] = evaluate.run_pairwise(evaluate.PairwiseConfig(
                out=os.path.join(d, key), data=os.path.join(DATA, "eval_questions.json"), limit=size.eval_questions,
                bootstrap=200, **a, b_model=policy, b_adapter=adapter, b_name=name, b_template=template, **judge,
                **gen))
        res["dialogue" + suffix] = evaluate.run_dialogue(evaluate.DialogueConfig(
            out=os.path.join(d, "dialogue" + suffix), data=os.path.join(DATA, "eval_dialogues.json"),
            limit=size.eval_cases, max_turns=size.eval_turns, bootstrap=200, **a, b_model=policy,
            b_adapter=sft_adapter, b_name="SFT", b_template=template, **judge, **patient, **gen))
    # real checkpoints: also sampled answers, as PPO samples them (the tiny demo's greedy check suffices there)
    sampled = dict(policy=policy, template=template, adapters={**trained, "SFT": sft_adapter}, k=4, temperature=0.7,
                   max_new_tokens=size.ppo_tokens) if cfg.model else None
    res["rm_heldout"] = rm_heldout(d, list(trained), rm_dir, device, cfg.dtype, cfg.seed, sampled)
    return res


def rm_heldout(d, algos: list[str], rm_dir, device, dtype, seed, sampled: dict | None = None) -> dict:
    """The reward model's scores of each model's greedy answers to prompts RL never saw (the held-out
    doctor prompts and the single-turn questions), in units of its spread on SFT samples as in PPO:
    PPO's own score curve is on its training prompts and, batch by batch, mostly prompt noise.

    sampled: {"policy", "template", "adapters": {name: adapter dir}, "k", "temperature", "max_new_tokens"}:
    also k answers sampled as PPO samples them (its temperature and length) from each model, scored
    the same way ("sampled": per-prompt means, paired differences against SFT, mean answer characters):
    what PPO optimises is the expected score of sampled answers, which a greedy answer may not show."""
    answers = {}  # model name -> {item id: (question, answer)}
    for name in (*algos, "SFT", "base"):
        path = os.path.join(d, f"metrics_{name.lower()}", "answers.jsonl")
        if os.path.exists(path):
            answers[name] = {r["id"]: (r["question"], r["answer"]) for r in read_jsonl(path)}
    for i, algo in enumerate(algos):
        suffix = "" if i == 0 else f"_{algo.lower()}"
        for key, other in (("pairwise", "SFT"), ("pairwise_base", "base")):
            path = os.path.join(d, key + suffix, "pairs.jsonl")
            for p in read_jsonl(path) if os.path.exists(path) else []:
                answers[algo][p["id"]] = (p["prompt"], p["answer_a"])
                answers[other][p["id"]] = (p["prompt"], p["answer_b"])
    ids = sorted(answers[algos[0]])
    rm = load_reward_model(rm_dir, device=device, dtype=dtype)
    unit = rm.spread or 1.0
    scores = {name: (score_texts(rm, [a[i][0] for i in ids], [a[i][1] for i in ids]) / unit).tolist()
              for name, a in answers.items() if all(i in a for i in ids)}
    res = {"n": len(ids), "mean": {k: sum(v) / len(v) for k, v in scores.items()},
           **{f"{algo}_vs_{k}": paired_diff(scores[algo], scores[k], seed=seed)
              for algo in algos if algo in scores for k in ("SFT", "base") if k in scores}}
    if sampled:
        prompts = [{"id": i, "messages": as_messages(answers[algos[0]][i][0]), "reference": ""} for i in ids]
        per_model, chars = sampled_rm_scores(sampled["policy"], sampled["template"], sampled["adapters"], prompts,
                                             rm, sampled["k"], sampled["temperature"], sampled["max_new_tokens"],
                                             device, dtype, seed)
        res["sampled"] = {"k": sampled["k"], "temperature": sampled["temperature"],
                          "mean": {k: sum(v) / len(v) for k, v in per_model.items()}, "chars": chars,
                          **{f"{a}_vs_SFT": paired_diff(per_model[a], per_model["SFT"], seed=seed)
                             for a in algos if a in per_model and "SFT" in per_model}}
    with open(os.path.join(d, "rm_heldout.json"), "w", encoding="utf-8") as f:
        json.dump({**res, "ids": ids, "scores": scores, **({"sampled_scores": per_model} if sampled else {})}, f,
                  indent=1)
    return res


def sampled_rm_scores(policy, template, adapters: dict, prompts: list[dict], rm, k, temperature, max_new_tokens,
                      device, dtype, seed) -> tuple[dict[str, list[float]], dict[str, float]]:
    """({model name: the reward model's mean score of its k sampled answers, per prompt}, {model name: its
    mean answer length in characters}) for each adapter on `policy` (None: the base), scores in units of
    the reward model's spread. prompts: {"id", "messages"}. Every model samples with the same seed; a
    model that cannot answer every prompt (one too long for its context) is left out, as a comparison
    over fewer prompts would not be paired. The lengths go with the scores because a higher score from
    much shorter or longer answers says as much about the reward model's taste in length as about them."""
    tok = Tokenizer.from_pretrained(policy)
    template = resolve_template(policy, template, tok)
    unit = rm.spread or 1.0
    out, chars = {}, {}
    for name, adapter in adapters.items():
        model = for_inference(Transformer.from_pretrained(policy, adapter=adapter, device=device, merge=True,
                                                          dtype=resolve_dtype(dtype, torch.device(device))))
        items = sample_answers(model, tok, template, prompts, k=k, max_new_tokens=max_new_tokens,
                               temperature=temperature, batch_size=32, seed=seed)
        del model
        got = {it["id"]: it["answers"] for it in items}
        if set(got) != {p["id"] for p in prompts}:
            continue
        texts = [a for p in prompts for a in got[p["id"]]]
        sc = (score_texts(rm, [p["messages"] for p in prompts for _ in got[p["id"]]], texts) / unit).tolist()
        chars[name] = sum(map(len, texts)) / len(texts)
        out[name], at = [], 0
        for p in prompts:  # each prompt's mean over its k answers
            n = len(got[p["id"]])
            out[name].append(sum(sc[at:at + n]) / n)
            at += n
    return out, chars


# ----------------------------------------------------------------------------- the run

def run(cfg: DemoConfig | None = None, **kw) -> dict:
    """Run the demo (DemoConfig fields as keywords work too: run(out=..., quick=True)); returns the summary."""
    cfg = replace(cfg or DemoConfig(), **kw)
    if not os.path.isdir(DATA):  # a non-editable install has the package but not the repository's data/
        raise UserError(f"the bundled data is not at {DATA}: run the demo from a clone of the repository "
                        f"(pip install -e . there)")
    if cfg.llm_base_url and not cfg.llm_model_name:
        raise UserError("--llm-base-url needs --llm-model-name NAME (the model the endpoint serves)")
    real = bool(cfg.model)
    device = str(resolve_device(cfg.device))  # checked with or without --model: a typo is refused
    if not real and device != "cpu":  # the tiny model is a CPU demo
        if cfg.device != "auto":
            print(f"note: the tiny demo runs on the CPU; --device {cfg.device} applies with --model")
        device = "cpu"
    try:  # the checkpoint is checked (tokenizer too) and its size read before anything is written
        n_params = (check_model_dir(cfg.model, tokenizer=True), count_params(cfg.model))[1] if real else None
    except ModelDirError as e:
        raise UserError(f"--model: {e}") from None
    profile, size, why = choose_size(cfg, device, n_params)
    dtype_note = ""
    if real and cfg.dtype == "auto" and device == "cpu" and native_bf16():
        # LoRA on a real checkpoint trains as well in bfloat16 (the adapter's weights stay float32),
        # and a CPU with bfloat16 instructions runs a LoRA SFT step about twice as fast as float32
        # (bench/sft.py, docs/benchmarks.md)
        cfg = replace(cfg, dtype="bfloat16")
        dtype_note = " (auto: this CPU has bfloat16 instructions; --dtype float32 to change)"
    print(f"size profile: {profile} ({why}; --size to change){' with --quick' if cfg.quick else ''}: "
          + ("" if not real else f"LoRA r {size.lora_r}, ")
          + f"SFT {size.sft_steps} steps x {size.sft_batch} (lr {size.sft_lr:g}, {size.max_len} tokens), "
          f"{size.rl_prompts} prompts x {size.k} answers, RM lr {size.rm_lr:g}, PPO {size.ppo_steps} steps x "
          f"{size.ppo_batch} (lr {size.ppo_lr:g}), evaluation on {size.eval_questions} questions and "
          f"{size.eval_cases} consultations" + (", gradient checkpointing" if size.grad_checkpointing else "")
          + (", compiled decode" if size.compile and device.startswith("cuda") else "")
          + f"; dtype {str(resolve_dtype(cfg.dtype, torch.device(device))).removeprefix('torch.')}{dtype_note}",
          flush=True)
    out = cfg.out
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)) \
            and not cfg.overwrite:
        raise UserError(f"--out {out} holds something other than an earlier demo run; choose another --out or pass "
                        "--overwrite")
    lock = prepare_out(out, overwrite=True, inputs=cfg)  # an earlier demo run is replaced: every stage starts clean
    try:
        with open(os.path.join(out, MARKER), "w") as f:
            json.dump({"config": asdict(cfg), "profile": profile, "size": asdict(size)}, f, indent=1)
        write_config(out, cfg, "demo")
        return _run(cfg, size, real, out, device, profile, n_params)
    finally:
        lock.release()


def _run(cfg: DemoConfig, size: DemoSize, real: bool, out: str, device: str, profile: str,
         n_params: int | None) -> dict:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    algos = ["ppo", "dpo", "grpo"] if cfg.algo == "all" else [cfg.algo]
    names = [n for n in BUDGET if n not in ("ppo", "dpo", "grpo") or n in algos]
    st = Stages(out, names, cfg.profile)
    rows, sft_files = load_bundled()
    template = "auto" if real else "huatuo"  # the tiny base has no chat template of its own

    def data():
        files = list(sft_files)
        if cfg.llm_base_url:
            files += distill_sources(out, cfg, size, rows)
        print(f"SFT data: {len(rows)} bundled rows in the four sources"
              + (f", plus {len(files) - 4} distilled files" if len(files) > 4 else ""))
        return files
    sft_files = st.run("data", "data: the four HuatuoGPT sources", data)

    base = cfg.model
    if real:
        st.run("base", "base: the real checkpoint (checked before the run)", lambda: None)
    else:
        base = os.path.join(out, "base")
        n_params = st.run("base", "base: tokenizer and a tiny random model", build_base, base, size, rows, cfg.seed)
        print(f"base: {n_params / 1e6:.2f}M parameters, tokenizer of {Tokenizer.from_pretrained(base).vocab_size} "
              "pieces")

    sft_dir = os.path.join(out, "sft")
    sft_cfg = sft.SFTConfig(model=base, data=sft_files, out=sft_dir, template=template, lora_r=size.lora_r,
                            lr=size.sft_lr, max_steps=size.sft_steps, batch_size=size.sft_batch,
                            micro_batch_size=size.sft_micro, max_len=size.max_len,
                            grad_checkpointing=size.grad_checkpointing,
                            eval_every=max(size.sft_steps // max(size.sft_evals - 1, 1), 1),
                            save_every=size.sft_steps, warmup_frac=0.05,
                            seed=cfg.seed, device=device, dtype=cfg.dtype, log_every=max(size.sft_steps // 10, 1))
    sft_res = st.run("sft", "SFT on the four sources", sft.train, sft_cfg)
    # the policy every later stage starts from: the SFT model (tiny), or base + SFT adapter (real)
    policy, sft_adapter = (base, sft_dir) if real else (sft_dir, None)

    real_rows = [r for r in rows if r["source"].startswith("real_doctor")]
    random.Random(cfg.seed).shuffle(real_rows)
    prompts = [to_prompt(r) for r in real_rows]
    eval_prompts, rl_prompts = prompts[:size.eval_prompts], prompts[size.eval_prompts:]
    items = st.run("samples", "K answers per real-doctor prompt", sample_stage, out, policy, sft_adapter, template,
                   rl_prompts[:size.rl_prompts], size, cfg.seed, device, cfg.dtype)

    judge_name, prefs = st.run("feedback", "AI feedback: rank the answers against the doctor's reply",
                               feedback_stage, out, cfg, items)

    rm_dir = os.path.join(out, "rm")
    rm_cfg = reward.RMConfig(model=policy, adapter=sft_adapter, data=[os.path.join(out, "prefs.jsonl")], out=rm_dir,
                             template=template, lora_r=size.lora_r, lr=size.rm_lr, epochs=size.rm_epochs,
                             batch_size=4, max_len=size.max_len, eval_frac=0.2, eval_every=10, device=device,
                             dtype=cfg.dtype, seed=cfg.seed, grad_checkpointing=size.grad_checkpointing)
    rm_res = st.run("rm", "reward model on the rankings", reward.train, rm_cfg)
    # a real checkpoint's reward model is one more adapter on the policy's base weights (PPO shares them
    # when given the directory); the tiny model's is loaded as its own copy, as it always was
    rm = None if real else load_reward_model(rm_dir, device=device)

    rl_path = os.path.join(out, "rl_prompts.jsonl")
    write_jsonl(rl_path, rl_prompts)
    trained, res = {}, {}  # name -> adapter directory; stage -> its summary
    if "ppo" in algos:
        ppo_cfg = ppo.PPOConfig(model=policy, adapter=sft_adapter, reward=rm_dir, data=rl_path,
                                out=os.path.join(out, "ppo"), template=template, max_steps=size.ppo_steps,
                                batch_size=size.ppo_batch, max_new_tokens=size.ppo_tokens, temperature=0.7,
                                lr=size.ppo_lr, kl_coef=size.kl_coef, length_debias=size.length_debias,
                                lam=size.lam, max_prompt_len=size.rl_prompt_len,
                                missing_eos_penalty=size.eos_penalty, ppo_epochs=size.ppo_epochs,
                                num_mini_batches=size.ppo_minibatches, micro_batch_size=size.ppo_micro,
                                grad_checkpointing=size.grad_checkpointing,
                                compile=size.compile and device.startswith("cuda"),
                                sample_every=max(size.ppo_steps // 4, 1), save_every=size.ppo_steps, device=device,
                                dtype=cfg.dtype, seed=cfg.seed)
        res["ppo"] = st.run("ppo", "PPO against the reward model", ppo.train, ppo_cfg, rm)
        trained["PPO"] = ppo_cfg.out
    if "dpo" in algos:  # no reward model: the judge's rankings themselves, against the SFT model
        dpo_cfg = dpo.DPOConfig(model=policy, adapter=sft_adapter, data=[os.path.join(out, "prefs.jsonl")],
                                out=os.path.join(out, "dpo"), template=template, lora_r=size.lora_r or 16,
                                lr=size.dpo_lr, max_steps=size.dpo_steps, batch_size=size.dpo_batch,
                                micro_batch_size=min(4, size.dpo_batch), max_len=size.max_len, eval_frac=0.2,
                                eval_every=max(size.dpo_steps // 2, 1), save_every=size.dpo_steps,
                                grad_checkpointing=size.grad_checkpointing, device=device, dtype=cfg.dtype,
                                seed=cfg.seed)
        res["dpo"] = st.run("dpo", "DPO on the judge's rankings", dpo.train, dpo_cfg)
        trained["DPO"] = dpo_cfg.out
    if "grpo" in algos:  # PPO's rollouts and steps, K answers per prompt instead of a value head
        grpo_cfg = grpo.GRPOConfig(model=policy, adapter=sft_adapter, reward=rm_dir, data=rl_path,
                                   out=os.path.join(out, "grpo"), template=template, max_steps=size.ppo_steps,
                                   batch_size=max(size.ppo_batch // size.k, 1), k=size.k,
                                   max_new_tokens=size.ppo_tokens, max_prompt_len=size.rl_prompt_len,
                                   temperature=0.7, lr=size.ppo_lr,
                                   length_debias=size.length_debias, missing_eos_penalty=size.eos_penalty,
                                   micro_batch_size=size.ppo_micro, grad_checkpointing=size.grad_checkpointing,
                                   compile=size.compile and device.startswith("cuda"),
                                   sample_every=max(size.ppo_steps // 4, 1), save_every=size.ppo_steps,
                                   device=device, dtype=cfg.dtype, seed=cfg.seed)
        res["grpo"] = st.run("grpo", "GRPO against the reward model", grpo.train, grpo_cfg, rm)
        trained["GRPO"] = grpo_cfg.out
    del rm

    ev = st.run("eval", f"HuatuoGPT's evaluation: {', '.join(trained)} against SFT", eval_stage, out, cfg, size,
                policy, sft_adapter, trained, rm_dir, template, eval_prompts, device)

    summary = dict(params=n_params, model=cfg.model or "tiny model trained from scratch", size_profile=profile,
                   sft=sft_res,
                   rm=rm_res, algos=list(trained),
                   **{k: {**{n: v for n, v in r.items() if n != "history"},
                          **(ppo_trend(r["history"]) if k != "dpo" else {}), "stage_seconds": st.seconds[k]}
                      for k, r in res.items()},
                   eval=eval_digest(ev, list(trained)), judge=judge_name, size=asdict(size),
                   machine={"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version(),
                            "device": "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"},
                   online=bool(cfg.llm_base_url))
    summary.update(stage_seconds=dict(st.seconds), seconds=st.total(), profile=st.hot)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(strict_json(summary), f, indent=1, ensure_ascii=False, default=str)
    write_report(out, summary, ev, st.seconds)
    print(f"\ndone in {summary['seconds'] / 60:.1f} min: {os.path.join(out, 'report.md')}")
    return summary


def main(argv=None) -> int:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    return cli_main(run, DemoConfig, argv, prog="demo.py", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
