"""The whole HuatuoGPT recipe end to end on the bundled data, on a CPU, in minutes.

Each stage calls the same code the real scripts call; this module only chains them:

    0. tokenizer: a sentencepiece model trained on the bundled text
    1. base:      a tiny Llama-style Transformer, random weights, saved in the Hugging Face layout
    2. SFT:       sft.train on the four sources (full fine-tuning: a random model has nothing to adapt)
    3. samples:   sampling.sample_answers, K answers per real-doctor prompt
    4. feedback:  the offline judge (or an OpenAI-compatible one) ranks them against the doctor's reply
    5. RM:        reward.train on the rankings
    6. PPO:       ppo.train, policy = SFT model + LoRA, reference = adapters off, value head on the trunk
    7. eval:      SFT vs PPO on held-out prompts (RM score, length, EOS rate), side-by-side answers,
                  one chat turn, report.md with the plots

A tiny model trained from scratch for a few minutes speaks broken Chinese; the point is to watch
every stage work and its numbers move the right way, then run the same scripts on a real model.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, asdict

import torch

from . import ppo, reward, sft
from .chat import reply
from .data import load_conversations, to_prompt, write_jsonl, split_heldout
from .feedback import OfflineJudge, OpenAIJudge, rankings_to_preferences
from .generate import generate_batch, cut_at_stop
from .model import ModelConfig, Transformer
from .sampling import sample_answers
from .templates import render_prompt, stop_strings, stop_token_ids
from .tokenizer import Tokenizer, train_sentencepiece

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SOURCES = ["distilled_instructions", "real_doctor_instructions", "distilled_conversations",
           "real_doctor_conversations"]
TEMPLATE = "huatuo"


@dataclass
class DemoSize:
    vocab: int = 1200
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn: int = 352
    sft_steps: int = 200
    sft_batch: int = 16
    sft_lr: float = 3e-3
    rl_prompts: int = 120  # prompts sampled and judged for the reward model
    k: int = 4
    sample_tokens: int = 96
    rm_epochs: int = 2
    rm_lr: float = 3e-4
    ppo_steps: int = 40
    ppo_batch: int = 16
    ppo_tokens: int = 96
    ppo_lr: float = 3e-4
    kl_coef: float = 0.1
    eval_prompts: int = 32


QUICK = DemoSize(vocab=400, dim=32, n_layers=2, n_heads=4, ffn=64, sft_steps=12, sft_batch=8, rl_prompts=12,
                 k=2, sample_tokens=24, rm_epochs=1, ppo_steps=3, ppo_batch=4, ppo_tokens=24, eval_prompts=4)


def say(msg):
    print(f"\n=== {msg}", flush=True)


def load_bundled():
    rows = []
    for s in SOURCES:
        rows += load_conversations(os.path.join(DATA, f"sft_{s}.jsonl"))
    with open(os.path.join(DATA, "eval_questions.json")) as f:
        questions = json.load(f)
    return rows, questions


def build_base(out, size: DemoSize, rows, seed):
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


def evaluate(policy_dir, adapter, rm, prompts, size, seed, samples=4):
    """Answers of one model to held-out prompts (`samples` per prompt at temperature 0.7), scored.

    "score" is what PPO maximises: the RM score, or the missing-EOS penalty for an answer that
    never stops; "rm_score" is the reward model's score alone.
    """
    model = Transformer.from_pretrained(policy_dir, adapter=adapter)
    tok = Tokenizer.from_pretrained(policy_dir)
    ids = [render_prompt(p["messages"], tok, TEMPLATE) for p in prompts] * samples
    g = generate_batch(model, ids, size.ppo_tokens, temperature=0.7, seed=seed,
                       stop_ids=stop_token_ids(tok, TEMPLATE), stop_strings=stop_strings(TEMPLATE),
                       tokenizer=tok, pad_id=tok.pad_id)
    texts = [cut_at_stop(tok.decode(t), stop_strings(TEMPLATE)).strip() for t in g.tokens]
    rm_scores = reward.score_texts(rm, [p["messages"] for p in prompts] * samples, texts).tolist()
    penalty = ppo.PPOConfig.missing_eos_penalty
    scores = [s if done else penalty for s, done in zip(rm_scores, g.finished)]
    n = len(texts)
    return {"answers": texts[:len(prompts)], "scores": scores[:len(prompts)], "mean_score": sum(scores) / n,
            "mean_rm_score": sum(rm_scores) / n, "mean_length": sum(len(t) for t in g.tokens) / n,
            "eos_rate": sum(g.finished) / n, "answers_scored": n}


def run(out="runs/demo", quick=False, judge_base_url=None, judge_model=None, judge_api_key=None, seed=0):
    size = QUICK if quick else DemoSize()
    t0 = time.time()
    times = {}
    torch.manual_seed(seed)
    random.seed(seed)
    if os.path.exists(out):
        shutil.rmtree(out)  # each demo run starts clean: its stages refuse to overwrite old checkpoints
    os.makedirs(out)
    rows, questions = load_bundled()

    say("0-1. tokenizer and a tiny random base model")
    base = os.path.join(out, "base")
    n_params = build_base(base, size, rows, seed)
    print(f"base: {n_params / 1e6:.2f}M parameters, tokenizer of {Tokenizer.from_pretrained(base).vocab_size} pieces")
    times["base"] = time.time() - t0

    say("2. SFT on the four sources")
    sft_dir = os.path.join(out, "sft")
    sft_cfg = sft.SFTConfig(base=base, data=[os.path.join(DATA, f"sft_{s}.jsonl") for s in SOURCES], out=sft_dir,
                            template=TEMPLATE, lora_r=0, lr=size.sft_lr, max_steps=size.sft_steps,
                            batch_size=size.sft_batch, micro_batch_size=size.sft_batch, max_len=512,
                            eval_every=max(size.sft_steps // 6, 1), save_every=size.sft_steps, warmup_frac=0.05,
                            seed=seed, device="cpu", dtype="float32", log_every=max(size.sft_steps // 20, 1))
    sft_res = sft.train(sft_cfg)
    times["sft"] = time.time() - t0 - sum(times.values())

    say("3. sample K answers per real-doctor prompt")
    real = [r for r in rows if r["source"].startswith("real_doctor")]
    random.Random(seed).shuffle(real)
    prompts = [to_prompt(r) for r in real]
    n_eval = size.eval_prompts
    eval_prompts, rl_prompts = prompts[:n_eval], prompts[n_eval:]
    model = Transformer.from_pretrained(sft_dir)
    tok = Tokenizer.from_pretrained(sft_dir)
    items = sample_answers(model, tok, TEMPLATE, rl_prompts[:size.rl_prompts], k=size.k,
                           max_new_tokens=size.sample_tokens, temperature=1.0, batch_size=32, seed=seed)
    write_jsonl(os.path.join(out, "samples.jsonl"), items)
    del model
    times["sample"] = time.time() - t0 - sum(times.values())

    say("4. AI feedback: rank the answers against the doctor's reply")
    if judge_base_url or judge_model:
        judge = OpenAIJudge(base_url=judge_base_url, model=judge_model, api_key=judge_api_key,
                            cache_path=os.path.join(out, "judge_cache.sqlite"))
        judge_name = f"OpenAI-compatible judge {judge.model}"
    else:
        judge, judge_name = OfflineJudge(), "offline judge (similarity to the doctor's reply)"
    results = judge.rank(items)
    prefs = rankings_to_preferences(items, results)
    prefs_path = os.path.join(out, "prefs.jsonl")
    write_jsonl(prefs_path, prefs)
    print(f"{judge_name}: {len(prefs)} usable rankings of {len(items)}")
    times["feedback"] = time.time() - t0 - sum(times.values())

    say("5. reward model")
    rm_dir = os.path.join(out, "rm")
    rm_res = reward.train(reward.RMConfig(base=sft_dir, data=prefs_path, out=rm_dir, lora_r=0, lr=size.rm_lr,
                                          epochs=size.rm_epochs, batch_prompts=4, max_len=512, eval_frac=0.2,
                                          eval_every=10, device="cpu", dtype="float32", seed=seed))
    rm = reward.load_reward_model(rm_dir, device="cpu")
    times["rm"] = time.time() - t0 - sum(times.values())

    say("6. PPO against the reward model")
    ppo_dir = os.path.join(out, "ppo")
    rl_path = os.path.join(out, "rl_prompts.jsonl")
    write_jsonl(rl_path, rl_prompts)
    ppo_res = ppo.train(ppo.PPOConfig(policy=sft_dir, reward=rm_dir, prompts=rl_path, out=ppo_dir, template=TEMPLATE,
                                      max_steps=size.ppo_steps, batch_size=size.ppo_batch,
                                      max_new_tokens=size.ppo_tokens, temperature=0.7, lr=size.ppo_lr,
                                      kl_coef=size.kl_coef, micro_batch_size=size.ppo_batch,
                                      sample_every=max(size.ppo_steps // 4, 1),
                                      save_every=size.ppo_steps, device="cpu", dtype="float32", seed=seed), rm)
    times["ppo"] = time.time() - t0 - sum(times.values())

    say("7. SFT vs PPO on held-out prompts")
    ev_sft = evaluate(sft_dir, None, rm, eval_prompts, size, seed)
    ev_ppo = evaluate(sft_dir, ppo_dir, rm, eval_prompts, size, seed)
    for name, ev in (("SFT", ev_sft), ("PPO", ev_ppo)):
        print(f"{name}: score {ev['mean_score']:+.3f} (RM alone {ev['mean_rm_score']:+.3f}), "
              f"length {ev['mean_length']:.1f} tokens, EOS rate {ev['eos_rate']:.0%}")
    chat_model = Transformer.from_pretrained(sft_dir, adapter=ppo_dir)
    question = questions[0]["query"]
    chat_answer = reply(chat_model, tok, TEMPLATE, [{"role": "user", "content": question}],
                        max_new_tokens=size.ppo_tokens, temperature=0.0)
    print(f"chat> {question}\n{chat_answer}")
    side = []
    sft_model = Transformer.from_pretrained(sft_dir)
    for q in questions[:3]:
        msgs = [{"role": "user", "content": q["query"]}]
        side.append((q, reply(sft_model, tok, TEMPLATE, msgs, max_new_tokens=size.ppo_tokens, temperature=0.0),
                      reply(chat_model, tok, TEMPLATE, msgs, max_new_tokens=size.ppo_tokens, temperature=0.0)))
    times["eval"] = time.time() - t0 - sum(times.values())

    summary = dict(params=n_params, sft=sft_res, rm=rm_res,
                   ppo={**{k: v for k, v in ppo_res.items() if k != "history"}, **ppo_trend(ppo_res["history"])},
                   eval={"sft": {k: v for k, v in ev_sft.items() if k != "answers"},
                         "ppo": {k: v for k, v in ev_ppo.items() if k != "answers"}},
                   judge=judge_name, seconds=time.time() - t0, stage_seconds=times, size=asdict(size))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False, default=str)
    write_report(out, summary, ev_sft, ev_ppo, eval_prompts, side, question, chat_answer)
    print(f"\ndone in {summary['seconds'] / 60:.1f} min: {os.path.join(out, 'report.md')}")
    return summary


def ppo_trend(history, n=5):
    """Means over the first and last n PPO steps: one step's score is too noisy to read a trend from."""
    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None
    n = max(1, min(n, len(history) // 2))
    head, tail = history[:n], history[-n:]
    return {"trend_steps": n, "score_first": mean(head, "score"), "score_last": mean(tail, "score"),
            "kl_last": mean(tail, "kl"), "kl_max": max((r["kl"] for r in history), default=None),
            "kl_per_token_last": sum(r["kl"] for r in tail) / max(sum(r["response_length"] for r in tail), 1)}


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)


def write_report(out, s, ev_sft, ev_ppo, eval_prompts, side, question, chat_answer):
    sft_r, rm_r, ppo_r = s["sft"], s["rm"], s["ppo"]
    lines = [
        "# nanohuatuo demo report", "",
        "The HuatuoGPT recipe on the bundled illustrative data with a tiny model trained from scratch on a CPU.",
        "Not medical advice: the answers below come from a few-minute toy model.", "",
        f"Model: tiny Llama-style transformer, {s['params'] / 1e6:.2f}M parameters. Judge: {s['judge']}.",
        f"Total time {s['seconds'] / 60:.1f} min (" + ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
        + ").", "",
        "| stage | result |", "|---|---|",
        f"| SFT | held-out loss {_f(sft_r.get('first_eval_loss'))} -> {_f(sft_r.get('eval_loss'))} "
        f"over {sft_r.get('steps')} steps |",
        f"| reward model | held-out pairwise accuracy {_f(rm_r.get('eval_accuracy'), '{:.1%}')} "
        f"({rm_r.get('eval_pairs')} pairs; chance 50%) |",
        f"| PPO | mean RM score {_f(ppo_r.get('score_first'))} -> {_f(ppo_r.get('score_last'))} "
        f"(means of the first and last {ppo_r.get('trend_steps')} of {ppo_r.get('steps')} steps); KL to the SFT "
        f"model {_f(ppo_r.get('kl_last'), '{:.2f}')} nats per answer at the end "
        f"({_f(ppo_r.get('kl_per_token_last'), '{:.3f}')} per token, max {_f(ppo_r.get('kl_max'), '{:.2f}')}) |",
        *[f"| held-out prompts, {name} | score {ev['mean_score']:+.3f} (RM alone {ev['mean_rm_score']:+.3f}), "
          f"length {ev['mean_length']:.1f} tokens, EOS rate {ev['eos_rate']:.0%} ({ev['answers_scored']} answers) |"
          for name, ev in (("SFT", ev_sft), ("PPO", ev_ppo))], "",
        f"The score is what PPO maximises: the reward model's score, or {ppo.PPOConfig.missing_eos_penalty:g} for "
        "an answer that never emits EOS. "
        "RM scores are shifted by the reward model's stored bias, the mean score of the SFT answers it was trained "
        "on (sampled at temperature 1.0); answers sampled at 0.7 are more coherent and score above 0. "
        "KL is summed over an answer's tokens (k1 estimator, at the sampling temperature).", "",
        "## Curves", "",
        "SFT loss: ![sft](sft/loss.png)", "",
        "Reward model: ![rm](rm/metrics.png)", "",
        "PPO: ![ppo](ppo/curves.png) ![ppo stats](ppo/ppo_stats.png)", "",
        "## Side by side (held-out prompts, sampled at temperature 0.7; score in brackets)", "",
    ]
    for p, a, b, sa, sb in list(zip(eval_prompts, ev_sft["answers"], ev_ppo["answers"], ev_sft["scores"],
                                    ev_ppo["scores"]))[:4]:
        lines += [f"**Patient:** {p['messages'][-1]['content']}", "",
                  f"- doctor (reference): {p['reference']}",
                  f"- SFT ({sa:+.2f}): {a}", f"- PPO ({sb:+.2f}): {b}", ""]
    lines += ["## Evaluation questions (greedy)", ""]
    for q, a, b in side:
        lines += [f"**{q['label']}:** {q['query']}", "", f"- SFT: {a}", f"- PPO: {b}", ""]
    lines += ["## One chat turn with the result", "", f"用户> {question}", "", f"助手> {chat_answer}", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--quick", action="store_true", help="a reduced run in under a minute (what the test runs)")
    ap.add_argument("--judge-base-url", help="use an OpenAI-compatible judge at this base URL")
    ap.add_argument("--judge-model", help="the judge's model name")
    ap.add_argument("--judge-api-key", help="API key (default: OPENAI_API_KEY)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    run(args.out, args.quick, args.judge_base_url, args.judge_model, args.judge_api_key, args.seed)


if __name__ == "__main__":
    main(sys.argv[1:])
