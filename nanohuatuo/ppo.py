"""PPO with LoRA: RL from a reward model on the SFT policy, with one copy of the base weights.

    python train_ppo.py --model BASE --adapter SFT_ADAPTER --reward RM_DIR --prompts p.jsonl --out out/ppo
    ppo.train(PPOConfig(...), reward_fn=None) -> dict

Top to bottom: `PPOConfig`; the maths as small pure functions on (B, R) response tensors
(`compute_rewards`, `gae`, `policy_loss`, `value_loss`, ...); the models (`build_models`,
`reference`, `critic`); the rewards; the rollout (`make_experience` -> a `Rollout`); the update
(`ppo_update`); checkpoints and export; the loop. One layer down: rollout.py (the prompt file and
its order, the policy on one base with its reference, sampled answers, a `Batch` of prompts +
responses cut at their stop token, the texts a reward reads; shared with GRPO), losses.py
(`response_forward`, `whiten`, masked statistics, `length_debias`), reward_model.py (scoring a
rollout, `ScoreScale`, answers ending on their end token), checkpoint.py and adapters.py (the
export).

One base serves everything:
- Policy = base + the SFT adapter merged into the weights + a fresh PPO LoRA (B = 0, so step 0 is
  the SFT model) on every attention and MLP linear of the family (SFT's targets). Merging first
  means the reference is simply "adapters off". `continue_adapter` keeps training the SFT adapter
  itself; the reference then runs with a frozen copy of its tensors (a few MB).
- Value: a zero-initialised fp32 head on the policy's last hidden state (V = 0 at first, so the
  first advantages are the whitened rewards), its gradient reaching the policy LoRA scaled by
  vf_coef; or `critic="separate"`: its own LoRA tensors and head on the same base (one more trunk
  forward per rollout micro-batch and forward + backward per update micro-batch); or
  `critic="reward"`: the same, started from the reward model's adapter and head (as DeepSpeed-Chat
  and OpenRLHF start their critic from the reward model), the head rescaled to PPO's score units.
  Its first values are the reward model's scores of the prompt and the answer so far: a per-prompt
  baseline from step 1 where the reward model reads partial answers sensibly. A reward model trained
  only at the end token may not: on a 135M checkpoint with a weak reward model (61% held-out
  accuracy) the first rollout's value explained variance was -54 (values off by ~6 score units
  mid-answer), worse than the zero critic's 0, so it is an option, not the default.
- Reward: a LoRA reward model from train_rm.py on the same base and SFT adapter is one more
  adapter + head on the same weights (`reward_model.share_base`); any other reward model is loaded
  as its own model, with a printed line saying why it could not share. Or pass `reward_fn` to `train`.

Scores: the reward model reads the answer up to its end token. An answer that stops on a stop
*string* is cut before it and given the template's end token (the cut tokens leave the rollout),
so it is scored, and learned, as the answer the reward model was trained on. An answer that
never stops scores `missing_eos_penalty`. With a reward model, scores are in units of its spread
on SFT-like answers (`reward_norm std`: divided by the std train_rm.py stored; for a released RM
without statistics, bias and std are estimated on the first rollout batch and logged), so the
penalty and kl_coef mean the same on any reward model. `length_debias` (off by default) takes the
batch's linear dependence of the score on answer length out, so a scorer that likes short (or
long) answers cannot be won by changing the length alone. `k` > 1 answers a prompt K times and
gives each answer its lead over the mean of the other K-1 (the RLOO baseline of Ahmadian et al.
2024) before the KL and the critic: a reward model's level differs from prompt to prompt by about
as much as its answers to one prompt differ (on the 135M demo run, std 0.79 across prompts, 0.70
within), and a critic learns that level too slowly for a short run, so with one answer a prompt
the advantages mostly say which prompts were drawn.

Export (--out): the policy adapter in PEFT layout with the value head in extra.safetensors, for the
ORIGINAL base: with a merged SFT adapter it is the exact concatenation SFT (+) PPO, a rank r1 + r2
adapter with scaling 1 (adapters.save_on_base). A critic of its own goes to OUT/critic, the same
way (SFT (+) critic, its head in extra.safetensors). `--save-merged` also writes OUT/merged.

Learning rate: 5e-5 by default: a LoRA update moves the weights much less per step than a
full-weight one (1e-6..1e-5), and we stay below the 1e-4 at which medical LoRAs erode general
ability. Distributed: every rank rolls out its share of each step's prompts, gradients of the
small trainable tensors are averaged with one all-reduce, logged metrics averaged over ranks.
"""

import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import adapters, checkpoint, dist
from .cli import (ExportFlags, LoRAFlags, ModelFlags, TrainLoopFlags, UserError, arg, cli_main, like, prepare_out,
                  resolve_dtype)
from .lora import load_adapter, lora_modules, lora_parameters, save_adapter
from .losses import group_advantages, length_debias, masked_mean, masked_var, response_forward, whiten
from .metrics import REPORT_TO_HELP, check_report_to, plot_metrics
from .model import Transformer
from .quant import QUANT_HELP, QUANTS
from .reward_model import RewardModel, Scorer, reward_scorer, share_base
from .rollout import (Batch, answer_texts, chat_setup, end_of_step, load_prompts, open_run_log, pack, policy_model,
                      prompt_indices, sample_answers, score_scale, write_samples)
from .rollout import reference as rollout_reference
from .templates import save_chat_template


def _penalty(text: str):
    return None if text.lower() in ("none", "off") else float(text)


@dataclass
class PPOConfig(ExportFlags, TrainLoopFlags, LoRAFlags, ModelFlags):
    # what to train on
    model: str = like(ModelFlags, "model", help="base model directory (Hugging Face layout, with the tokenizer)")
    adapter: str | None = arg(None, "SFT LoRA adapter on --model (merged into the weights, then a fresh PPO LoRA)")
    continue_adapter: bool = arg(False, "keep training the SFT adapter itself instead of a fresh PPO LoRA")
    reward: str | None = arg(None, "reward model directory (train_rm.py, or a released HuatuoGPT/Ziya RM)")
    reward_template: str = arg("auto", "chat template the reward model scores in: auto (the one train_rm.py "
                                       "recorded, else the RM directory's own), or a name")
    reward_norm: str = arg("std", "std: reward-model scores in units of their spread on SFT-like answers (so "
                                  "--missing-eos-penalty and --kl-coef are too); none: as the RM gives them",
                           choices=["std", "none"])
    data: str = arg("", "prompts, JSONL: schema conversations (last assistant turn dropped) or prompt records",
                    metavar="FILE", old=("--prompts",))
    out: str = like(TrainLoopFlags, "out", "out/ppo", "output directory: adapter, metrics.jsonl, samples.jsonl, plots, "
                                                      "checkpoints/")
    max_prompt_len: int = arg(512, "longer prompts are skipped", bounds="[1, inf)")
    # rollouts
    max_steps: int | None = like(TrainLoopFlags, "max_steps", help="PPO steps (default: one pass over the prompts)")
    batch_size: int = like(TrainLoopFlags, "batch_size", 32, "prompts per step, over all processes (each answered "
                                                             "--k times)")
    k: int = arg(1, "answers sampled per prompt; with K > 1 each answer's score becomes its lead over the mean of "
                    "the prompt's other K-1 answers (the RLOO baseline) before KL and critic: the per-prompt offset "
                    "a reward model has on its scale then does not reach the update", bounds="[1, inf)")
    max_new_tokens: int = arg(256, "answer length limit", bounds="[1, inf)")
    temperature: float = arg(0.7, "sampling temperature (top_k 0, top_p 1, no min length)", bounds="(0, inf)")
    rollout_batch_size: int = arg(0, "prompts generated at once per process (times --k rows); 0: all of them",
                                  bounds="[0, inf)")
    missing_eos_penalty: float | None = arg(-1.0, "score of an answer that never stops, in reward units ('none' "
                                                  "keeps the reward model's score of it, closed by the end token)",
                                            parse=_penalty)
    length_debias: float = arg(0.0, "remove COEF times the batch's linear dependence of the score on answer length "
                                    "(1: all of it), so PPO cannot win by shrinking or padding answers (0: off)",
                                    bounds="[0, inf)")
    # KL penalty in the reward
    kl_coef: float = arg(0.05, "weight of the per-token KL to the reference in the reward", bounds="[0, inf)")
    kl_estimator: str = arg("k1", "k1 = logp - logp_ref; k3 = (r - 1) - log r with r = p_ref / p",
                            choices=["k1", "k3"])
    adaptive_kl: bool = arg(False, "adapt kl_coef towards --kl-target (Ziegler et al.)")
    kl_target: float = arg(6.0, "KL per answer the adaptive controller aims at", bounds="(0, inf)")
    kl_horizon: int = arg(10000, "horizon of the adaptive KL controller, in rollouts", bounds="[1, inf)")
    # PPO
    ppo_epochs: int = arg(4, "passes over each step's rollouts", bounds="[1, inf)")
    num_mini_batches: int = arg(1, "optimizer steps per PPO epoch", bounds="[1, inf)")
    micro_batch_size: int = like(TrainLoopFlags, "micro_batch_size", 4, "rows per forward/backward; minibatches "
                                                                        "accumulate gradients over these")
    gamma: float = arg(1.0, "discount", bounds="[0, 1]")
    lam: float = arg(0.95, "GAE lambda", bounds="[0, 1]")
    clip_range: float = arg(0.2, "policy ratio clip", bounds="(0, inf)")
    clip_range_value: float = arg(0.2, "value clip around the rollout's values", bounds="(0, inf)")
    vf_coef: float = arg(0.1, "weight of the value loss", bounds="[0, inf)")
    whiten_advantages: bool = arg(True, "normalise advantages to mean 0, std 1 over the batch")
    max_log_ratio: float = arg(20.0, "log-ratios are clamped to +-this before exp", bounds="(0, inf)")
    max_ratio: float = arg(10.0, "a minibatch whose mean ratio exceeds this is skipped", bounds="(0, inf)")
    target_approx_kl: float | None = arg(None, "stop a step's epochs once approx KL exceeds this", bounds="(0, inf)")
    # optimisation
    lr: float = arg(5e-5, "learning rate of the policy LoRA (higher than full-weight PPO: see the module doc)",
                    bounds="(0, inf)")
    value_lr: float | None = arg(None, "learning rate of the value head and critic adapter (default: --lr)",
                                 bounds="(0, inf)")
    adam_eps: float = arg(1e-5, "Adam epsilon", bounds="(0, inf)")
    anneal_lr: bool = arg(False, "decay the learning rates linearly to 0 at --max-steps")
    # LoRA and value
    lora_r: int = like(LoRAFlags, "lora_r", 16, "rank of the PPO LoRA (no dropout: the reference is the policy with "
                                                "its adapters off, so both must be deterministic)")
    lora_alpha: float = like(LoRAFlags, "lora_alpha", 32.0)
    critic: str = arg("shared", "shared: value head on the policy trunk; separate: own LoRA + head; reward: "
                                "own LoRA + head started from the reward model's (a LoRA reward model on the "
                                "policy's base)", choices=["shared", "separate", "reward"])
    # run
    quant: str = arg("none", QUANT_HELP, choices=list(QUANTS))
    compile: bool = arg(False, "torch.compile the decode step (CUDA graphs on CUDA; fused element-wise ops on CPU)")
    seed: int = arg(0, "seed of the LoRA init, the prompt order and the rollouts")
    sample_every: int = arg(10, "print and save sample answers every N steps (0: never)", bounds="[0, inf)")
    save_every: int = like(TrainLoopFlags, "save_every", 50)
    report_to: list[str] = arg([], REPORT_TO_HELP, metavar="TRACKER")

    def check(self):
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: PPO samples, so it must be > 0 (0.7 is usual)")
        if self.continue_adapter and not self.adapter:
            raise UserError("--continue-adapter needs --adapter (the SFT adapter to keep training)")
        if self.k < 1:
            raise UserError(f"--k {self.k}: at least one answer per prompt")
        if not self.model or not self.data:
            raise UserError("PPO needs --model (model directory) and --data (prompts, JSONL)")


# ============================================================================= the maths (pure functions)

def compute_rewards(scores, logp, ref_logp, mask, kl_coef, estimator="k1"):
    """Per-token rewards (B, R) = -kl_coef * KL_t, plus the score at each row's last real token; and KL_t.

    logp, ref_logp (B, R) are the sampled tokens' log-probs under policy and reference (both at the
    sampling temperature); padded positions get KL 0 and reward 0.
    """
    log_ratio = (logp - ref_logp) * mask
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = p_ref / p: >= 0, low variance
    else:
        raise ValueError(f"kl estimator {estimator!r}: use 'k1' or 'k3'")
    kl = kl * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,)
    rewards[torch.arange(len(last), device=last.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation in a reverse loop: (advantages, returns), each (B, R), 0 on padding.

    values[:, t] = V(state before token t); the value after the last real token is 0 (episode over).
    """
    values = values * mask
    rewards = rewards * mask
    B, R = rewards.shape
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    out = [None] * R
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out[t] = last
    advantages = torch.stack(out, dim=1) * mask
    return advantages, advantages + values


def policy_loss(logp, old_logp, advantages, mask, clip=0.2, max_log_ratio=20.0, denom=None):
    """Clipped PPO loss: sum(max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)) * mask) / denom.

    denom defaults to the number of valid tokens; gradient accumulation passes the minibatch's token
    count so micro-batches add up to the minibatch mean. Returns (loss, stats): clipfrac,
    approx_kl = 0.5 * mean(log_ratio^2), ratio (masked means over this call).
    """
    log_ratio = (logp - old_logp).clamp(-max_log_ratio, max_log_ratio)
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    pg = torch.maximum(pg1, pg2)
    n = mask.sum() if denom is None else denom
    loss = (pg * mask).sum() / n
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask),
                 "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip=0.2, denom=None):
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped = old + clip(v - old, +-clip)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    n = mask.sum() if denom is None else denom
    loss = 0.5 * (torch.maximum(l1, l2) * mask).sum() / n
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((l2 > l1).float(), mask)}
    return loss, stats


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over valid tokens (1 = perfect, 0 = no better than the mean)."""
    var_r = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var_r) if var_r > 0 else torch.tensor(float("nan"))


def adaptive_kl_coef(coef, kl, target, horizon, n_steps):
    """Ziegler et al.'s controller: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * n_steps / horizon)


# ============================================================================= models

@dataclass
class Models:
    """Policy, reference and value on one base. Switch with `reference(m)` and `critic(m)`."""
    model: Transformer  # base (+ merged SFT) with the trainable LoRA layers
    value_head: nn.Linear  # fp32 (dim -> 1); on the policy trunk, or the separate critic's
    ref_lora: dict | None = None  # continue_adapter: frozen SFT adapter tensors the reference runs with
    critic_lora: dict | None = None  # critic="separate": the critic's LoRA tensors
    sft: dict | None = None  # the SFT adapter merged into the weights: name -> (A, B, scaling), for export

    def head(self) -> dict:
        return {"value_head.weight": self.value_head.weight, "value_head.bias": self.value_head.bias}


def reference(m: Models):
    """The SFT model: adapters off (merged SFT), or the SFT adapter's frozen tensors (continue_adapter)."""
    return rollout_reference(m.model, m.ref_lora)


def critic(m: Models):
    """The value model: the policy itself (shared) or the LoRA layers on the critic's tensors (separate)."""
    return adapters.use_lora_weights(m.model, m.critic_lora) if m.critic_lora is not None \
        else contextlib.nullcontext()


def build_models(cfg: PPOConfig, device=None, dtype=None) -> Models:
    """Build policy, reference and value from cfg.model (+ cfg.adapter); see the module docstring."""
    model, ref_lora, sft = policy_model(cfg.model, cfg.adapter, cfg.continue_adapter, cfg.lora_r, cfg.lora_alpha,
                                        cfg.lora_targets, device, dtype, cfg.quant, compile=cfg.compile)
    head = nn.Linear(model.config.dim, 1, device=model.embed_tokens.weight.device, dtype=torch.float32)
    nn.init.zeros_(head.weight)  # V = 0 at the start: no random baseline in the first advantages
    nn.init.zeros_(head.bias)
    m = Models(model=model, value_head=head, ref_lora=ref_lora, sft=sft)
    if cfg.critic in ("separate", "reward"):  # "reward": start_critic_from_reward fills it in
        # starts as the policy's trunk: a fresh adapter (B = 0) or a copy of the continued SFT adapter
        m.critic_lora = adapters.snapshot(model, trainable=True)
    else:
        model.value_head = head  # so model.values(h) works on the shared trunk
    return m


def trainable_groups(m: Models, cfg: PPOConfig) -> list[dict]:
    value = list(m.value_head.parameters())
    if m.critic_lora is not None:
        value += [p for ab in m.critic_lora.values() for p in ab]
    value_lr = cfg.value_lr if cfg.value_lr is not None else cfg.lr
    return [{"params": lora_parameters(m.model), "lr": cfg.lr}, {"params": value, "lr": value_lr}]


def start_critic_from_reward(m: Models, reward: Scorer, cfg: PPOConfig) -> None:
    """critic="reward": the critic's LoRA tensors and value head become trainable copies of the reward
    model's (shared on the policy's base), the head rescaled so its values are in the units PPO's
    scores take ((raw - bias) * gain, divided by the spread with reward_norm std). A reward adapter
    of lower rank than the critic's is zero-padded (the padded directions start and stay unused)."""
    rm = reward.rm
    if rm is None or rm.lora is None:
        raise UserError(f"--critic reward starts the critic from the reward model's adapter on the policy's base; "
                        f"{cfg.reward or 'the reward function'} is not a LoRA reward model sharing that base (see "
                        f"the line above): use --critic shared or separate")
    with torch.no_grad():
        for name, ab in rm.lora.items():
            if ab is None:
                continue  # a layer the reward model has no adapter on: the critic's stays fresh (B = 0)
            a, b = m.critic_lora[name]
            r = ab[0].shape[0]
            if r > a.shape[0]:
                raise UserError(f"--critic reward: the reward model's adapter on {name} has rank {r}, above the PPO "
                                f"LoRA rank {a.shape[0]}; run PPO with --lora-r {r} or more")
            a.zero_()[:r] = ab[0]
            b.zero_()[:, :r] = ab[1]
        unit = (reward.spread or 1.0) if cfg.reward_norm == "std" else 1.0
        m.value_head.weight.copy_(rm.head.weight * rm.gain / unit)
        m.value_head.bias.copy_((rm.head.bias - rm.bias) * rm.gain / unit)


# ============================================================================= rewards

def shared_reward_model(m: Models, cfg: PPOConfig, tok) -> tuple[RewardModel | None, str]:
    """cfg.reward as one more adapter + head on the policy's base (reward_model.share_base), or (None, why)."""
    layers = dict(lora_modules(m.model))
    ref = None if m.ref_lora is None else {n: (a, b, layers[n].scaling) for n, (a, b) in m.ref_lora.items()}
    return share_base(cfg.reward, m.model, cfg.model, cfg.adapter, tok, cfg.reward_template, stack_first=ref)


def make_reward(reward_fn, m: Models, cfg: PPOConfig, tok, template, d, dtype) -> Scorer:
    """reward_fn (a function or a RewardModel), else the model in cfg.reward, on the policy's base when it can be."""
    if reward_fn is None and not cfg.reward:
        raise UserError("no reward: pass --reward DIR (a reward model from train_rm.py) or call "
                        "ppo.train(cfg, reward_fn=...)")
    return reward_scorer(reward_fn or cfg.reward, tok, template, share=lambda: shared_reward_model(m, cfg, tok),
                         device=d.device, dtype=dtype, reward_template=cfg.reward_template,
                         say=print if d.main else lambda *a: None, quant=cfg.quant)


# ============================================================================= prompts

# ============================================================================= the rollout

@dataclass
class Rollout(Batch):
    """One step's experience: everything the update needs, (B, R) over the response unless noted."""
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor  # score at the last token - kl_coef * KL per token
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # (B,) what PPO maximises: the (scaled) reward, or the missing-EOS penalty
    texts: list[str]  # the answers as text (stop token and strings removed)
    responses: list[list[int]]  # the response ids as scored
    metrics: dict = field(default_factory=dict)


@torch.no_grad()
def make_experience(m: Models, cfg: PPOConfig, kl_coef, prompts, rows, reward: Scorer, scale, tok, stops,
                    stop_strs, end_id, seed, d) -> Rollout:
    """Roll out the prompts, score them, and compute everything the update needs."""
    model = m.model
    device = model.embed_tokens.weight.device
    model.eval()
    k = cfg.k
    prompts = [p for p in prompts for _ in range(k)]  # K copies in a row: the engine prefills each prompt once
    rows = [r for r in rows for _ in range(k)]
    responses, gen_logp, cut = sample_answers(model, prompts, cfg.max_new_tokens, cfg.temperature, tok, stops,
                                              stop_strs, end_id, seed, cfg.rollout_batch_size * k, cfg.compile)
    b = pack(prompts, responses, stops, tok.pad_id, device)
    B, R = b.mask.shape
    maskf = b.mask.float()
    sampled_logp = torch.zeros(B, R, device=device)
    sampled = maskf.clone()  # the tokens the sampler drew (not an end token put in place of a stop string)
    for i, lp in enumerate(gen_logp):
        n = min(len(lp), R) if cut[i] is None else cut[i]
        sampled_logp[i, :n] = torch.tensor(lp[:n])
        if cut[i] is not None:
            sampled[i, cut[i]:] = 0

    # old log-probs recomputed by the same forward the update uses; reference and values likewise
    old_logp, ref_logp, values, entropy = (torch.zeros(B, R, device=device) for _ in range(4))
    for idx in torch.arange(B, device=device).split(cfg.micro_batch_size):
        ids, attn, p, r = b.rows(idx)
        lp, ent, v = response_forward(model, ids, attn, p, cfg.temperature, want_entropy=True,
                                      value_head=m.value_head if m.critic_lora is None else None)
        old_logp[idx, :r], entropy[idx, :r] = lp, ent
        with reference(m):
            ref_logp[idx, :r] = response_forward(model, ids, attn, p, cfg.temperature)[0]
        if m.critic_lora is not None:
            with critic(m):
                v = response_forward(model, ids, attn, p, cfg.temperature, m.value_head, want_logp=False)[2]
        values[idx, :r] = v
    old_logp, ref_logp, values = old_logp * maskf, ref_logp * maskf, values * maskf

    # scores: the reward model reads the answer up to its end token; a never-ending answer gets the penalty
    # an answer cut by the token limit is scored closed by the end token, as the judge's rankings and the
    # reward model's training pairs hold every answer; scored mid-text, the reward model would read a
    # position it never learned from, and its score would be noise
    resp_lists, texts = answer_texts(b, tok, stops, stop_strs, end_id)
    scores = reward(prompts, resp_lists, rows, texts).to(device)
    if scale is not None:
        scores = scale(scores, d)
    rm_scores = scores.clone()
    scores, slope = length_debias(scores, b.mask.sum(-1), cfg.length_debias)  # before the EOS penalty: not undone
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(b.ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))

    # K answers a prompt: the return is built from each answer's lead over the others (module doc: why)
    lead = group_advantages(scores, k, "rloo", scale=False) if k > 1 else scores
    rewards, kl = compute_rewards(lead, old_logp, ref_logp, maskf, kl_coef, cfg.kl_estimator)
    advantages, returns = gae(rewards, values, maskf, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, maskf)
    metrics = {
        "score": scores.mean().item(),
        "rm_score": rm_scores.mean().item(),
        "length_slope": slope,  # score per answer token in this batch, before --length-debias took it out
        "kl": kl.sum(-1).mean().item(),  # per answer, summed over tokens, with the chosen estimator
        # the objective, score - kl_coef * KL per answer (with K > 1 the rewards hold each answer's lead, mean 0)
        "reward": (scores - kl_coef * kl.sum(-1)).mean().item(),
        "entropy": masked_mean(entropy, maskf).item(),
        "response_length": maskf.sum(-1).mean().item(),
        "eos_rate": b.ended.float().mean().item(),
        "stop_string_rate": sum(c is not None for c in cut) / B,  # answers cut at a stop string
        "value_ev": explained_variance(values, returns, maskf).item(),
        # sampling-time vs recomputed log-probs: should be ~0 (fp32) or small (bf16); large means a bug
        "logprob_gap": masked_mean((sampled_logp - old_logp).abs(), sampled).item(),
    }
    if k > 1:  # the spread within a prompt's answers: what the update learns from
        metrics["score_std"] = scores.view(-1, k).std(-1).mean().item()
    return Rollout(**vars(b), old_logp=old_logp, ref_logp=ref_logp, values=values, rewards=rewards, kl=kl,
                   advantages=advantages, returns=returns, scores=scores, texts=texts, responses=resp_lists,
                   metrics=metrics)


# ============================================================================= the update

def ppo_update(m: Models, cfg: PPOConfig, exp: Rollout, optimizer, params, seed, d) -> dict:
    """PPO epochs over shuffled minibatches of the experience; returns the mean of the update stats."""
    model = m.model
    model.train()  # only enables gradient checkpointing: dropout is off everywhere
    model.grad_checkpointing = cfg.grad_checkpointing
    B = exp.mask.shape[0]
    device = exp.mask.device
    g = torch.Generator().manual_seed(seed)
    shared = m.critic_lora is None
    sums, n_mb, skipped, epochs = {}, 0, 0, 0
    for epoch in range(cfg.ppo_epochs):
        epochs += 1
        epoch_kl, epoch_n = 0.0, 0
        perm = torch.randperm(B, generator=g).to(device)
        for mb in perm.chunk(cfg.num_mini_batches):
            n_tok = exp.mask[mb].sum().clamp(min=1).float()
            acc = dict.fromkeys(("pg_loss", "vf_loss", "clipfrac", "approx_kl", "ratio", "vf_clipfrac"), 0.0)
            for idx in mb.split(cfg.micro_batch_size):
                ids, attn, p, r = exp.rows(idx)
                mask = exp.mask[idx, :r].float()
                old_v, ret = exp.values[idx, :r], exp.returns[idx, :r]
                logp, _, v = response_forward(model, ids, attn, p, cfg.temperature,
                                              value_head=m.value_head if shared else None)
                pg, pst = policy_loss(logp, exp.old_logp[idx, :r], exp.advantages[idx, :r], mask,
                                      cfg.clip_range, cfg.max_log_ratio, denom=n_tok)
                if shared:
                    vf, vst = value_loss(v, old_v, ret, mask, cfg.clip_range_value, denom=n_tok)
                    (pg + cfg.vf_coef * vf).backward()
                else:
                    pg.backward()
                    with critic(m):  # backward inside: checkpointed layers recompute with the critic's tensors
                        v = response_forward(model, ids, attn, p, cfg.temperature, m.value_head, want_logp=False)[2]
                        vf, vst = value_loss(v, old_v, ret, mask, cfg.clip_range_value, denom=n_tok)
                        (cfg.vf_coef * vf).backward()
                w = mask.sum().item() / n_tok.item()  # this micro-batch's share of the minibatch's tokens
                acc["pg_loss"] += pg.item()
                acc["vf_loss"] += vf.item()
                for k, val in {**pst, **vst}.items():
                    acc[k] += val.item() * w
            dist.all_reduce_grads(params, d)
            acc = dist.all_mean(acc, d)
            if not math.isfinite(acc["ratio"]) or acc["ratio"] > cfg.max_ratio:
                skipped += 1  # a runaway ratio means the policy moved too far: drop this minibatch
                optimizer.zero_grad(set_to_none=True)
                continue
            acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, val in acc.items():
                sums[k] = sums.get(k, 0.0) + val
            n_mb += 1
            epoch_kl, epoch_n = epoch_kl + acc["approx_kl"], epoch_n + 1
        if cfg.target_approx_kl is not None and epoch_n and epoch_kl / epoch_n > cfg.target_approx_kl:
            break  # the policy already moved as far as we allow for this batch
    model.eval()
    model.grad_checkpointing = False
    stats = {k: v / max(n_mb, 1) for k, v in sums.items()}
    stats.update(skipped_minibatches=skipped, ppo_epochs_run=epochs)
    return stats


# ============================================================================= checkpoints and export

def save_checkpoint(m: Models, cfg: PPOConfig, optimizer, state: dict, d) -> None:
    """Adapter(s) + value head, optimizer, RNG, and the loop's state (step, kl_coef, data position,
    score scale) in checkpoint.py's format."""
    def write_weights(tmp):
        save_adapter(m.model, tmp / "policy", extra=m.head() if m.critic_lora is None else None)
        if m.critic_lora is not None:
            with critic(m):
                save_adapter(m.model, tmp / "critic", extra=m.head())
    checkpoint.save(cfg.out, state["step"], cfg.keep_checkpoints, d, dataclasses.asdict(cfg), optimizer,
                    write_weights, **{k: v for k, v in state.items() if k != "step"})


# settings a resumed run must keep: the checkpoint's tensors would not fit the others
FIXED = ("model", "adapter", "continue_adapter", "lora_r", "lora_alpha", "lora_targets", "critic", "quant")
# settings that change nothing a resumed run computes
BOOKKEEPING = {"resume", "overwrite", "report_to", "stop_after", "sample_every", "save_every", "keep_checkpoints", "device",
               "out", "save_merged"}


def load_checkpoint(m: Models, cfg: PPOConfig, path, optimizer, d) -> dict:
    """Restore what save_checkpoint wrote; returns the loop's state. A changed setting in FIXED is
    refused; any other is applied from here on, and said."""
    state, changed = checkpoint.read_resume(path, dataclasses.asdict(cfg), FIXED, BOOKKEEPING,
                                            say=print if d.main else lambda *a: None)
    extra = load_adapter(m.model, path / "policy", trainable=True)
    if m.critic_lora is not None:
        with critic(m):
            extra = load_adapter(m.model, path / "critic", trainable=True)
    with torch.no_grad():
        m.value_head.weight.copy_(extra["value_head.weight"])
        m.value_head.bias.copy_(extra["value_head.bias"])
    m.model.eval()
    checkpoint.restore(path, optimizer, d, lrs=(cfg.lr, cfg.value_lr if cfg.value_lr is not None else cfg.lr))
    if "kl_coef" in changed:  # a new --kl-coef restarts the (adaptive) coefficient from it
        state["kl_coef"] = cfg.kl_coef
    return state


PLOTS = {"curves.png": ["score", "kl", "reward", "response_length", "eos_rate"],
         "ppo_stats.png": ["entropy", "approx_kl", "clipfrac", "value_ev", "kl_coef"]}


def _plot(out, path):
    for name, keys in PLOTS.items():
        plot_metrics(path, os.path.join(out, name), keys, title="PPO")


# ============================================================================= the loop

def train(cfg: PPOConfig, reward_fn=None) -> dict:
    """Run PPO; returns the last step's metrics plus first/last score and KL and the per-step history.

    reward_fn(prompts, responses, rows, texts) -> (B,) scores, for prompt ids, response ids (cut after
    their end token, which they include), prompt records and answer texts; or a loaded
    `reward_model.RewardModel`; None loads cfg.reward.
    """
    cfg.check()
    check_report_to(cfg.report_to)  # a missing tracker package is said now, not after the models load
    return dist.run(cfg.device, lambda d, hold: _train(cfg, reward_fn, d, hold))


def _train(cfg: PPOConfig, reward_fn, d, hold) -> dict:
    if cfg.batch_size % d.world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    local = cfg.batch_size // d.world
    if local * cfg.k < cfg.num_mini_batches:
        raise UserError(f"{local * cfg.k} rollouts per process cannot make {cfg.num_mini_batches} minibatches; "
                        f"raise --batch-size or lower --num-mini-batches")
    dtype = resolve_dtype(cfg.dtype, d.device)
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank
    random.seed(cfg.seed)
    tok, template, stops, stop_strs, end_id = chat_setup(cfg.model, cfg.template, cfg.adapter)
    if tok.pad_id in stops and d.main:
        print(f"note: {cfg.model}'s pad id {tok.pad_id} is also a stop id; masks use lengths, so EOS still counts")
    rows, prompts = load_prompts(cfg.data, tok, template, cfg.max_prompt_len)
    m = build_models(cfg, device=d.device, dtype=dtype)
    reward = make_reward(reward_fn, m, cfg, tok, template, d, dtype)
    if cfg.critic == "reward":
        start_critic_from_reward(m, reward, cfg)
    groups = trainable_groups(m, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.Adam(groups, eps=cfg.adam_eps)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    max_steps = cfg.max_steps or math.ceil(len(rows) / cfg.batch_size)

    hold.enter_context(prepare_out(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, main_process=d.main,
                                   inputs=cfg))
    out = cfg.out
    state = {"step": 0, "kl_coef": cfg.kl_coef, "data_pos": 0, "score_scale": None}
    ckpt = checkpoint.resume_from(out, cfg.resume, print if d.main else lambda *a: None)
    if ckpt:
        state = load_checkpoint(m, cfg, ckpt, optimizer, d)
        if d.main:
            print(f"resumed from {ckpt} (step {state['step']}, kl_coef {state['kl_coef']:.4g})")
    scale = score_scale(reward, cfg, state, d)
    log = open_run_log(cfg, "ppo", bool(ckpt), state["step"], max_steps, d, hold)
    history, kl_coef, clock = [], state["kl_coef"], {"plot": time.time()}
    # the checks above passed and training begins: the outputs of an earlier run stop looking like this one's
    if cfg.resume and d.main:
        checkpoint.unfinish(out)
    for step in range(state["step"] + 1, max_steps + 1):
        if cfg.anneal_lr:
            frac = 1 - (step - 1) / max_steps
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * frac
        idx = prompt_indices(len(rows), state["data_pos"], cfg.batch_size, cfg.seed)[d.rank * local:(d.rank + 1) * local]
        step_seed = (cfg.seed * 1_000_003 + step) * 1009 + d.rank  # rollouts and shuffles reproducible on resume
        t0 = time.time()
        exp = make_experience(m, cfg, kl_coef, [prompts[i] for i in idx], [rows[i] for i in idx], reward, scale,
                              tok, stops, stop_strs, end_id, step_seed, d)
        t1 = time.time()
        stats = ppo_update(m, cfg, exp, optimizer, params, step_seed, d)
        t2 = time.time()
        metrics = dist.all_mean(exp.metrics, d)
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["kl"], cfg.kl_target, cfg.kl_horizon, cfg.batch_size * cfg.k)
        state.update(step=step, kl_coef=kl_coef, data_pos=state["data_pos"] + cfg.batch_size,
                     score_scale=None if scale is None or scale.scale is None else [scale.shift, scale.scale])
        row = {**metrics, **stats, "kl_coef": kl_coef, "lr": optimizer.param_groups[0]["lr"],
               "rollout_s": t1 - t0, "update_s": t2 - t1, "tokens": int(exp.mask.sum().item()) * d.world}
        history.append(log.write(step, **row) if d.main else dict(row, step=step))
        if d.main and cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            write_samples(out, step, [{"step": step, "prompt": tok.decode(prompts[i]), "response": exp.texts[j * cfg.k],
                                       "score": exp.scores[j * cfg.k].item()} for j, i in enumerate(idx[:2])], log)
        if end_of_step(step, max_steps, cfg, lambda: save_checkpoint(m, cfg, optimizer, state, d),
                       lambda: _plot(out, log.path), d, clock):
            return {"steps": step, "stopped": True, "out": out, "history": history}

    if d.main:
        # for the original base: with a merged SFT adapter, the concatenation SFT (+) PPO
        # the trained format travels with the adapter, written first: the adapter's files mark the directory done
        save_chat_template(out, tok, template)
        adapters.save_on_base(m.model, out, merged=m.sft, extra=m.head() if m.critic_lora is None else None)
        if m.critic_lora is not None:  # for the original base too: it was trained on the SFT-merged weights
            with critic(m):
                adapters.save_on_base(m.model, os.path.join(out, "critic"), merged=m.sft, extra=m.head())
        if os.path.exists(log.path) and os.path.getsize(log.path):
            _plot(out, log.path)
        if cfg.save_merged:  # merges the LoRA layers away (a 4-bit base: onto a fresh full one): last
            adapters.save_merged(out, cfg.model, tok, template, model=m.model if cfg.quant == "none" else None,
                                 dtype=dtype)
        print(f"wrote the policy adapter to {out} (load with --model {cfg.model} --adapter {out})")
    dist.barrier(d)
    summary = dict(history[-1]) if history else {}
    if history:
        summary.update(first_score=history[0]["score"], last_score=history[-1]["score"],
                       first_kl=history[0]["kl"], last_kl=history[-1]["kl"])
    summary.update(steps=len(history), out=out, history=history, stopped=False)
    return summary


def main(argv=None) -> int:
    return cli_main(train, PPOConfig, argv, prog="train_ppo.py", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    dist.exit_process(main())
