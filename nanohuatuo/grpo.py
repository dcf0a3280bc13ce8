"""GRPO (and RLOO) with LoRA: RL without a critic, from K answers per prompt, on one copy of the base.

    python train_grpo.py --model BASE --adapter SFT_ADAPTER --reward RM_DIR --data p.jsonl --out out/grpo
    grpo.train(GRPOConfig(...), reward_fn=None) -> dict        # the same shape as ppo.train's

Top to bottom: `GRPOConfig`; the rewards (a reward model, a `--reward-fn module:function`, or a
judge behind an OpenAI-compatible endpoint); the rollout (`make_group_rollout`: K answers per
prompt, scored, turned into group-relative advantages); the update (`grpo_update`); checkpoints
and export; the loop. The maths is in losses.py (`group_advantages`, `kl_k3`, `grpo_loss`), the
policy on its base, the prompts and the sampling in rollout.py, shared with PPO.

Per step: `--batch-size` prompts, each answered `--k` times by the continuous-batching engine (the
K copies of a prompt are prefilled once and share its keys), scored; each answer's advantage is
its score against its group's: GRPO (r - mean) / (std + eps), or without the std (Dr. GRPO,
`--no-scale-rewards`), or RLOO (r - the mean of the other K - 1, `--advantage rloo`). The loss is
the token-level clipped surrogate plus `--beta` times the k3 KL to the reference (the SFT model:
adapters off, no second copy). With one update per rollout (`--num-iterations 1`, the default) the
sampling policy is the current one, so its log-probs come from the update's own forward: a step
costs the generation, one reference forward (none with --beta 0) and one forward + backward.

Rewards: a LoRA reward model from train_rm.py on the same base and SFT adapter is one more adapter
+ head on the same weights (reward_model.share_base), its scores in units of its spread on
SFT-like answers as in PPO; `--reward-fn module:function` (or path/to/file.py:function) is called
as function(prompts, responses, rows, texts) -> one float per answer (rows[i]["ended"]: whether answer i
stopped on its own); `--judge-base-url` + `--judge-model-name` asks a judge to rank each prompt's K
answers with the doctor's reply as reference (feedback.py's question, rank_prompt.py), an answer's
score being 1 for the best down to 0 for the worst (a group the judge could not rank scores 0.5
throughout: no gradient). An answer that never stops scores `--missing-eos-penalty` (so the judge
ranks only the others, and is not asked about a group with fewer than two).

Export (--out) and checkpoints as PPO: the adapter for the ORIGINAL base (SFT (+) GRPO when the SFT
adapter was merged), metrics.jsonl, samples.jsonl, curves.png; `--resume` continues exactly (the
same weights as an uninterrupted run). Distributed: every rank rolls out its share of each step's
prompts, gradients averaged with one all-reduce.
"""

import dataclasses
import importlib
import importlib.util
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

from . import adapters, checkpoint, dist
from .cli import (ExportFlags, LoRAFlags, ModelFlags, TrainLoopFlags, UserError, arg, cli_main, endpoint_flags, like,
                  prepare_out, resolve_dtype)
from .heap import return_large_blocks
from .llm import cache_file, from_flags
from .lora import load_adapter, lora_modules, lora_parameters, save_adapter
from .losses import group_advantages, grpo_loss, kl_k3, length_debias, response_forward
from .metrics import REPORT_TO_HELP, check_report_to, plot_metrics
from .quant import QUANT_HELP, QUANTS
from .rank_prompt import build_judge_messages, nudge_message, ranking_parser, shown_order
from .reward_model import Scorer, reward_scorer, share_base
from .rollout import (Batch, answer_texts, chat_setup, end_of_step, load_prompts, open_run_log, pack, policy_model,
                      prompt_indices, reference, sample_answers, score_scale, write_samples)
from .templates import save_chat_template


def _penalty(text: str):
    return None if text.lower() in ("none", "off") else float(text)


@dataclass
class GRPOConfig(ExportFlags, TrainLoopFlags, LoRAFlags, ModelFlags,
                 endpoint_flags("judge", "judge reward (ranks each prompt's K answers against the doctor's reply)",
                                old={"base_url": ("--base-url",), "model_name": ("--model-name",),
                                     "api_key": ("--api-key",)})):
    # what to train on
    adapter: str | None = arg(None, "SFT LoRA adapter on --model (merged into the weights, then a fresh GRPO LoRA)")
    continue_adapter: bool = arg(False, "keep training the SFT adapter itself instead of a fresh GRPO LoRA")
    data: str = arg("", "prompts, JSONL: schema conversations (last assistant turn dropped: the doctor's reply, the "
                        "judge's reference) or prompt records", metavar="FILE")
    out: str = like(TrainLoopFlags, "out", "out/grpo", "output directory: adapter, metrics.jsonl, samples.jsonl, "
                                                        "plots, checkpoints/")
    max_prompt_len: int = arg(512, "longer prompts are skipped", bounds="[1, inf)")
    # the reward: one of --reward, --reward-fn, --judge-base-url
    reward: str | None = arg(None, "reward model directory (train_rm.py, or a released HuatuoGPT/Ziya RM)")
    reward_fn: str | None = arg(None, "rule reward: module:function or path/file.py:function, called as "
                                      "function(prompts, responses, rows, texts) -> one float per answer",
                                metavar="MODULE:FUNCTION")
    reward_template: str = arg("auto", "chat template the reward model scores in: auto (the one train_rm.py "
                                       "recorded, else the RM directory's own), or a name")
    reward_norm: str = arg("std", "std: reward-model scores in units of their spread on SFT-like answers; "
                                  "none: as the RM gives them", choices=["std", "none"])
    cache: str | None = arg(None, "judge reward: SQLite cache of the judge's replies (default: OUT/judge_cache.sqlite; "
                                  "'none': off)")
    concurrency: int = arg(4, "judge reward: requests in flight", bounds="[1, inf)")
    # rollouts
    max_steps: int | None = like(TrainLoopFlags, "max_steps", None, "GRPO steps (default: one pass over the prompts)")
    batch_size: int = like(TrainLoopFlags, "batch_size", 8, "prompts per step, over all processes (each answered "
                                                            "--k times)")
    k: int = arg(4, "answers sampled per prompt: the group its advantages are relative to", bounds="[1, inf)")
    max_new_tokens: int = arg(256, "answer length limit", bounds="[1, inf)")
    temperature: float = arg(0.7, "sampling temperature (top_k 0, top_p 1)", bounds="(0, inf)")
    rollout_batch_size: int = arg(0, "prompts generated at once per process (times --k rows); 0: all of them",
                                  bounds="[0, inf)")
    missing_eos_penalty: float | None = arg(-1.0, "score of an answer that never stops ('none' keeps its score)",
                                            parse=_penalty)
    length_debias: float = arg(0.0, "remove COEF times the batch's linear dependence of the score on answer length "
                                    "(1: all of it; 0: off)", bounds="[0, inf)")
    # GRPO
    advantage: str = arg("grpo", "grpo: score - group mean (over the group's std with --scale-rewards); "
                                 "rloo: score - mean of the other K-1 answers", choices=["grpo", "rloo"])
    scale_rewards: bool = arg(True, "divide the advantages by the group's score std (--no-scale-rewards: Dr. GRPO)")
    beta: float = arg(0.04, "weight of the k3 KL to the reference policy in the loss (0: no reference forward)",
                      bounds="[0, inf)")
    clip_range: float = arg(0.2, "policy ratio clip", bounds="(0, inf)")
    num_iterations: int = arg(1, "updates per rollout batch (1: on-policy, the ratio is 1 and needs no old forward)",
                              bounds="[1, inf)")
    micro_batch_size: int = like(TrainLoopFlags, "micro_batch_size", 8, "rows (answers) per forward/backward; a "
                                                                        "step's gradients accumulate over these")
    max_log_ratio: float = arg(20.0, "log-ratios are clamped to +-this before exp", bounds="(0, inf)")
    # optimisation
    lr: float = arg(5e-5, "learning rate of the LoRA (as PPO's: see ppo.py's module doc)", bounds="(0, inf)")
    adam_eps: float = arg(1e-5, "Adam epsilon", bounds="(0, inf)")
    anneal_lr: bool = arg(False, "decay the learning rate linearly to 0 at --max-steps")
    lora_r: int = like(LoRAFlags, "lora_r", 16, "rank of the GRPO LoRA")
    lora_alpha: float = like(LoRAFlags, "lora_alpha", 32.0)
    # run
    quant: str = arg("none", QUANT_HELP, choices=list(QUANTS))
    compile: bool = arg(False, "torch.compile the decode step (CUDA graphs on CUDA; fused element-wise ops on CPU)")
    seed: int = arg(0, "seed of the LoRA init, the prompt order and the rollouts")
    sample_every: int = arg(10, "print and save sample answers every N steps (0: never)", bounds="[0, inf)")
    report_to: list[str] = arg([], REPORT_TO_HELP, metavar="TRACKER")
    save_every: int = like(TrainLoopFlags, "save_every", 50)

    def check(self):
        if not self.model or not self.data:
            raise UserError("GRPO needs --model (model directory) and --data (prompts JSONL)")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: GRPO samples, so it must be > 0")
        if self.k < 2:
            raise UserError(f"--k {self.k}: group-relative advantages need at least 2 answers per prompt")
        if self.continue_adapter and not self.adapter:
            raise UserError("--continue-adapter needs --adapter (the SFT adapter to keep training)")
        if sum(bool(x) for x in (self.reward, self.reward_fn, self.judge_base_url)) > 1:
            raise UserError("give one reward: --reward (a reward model), --reward-fn (a function) or "
                            "--judge-base-url (a judge endpoint)")
        if self.num_iterations < 1 or self.micro_batch_size < 1:
            raise UserError("--num-iterations and --micro-batch-size must be at least 1")


# ============================================================================= rewards

def load_function(spec: str):
    """`module:function` (importable, the working directory first) or `path/file.py:function`."""
    name, sep, fn_name = spec.rpartition(":")
    if not sep or not name or not fn_name:
        raise UserError(f"--reward-fn {spec!r}: write it as module:function or path/to/file.py:function")
    try:
        if name.endswith(".py"):
            if not os.path.isfile(name):
                raise UserError(f"--reward-fn: {name} does not exist")
            loaded = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"--reward-fn {spec!r}: cannot import {name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"--reward-fn {spec!r}: {name} has no function {fn_name}")
    return fn


def judge_reward(cfg: GRPOConfig, k: int):
    """fn(prompts, responses, rows, texts) -> scores: each prompt's K answers (consecutive rows) ranked
    by the judge at --judge-base-url against the doctor's reply; best 1, worst 0, unranked groups 0.5.
    With --missing-eos-penalty, answers that never stopped (rows[i]["ended"] False) get the penalty
    whatever they score, so only the others are ranked, and a group with fewer than two is not asked."""
    llm = from_flags(cfg, "judge", cache=cache_file(cfg.cache, os.path.join(cfg.out, "judge_cache.sqlite")),
                     progress_every=0)
    stats = {"unranked": 0, "not asked": 0}

    def fn(prompts, responses, rows, texts):
        requests, parses, followups, ranked = [], [], [], []
        for g in range(0, len(texts), k):
            row = rows[g]
            if not row.get("reference"):
                raise UserError(f"{cfg.data}: prompt {row['id']} has no doctor's reply (a last assistant turn "
                                f"or 'reference'), which the judge compares the answers with")
            keep = [j for j in range(k) if cfg.missing_eos_penalty is None or rows[g + j].get("ended", True)]
            if len(keep) < 2:  # nothing to rank: the judge's reply would be paid for and not used
                stats["not asked"] += 1
                continue
            n = len(keep)
            item = {"question": row["messages"], "reference": row["reference"], "answers": [texts[g + j] for j in keep]}
            order = shown_order(str(row["id"]), n, cfg.seed)
            requests.append({"messages": build_judge_messages(item, order), "temperature": 0.0, "max_tokens": 1024})
            parses.append(ranking_parser(n))
            followups.append(lambda messages, text, reason, n=n: messages + [{"role": "assistant", "content": text},
                                                                             nudge_message(n)])
            ranked.append((g, [keep[i] for i in order]))  # shown position -> answer within the group
        scores = [0.5] * len(texts)
        for (g, shown), a in zip(ranked, llm.map(requests, parse=parses, followup=followups, desc="judge")):
            if not a.ok:
                stats["unranked"] += 1
                continue
            for place, position in enumerate(a.value):
                scores[g + shown[position]] = 1.0 - place / (len(shown) - 1)
        return scores
    fn.llm, fn.stats = llm, stats
    return fn


def make_reward(reward_fn, model, ref_lora, cfg: GRPOConfig, tok, template, d, dtype) -> Scorer:
    """reward_fn (a function or a RewardModel) if given, else --reward-fn, --base-url or --reward."""
    if reward_fn is None:
        if cfg.reward_fn:
            reward_fn = load_function(cfg.reward_fn)
        elif cfg.judge_base_url:
            reward_fn = judge_reward(cfg, cfg.k)
        elif not cfg.reward:
            raise UserError("no reward: pass --reward DIR (a reward model), --reward-fn MODULE:FUNCTION or "
                            "--judge-base-url URL --judge-model-name NAME (a judge)")

    def share():  # the reward model as one more adapter + head on the policy's base, or (None, why)
        layers = dict(lora_modules(model))
        ref = None if ref_lora is None else {n: (a, b, layers[n].scaling) for n, (a, b) in ref_lora.items()}
        return share_base(cfg.reward, model, cfg.model, cfg.adapter, tok, cfg.reward_template, stack_first=ref)
    return reward_scorer(reward_fn or cfg.reward, tok, template, share=share, device=d.device, dtype=dtype,
                         reward_template=cfg.reward_template, say=print if d.main else lambda *a: None,
                         quant=cfg.quant)


# ============================================================================= the rollout

@dataclass
class GroupRollout(Batch):
    """One step's answers, K per prompt (consecutive rows), with what the update needs."""
    ref_logp: torch.Tensor | None  # (B, R) the reference's log-probs; None with beta 0
    old_logp: torch.Tensor | None  # (B, R) the sampling policy's; None with one update per rollout
    advantages: torch.Tensor  # (B,) one per answer
    scores: torch.Tensor  # (B,)
    texts: list[str]
    metrics: dict


@torch.no_grad()
def make_group_rollout(model, ref_lora, cfg: GRPOConfig, prompts, rows, reward: Scorer, scale, tok, stops,
                       stop_strs, end_id, seed, d) -> GroupRollout:
    """K answers to each prompt, their scores and group-relative advantages, and the log-probs the loss needs."""
    device = model.embed_tokens.weight.device
    model.eval()
    k = cfg.k
    prompts = [p for p in prompts for _ in range(k)]  # K copies in a row: the engine prefills each prompt once
    rows = [r for r in rows for _ in range(k)]
    chunk = cfg.rollout_batch_size * k
    answers, gen_logp, cut = sample_answers(model, prompts, cfg.max_new_tokens, cfg.temperature, tok, stops,
                                            stop_strs, end_id, seed, chunk, cfg.compile)
    b = pack(prompts, answers, stops, tok.pad_id, device)
    B, R = b.mask.shape
    maskf = b.mask.float()
    responses, texts = answer_texts(b, tok, stops, stop_strs, end_id)  # cut by the limit: closed, as an RM reads
    # each answer's row says whether it stopped on its own (a judge need not rank what the penalty replaces)
    rows = [{**r, "ended": bool(e)} for r, e in zip(rows, b.ended.tolist())]
    scores = reward(prompts, responses, rows, texts).to(device)
    if scale is not None:
        scores = scale(scores, d)
    raw = scores.clone()
    scores, slope = length_debias(scores, b.mask.sum(-1), cfg.length_debias)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(b.ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    advantages = group_advantages(scores, k, cfg.advantage, cfg.scale_rewards)

    ref_logp = old_logp = None
    if cfg.beta or cfg.num_iterations > 1:
        ref_logp = torch.zeros(B, R, device=device) if cfg.beta else None
        old_logp = torch.zeros(B, R, device=device) if cfg.num_iterations > 1 else None
        for idx in torch.arange(B, device=device).split(cfg.micro_batch_size):
            ids, attn, p, r = b.rows(idx)
            if old_logp is not None:
                old_logp[idx, :r] = response_forward(model, ids, attn, p, cfg.temperature)[0]
            if ref_logp is not None:
                with reference(model, ref_lora):
                    ref_logp[idx, :r] = response_forward(model, ids, attn, p, cfg.temperature)[0]
    # KL to the reference of the answers as sampled (the engine's log-probs are the policy's, to
    # float rounding), over the sampled tokens: not an end token put in place of a stop string
    sampled, drawn = torch.zeros(B, R, device=device), maskf.clone()
    for i, lp in enumerate(gen_logp):
        n = min(len(lp), R) if cut[i] is None else cut[i]
        sampled[i, :n] = torch.tensor(lp[:n])
        drawn[i, n:] = 0
    group = scores.view(-1, k)
    metrics = {
        "score": scores.mean().item(),
        "rm_score": raw.mean().item(),
        "length_slope": slope,
        "score_std": group.std(-1).mean().item(),  # within a group: what the advantages are made of
        "zero_std_frac": (group.std(-1) < 1e-6).float().mean().item(),  # groups that teach nothing
        # per answer, summed over its tokens (PPO's "kl"); not measured without a reference forward (--beta 0)
        "kl": (kl_k3(sampled, ref_logp) * drawn).sum(-1).mean().item() if ref_logp is not None else float("nan"),
        "response_length": maskf.sum(-1).mean().item(),
        "eos_rate": b.ended.float().mean().item(),
    }
    return GroupRollout(**vars(b), ref_logp=ref_logp, old_logp=old_logp, advantages=advantages, scores=scores,
                        texts=texts, metrics=metrics)


# ============================================================================= the update

def grpo_update(model, cfg: GRPOConfig, exp: GroupRollout, optimizer, params, d) -> dict:
    """--num-iterations optimizer steps, each over all of the step's answers in micro-batches (the
    loss a mean over all their tokens); returns the mean of the update stats."""
    model.train()  # only enables gradient checkpointing: dropout is off everywhere
    model.grad_checkpointing = cfg.grad_checkpointing
    B = exp.mask.shape[0]
    n_tok = dist.all_sum(exp.mask.sum().item(), d) / d.world  # so every rank's tokens weigh the same
    sums = {}
    for _ in range(cfg.num_iterations):
        acc = dict.fromkeys(("loss", "clipfrac", "ref_kl", "ratio"), 0.0)
        for idx in torch.arange(B, device=exp.mask.device).split(cfg.micro_batch_size):
            ids, attn, p, r = exp.rows(idx)
            mask = exp.mask[idx, :r].float()
            logp = response_forward(model, ids, attn, p, cfg.temperature)[0]
            old = exp.old_logp[idx, :r] if exp.old_logp is not None else logp.detach()
            ref = exp.ref_logp[idx, :r] if exp.ref_logp is not None else None
            loss, st = grpo_loss(logp, old, ref, exp.advantages[idx], mask, cfg.clip_range, cfg.beta,
                                 cfg.max_log_ratio, denom=torch.tensor(max(n_tok, 1.0)))
            loss.backward()
            w = mask.sum().item() / max(n_tok, 1.0)
            acc["loss"] += loss.item()
            acc["clipfrac"] += st["clipfrac"].item() * w
            # the k3 KL to the reference per token, as the update sees it (PPO's approx_kl is to the sampling
            # policy: another number); NaN without a reference (--beta 0)
            acc["ref_kl"] += st["kl"].item() * w
            acc["ratio"] += st["ratio"].item() * w
        dist.all_reduce_grads(params, d)
        acc = dist.all_mean(acc, d)
        acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for key, val in acc.items():
            sums[key] = sums.get(key, 0.0) + val / cfg.num_iterations
    model.eval()
    model.grad_checkpointing = False
    return sums


# ============================================================================= checkpoints and export

# settings a resumed run must keep: the checkpoint's tensors would not fit the others
FIXED = ("model", "adapter", "continue_adapter", "lora_r", "lora_alpha", "lora_targets", "quant")
# settings that change nothing a resumed run computes
BOOKKEEPING = {"resume", "overwrite", "stop_after", "sample_every", "save_every", "keep_checkpoints", "device",
               "out", "save_merged", "judge_api_key", "cache", "concurrency", "report_to"}


def save_checkpoint(model, cfg: GRPOConfig, optimizer, state: dict, d) -> None:
    checkpoint.save(cfg.out, state["step"], cfg.keep_checkpoints, d, dataclasses.asdict(cfg), optimizer,
                    lambda tmp: save_adapter(model, tmp / "policy"), **{k: v for k, v in state.items() if k != "step"})


def load_checkpoint(model, cfg: GRPOConfig, path, optimizer, d) -> dict:
    """Restore what save_checkpoint wrote; returns the loop's state (a changed FIXED setting is refused)."""
    state, _ = checkpoint.read_resume(path, dataclasses.asdict(cfg), FIXED, BOOKKEEPING,
                                      say=print if d.main else lambda *a: None)
    load_adapter(model, path / "policy", trainable=True)
    model.eval()
    checkpoint.restore(path, optimizer, d, lrs=(cfg.lr,))
    return state


PLOTS = {"curves.png": ["score", "kl", "response_length", "eos_rate"],
         "grpo_stats.png": ["score_std", "zero_std_frac", "ref_kl", "clipfrac", "grad_norm"]}


def _plot(out, path):
    for name, keys in PLOTS.items():
        plot_metrics(path, os.path.join(out, name), keys, title="GRPO")


# ============================================================================= the loop

def train(cfg: GRPOConfig, reward_fn=None) -> dict:
    """Run GRPO; returns the last step's metrics plus first/last score and KL, steps, out, seconds
    and the per-step history (ppo.train's shape).

    reward_fn(prompts, responses, rows, texts) -> one score per answer (K consecutive answers per
    prompt), or a loaded `reward_model.RewardModel`; None: cfg.reward_fn, cfg.judge_base_url or cfg.reward.
    """
    cfg.check()
    check_report_to(cfg.report_to)  # a missing tracker package is said now, not after the models load
    return dist.run(cfg.device, lambda d, hold: _train(cfg, reward_fn, d, hold))


def _train(cfg: GRPOConfig, reward_fn, d, hold) -> dict:
    started = time.time()
    if cfg.batch_size % d.world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    local = cfg.batch_size // d.world
    dtype = resolve_dtype(cfg.dtype, d.device)
    if d.device.type == "cpu":
        return_large_blocks()  # the update's freed activations go back to the OS instead of fragmenting the heap
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank
    random.seed(cfg.seed)
    tok, template, stops, stop_strs, end_id = chat_setup(cfg.model, cfg.template, cfg.adapter)
    rows, prompts = load_prompts(cfg.data, tok, template, cfg.max_prompt_len)
    model, ref_lora, sft = policy_model(cfg.model, cfg.adapter, cfg.continue_adapter, cfg.lora_r, cfg.lora_alpha,
                                        cfg.lora_targets, device=d.device, dtype=dtype, quant=cfg.quant,
                                        compile=cfg.compile)
    hold.enter_context(prepare_out(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, main_process=d.main,
                                   inputs=cfg))
    out = cfg.out
    reward = make_reward(reward_fn, model, ref_lora, cfg, tok, template, d, dtype)
    params = lora_parameters(model)
    optimizer = torch.optim.Adam([{"params": params, "lr": cfg.lr}], eps=cfg.adam_eps)
    max_steps = cfg.max_steps or math.ceil(len(rows) / cfg.batch_size)

    state = {"step": 0, "data_pos": 0, "score_scale": None}
    ckpt = checkpoint.resume_from(out, cfg.resume, print if d.main else lambda *a: None)
    if ckpt:
        state = load_checkpoint(model, cfg, ckpt, optimizer, d)
        if d.main:
            print(f"resumed from {ckpt} (step {state['step']})")
    scale = score_scale(reward, cfg, state, d)
    log = open_run_log(cfg, "grpo", bool(ckpt), state["step"], max_steps, d, hold)
    history, clock = [], {"plot": time.time()}
    # the checks above passed and training begins: the outputs of an earlier run stop looking like this one's
    if cfg.resume and d.main:
        checkpoint.unfinish(out)
    for step in range(state["step"] + 1, max_steps + 1):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.lr * (1 - (step - 1) / max_steps)
        idx = prompt_indices(len(rows), state["data_pos"], cfg.batch_size, cfg.seed)[d.rank * local:(d.rank + 1) * local]
        step_seed = (cfg.seed * 1_000_003 + step) * 1009 + d.rank  # rollouts reproducible on resume
        t0 = time.time()
        exp = make_group_rollout(model, ref_lora, cfg, [prompts[i] for i in idx], [rows[i] for i in idx], reward,
                                 scale, tok, stops, stop_strs, end_id, step_seed, d)
        t1 = time.time()
        stats = grpo_update(model, cfg, exp, optimizer, params, d)
        t2 = time.time()
        metrics = dist.all_mean(exp.metrics, d)
        state.update(step=step, data_pos=state["data_pos"] + cfg.batch_size,
                     score_scale=None if scale is None or scale.scale is None else [scale.shift, scale.scale])
        row = {**metrics, **stats, "lr": optimizer.param_groups[0]["lr"], "rollout_s": t1 - t0, "update_s": t2 - t1,
               "tokens": int(exp.mask.sum().item()) * d.world}
        history.append(log.write(step, **row) if d.main else dict(row, step=step))
        if d.main and cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            write_samples(out, step, [{"step": step, "prompt": tok.decode(prompts[i]), "response": exp.texts[j * cfg.k],
                                       "score": exp.scores[j * cfg.k].item(),
                                       "advantage": exp.advantages[j * cfg.k].item()} for j, i in enumerate(idx[:2])], log)
        if end_of_step(step, max_steps, cfg, lambda: save_checkpoint(model, cfg, optimizer, state, d),
                       lambda: _plot(out, log.path), d, clock):
            return {"steps": step, "stopped": True, "out": out, "history": history, "seconds": time.time() - started}

    if getattr(reward.fn, "llm", None) is not None and d.main:
        st = reward.fn.stats
        print(reward.fn.llm.summary() + f"; {st['unranked']} groups unranked (scored 0.5), {st['not asked']} not "
              f"asked (fewer than two answers that stopped)")
    if d.main:
        save_chat_template(out, tok, template)  # first: the adapter's files mark the directory done
        adapters.save_on_base(model, out, merged=sft)  # for the original base: SFT (+) GRPO when merged
        if os.path.exists(log.path) and os.path.getsize(log.path):
            _plot(out, log.path)
        if cfg.save_merged:  # merges the LoRA layers away (a 4-bit base: onto a fresh full one): last
            adapters.save_merged(out, cfg.model, tok, template, model=model if cfg.quant == "none" else None,
                                 dtype=dtype)
        print(f"wrote the policy adapter to {out} (load with --model {cfg.model} --adapter {out})")
    dist.barrier(d)
    summary = dict(history[-1]) if history else {}
    if history:
        summary.update(first_score=history[0]["score"], last_score=history[-1]["score"],
                       first_kl=history[0]["kl"], last_kl=history[-1]["kl"])
    summary.update(steps=len(history), out=out, history=history, stopped=False, seconds=time.time() - started)
    return summary


def main(argv=None) -> int:
    return cli_main(train, GRPOConfig, argv, prog="train_grpo.py", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    dist.exit_process(main())
