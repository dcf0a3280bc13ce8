"""PPO with LoRA: RL from a reward model on the SFT policy, with one copy of the base weights.

What is here, top to bottom:
- `PPOConfig`, the one config (every CLI flag of train_ppo.py is a field).
- The math, as small pure functions on (B, R) response tensors (R = response length, padded):
  `masks_after_stop`, `compute_rewards`, `gae`, `whiten`, `policy_loss`, `value_loss`,
  `explained_variance`, `adaptive_kl_coef`.
- The models: `load_policy` builds policy, reference and value from one base (see below);
  `reference` and `critic` are context managers that switch the LoRA layers to the reference's or
  the critic's weights; `response_forward` gives per-token log-probs, entropy and values.
- `make_experience` (rollout + no-grad forwards + rewards + GAE) and `ppo_update` (epochs x
  shuffled minibatches x micro-batches with gradient accumulation): the two halves of a step.
- `train(cfg, reward_fn=None) -> dict`: the loop, logging, checkpoints, export; `main()`: the CLI.

One base serves everything:
- Policy = base + the SFT adapter merged into the weights + a fresh PPO LoRA (B = 0, so step 0 is
  the SFT model). Merging first means the reference is simply "adapters off" and a PPO adapter
  of any rank or targets can be trained. `continue_adapter` instead keeps training the SFT adapter
  itself; the reference then runs with a frozen copy of the SFT adapter's tensors (a few MB).
- Reference = the same modules with the PPO adapter disabled: no second copy of the weights.
- Value: by default a value head (fp32, zero-initialised, so V = 0 and the first advantages are the
  whitened rewards, free of a random baseline) on the policy's last hidden state; value gradients
  reach the policy LoRA, scaled by vf_coef. `critic="separate"` gives the critic its own LoRA
  tensors and head: the LoRA layers are pointed at the critic's tensors for its forward (policy
  adapter off, critic adapter on). Cost: one more trunk forward per rollout micro-batch and one
  more forward + backward per update micro-batch (about 1.5-2x the update time), plus one
  adapter's parameters and Adam state; the base weights are still shared.
- Reward: a LoRA reward model from train_rm.py on the same base and SFT adapter is one more adapter
  + head on the same weights (`shared_reward_fn`: its tensors are swapped into the LoRA layers for
  scoring), so one copy of the base serves policy, reference, value and reward. Any other reward
  model (full weights, another base) is loaded by `nanohuatuo.reward` as its own model; or pass
  `reward_fn` to `train`. A score is read at the answer's last token (its stop token), normalised
  by the reward model's stored bias (and gain); an answer that never stops scores
  `missing_eos_penalty` instead.

Export (--out): the policy adapter in PEFT layout with the value head in extra.safetensors, written
for the ORIGINAL base, so `Transformer.from_pretrained(BASE, adapter=OUT)` and
`chat.py --model BASE --adapter OUT` give the trained policy. When the SFT adapter was merged, the
exported adapter is the exact concatenation SFT (+) PPO: s1*B1*A1 + s2*B2*A2 = [s1*B1, s2*B2] @ [A1; A2],
a rank r1 + r2 adapter with scaling 1 (on a bf16 base the training policy had the SFT update rounded
into bf16 weights; the export keeps it in fp32). `--save-merged` also writes OUT/merged, a full
model with everything folded in.

Learning rate: 5e-5 by default. Full-weight PPO uses 1e-6..1e-5, but a LoRA update moves the
weights much less per step (the change is scaling * dB @ A with B starting at zero), so it needs a
higher lr; we stay below the 1e-4 at which medical LoRAs start eroding general ability.

Distributed: under torchrun every rank rolls out its share of each step's prompts, the gradients
of the (small) trainable tensors are averaged with one all-reduce, and logged metrics are averaged
over ranks. Advantages are whitened per rank. gloo on CPU, nccl on CUDA.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist
import torch.nn as nn

from .data import DataError, iter_jsonl
from .generate import cut_at_stop, generate_batch, left_pad, use_column_major_weights
from .lora import (DEFAULT_TARGETS, apply_lora, disabled_adapters, load_adapter, lora_modules, lora_parameters,
                   merge_and_unload, save_adapter)
from .metrics import MetricsLog, plot_metrics
from .model import Transformer
from .sft import ce_grad_, logits_into, rng_state, set_rng_state, setup_distributed
from .templates import guess_template, render_prompt, stop_strings, stop_token_ids
from .tokenizer import Tokenizer


@dataclass
class PPOConfig:
    # what to train on
    policy: str = ""  # base model directory (HF layout, with the tokenizer)
    adapter: str | None = None  # SFT LoRA adapter on `policy`; merged into the weights unless continue_adapter
    continue_adapter: bool = False  # train the SFT adapter itself instead of a fresh PPO LoRA
    reward: str | None = None  # reward model directory written by train_rm.py
    prompts: str = ""  # JSONL: schema conversations (last assistant turn dropped) or to_prompt records
    out: str = "out/ppo"
    template: str | None = None  # chat template; None guesses from the policy directory
    max_prompt_len: int = 512  # longer prompts are skipped
    # rollouts
    max_steps: int | None = None  # None: one pass over the prompts
    batch_size: int = 32  # prompts (= rollouts) per step, over all ranks
    max_new_tokens: int = 256
    temperature: float = 0.7  # pure sampling at this temperature: top_k 0, top_p 1, no min length
    rollout_batch_size: int = 0  # rows generated at once per rank; 0 = the whole local batch
    missing_eos_penalty: float | None = -1.0  # score of an answer that never stops; None keeps the RM score
    # KL penalty in the reward
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 = logp - logp_ref; k3 = (r - 1) - log r with r = p_ref / p
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    # PPO
    ppo_epochs: int = 4
    num_mini_batches: int = 1  # optimizer steps per epoch
    micro_batch_size: int = 4  # rows per forward/backward; minibatches accumulate gradients over these
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    max_log_ratio: float = 20.0  # log-ratios are clamped to +-this before exp
    max_ratio: float = 10.0  # a minibatch whose mean ratio exceeds this is skipped
    target_approx_kl: float | None = None  # stop the epochs of a step once approx KL exceeds this
    # optimisation
    lr: float = 5e-5  # LoRA: higher than full-weight PPO (1e-6..1e-5), see the module docstring
    value_lr: float | None = None  # value head (and critic adapter); None = lr
    adam_eps: float = 1e-5
    max_grad_norm: float = 1.0
    anneal_lr: bool = False  # linear decay to 0 at max_steps
    # LoRA and value
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] | str = DEFAULT_TARGETS
    critic: str = "shared"  # shared: value head on the policy trunk | separate: own LoRA + head
    # run
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the decode step (CUDA)
    seed: int = 0
    sample_every: int = 10  # print sample answers every N steps (0: never)
    save_every: int = 50  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 1
    resume: bool = False
    save_merged: bool = False  # also write OUT/merged: a full model with the adapters folded in

    def check(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: use 'k1' or 'k3'")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"critic={self.critic!r}: use 'shared' or 'separate'")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: PPO samples, so it must be > 0 (0.7 is usual)")
        if self.continue_adapter and not self.adapter:
            raise ValueError("continue_adapter needs --adapter (the SFT adapter to keep training)")


# ============================================================================= the math (pure functions)

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masks_after_stop(tokens, stop_ids, pad_id, lengths=None):
    """Cut each response after its first stop token: (tokens with the rest set to pad, mask, ended).

    tokens (B, R) are right-padded responses. mask (B, R) is 1 on real tokens up to and including
    the first stop token. The stop token stays in the mask even when pad_id == eos_id (a model whose
    EOS is masked as padding never learns to stop). Rows without a stop token keep every token
    before `lengths` (B,), or, without lengths, before their trailing run of pad_id. ended (B,):
    whether the row has a stop token.
    """
    B, R = tokens.shape
    pos = torch.arange(R, device=tokens.device)
    stops = torch.tensor(sorted(set(int(i) for i in stop_ids)), dtype=tokens.dtype, device=tokens.device)
    is_stop = torch.isin(tokens, stops)  # (B, R)
    if lengths is None:
        real = tokens != pad_id
        last_real = R - 1 - real.flip(-1).long().argmax(-1)  # index of the last non-pad token
        last_real = torch.where(real.any(-1), last_real, torch.full_like(last_real, -1))
    else:
        last_real = torch.as_tensor(lengths, device=tokens.device) - 1
        is_stop = is_stop & (pos[None] <= last_real[:, None])
    ended = is_stop.any(-1)
    first_stop = is_stop.long().argmax(-1)  # 0 for rows without a stop, overridden below
    end = torch.where(ended, first_stop, last_real)  # (B,) inclusive index of the last kept token
    mask = pos[None] <= end[:, None]
    return tokens.masked_fill(~mask, pad_id), mask.long(), ended


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
    returns = advantages + values.
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


def whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the valid (mask 1) entries only; unchanged (zeroed padding) under 2 of them."""
    n = mask.sum()
    if n < 2:
        return x * mask
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1)  # unbiased, as the reference implementations
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss(logp, old_logp, advantages, mask, clip=0.2, max_log_ratio=20.0, denom=None):
    """Clipped PPO loss: sum(max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)) * mask) / denom.

    denom defaults to the number of valid tokens (a masked token mean); gradient accumulation passes
    the minibatch's token count so micro-batches add up to the minibatch mean. Returns (loss, stats)
    with stats (masked means over this call): clipfrac, approx_kl = 0.5 * mean(log_ratio^2), ratio.
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
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped = old + clip(v - old, +-clip).

    Returns (loss, stats) with stats["vf_clipfrac"]: the share of tokens where the clipped term won.
    """
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


def _lora_snapshot(model, trainable: bool):
    """A copy of every LoRA layer's (A, B) as Parameters, keyed by module name."""
    return {name: (nn.Parameter(m.lora_A.weight.detach().clone(), requires_grad=trainable),
                   nn.Parameter(m.lora_B.weight.detach().clone(), requires_grad=trainable))
            for name, m in lora_modules(model)}


@contextlib.contextmanager
def use_lora_weights(model, weights):
    """Run the LoRA layers with other (A, B) tensors for the duration; gradients flow to those tensors.

    weights: module name -> (A, B) Parameters, or None to switch that layer's adapter off. With
    gradient checkpointing the backward recomputes layers, so call backward inside the block.
    """
    saved = []
    try:
        for name, m in lora_modules(model):
            saved.append((m, m.lora_A.weight, m.lora_B.weight, m.disabled))
            if weights.get(name) is None:
                m.disabled = True
            else:
                m.lora_A.weight, m.lora_B.weight = weights[name]
                m.disabled = False
        yield model
    finally:
        for m, a, b, disabled in saved:
            m.lora_A.weight, m.lora_B.weight, m.disabled = a, b, disabled


def reference(m: Models):
    """The SFT model: adapters off (merged SFT), or the SFT adapter's frozen tensors (continue_adapter)."""
    return use_lora_weights(m.model, m.ref_lora) if m.ref_lora is not None else disabled_adapters(m.model)


def critic(m: Models):
    """The value model: the policy itself (shared) or the LoRA layers on the critic's tensors (separate)."""
    return use_lora_weights(m.model, m.critic_lora) if m.critic_lora is not None else contextlib.nullcontext()


def trainable_groups(m: Models, cfg: PPOConfig):
    vlr = cfg.value_lr if cfg.value_lr is not None else cfg.lr
    groups = [{"params": lora_parameters(m.model), "lr": cfg.lr}]
    value = list(m.value_head.parameters())
    if m.critic_lora is not None:
        value += [p for ab in m.critic_lora.values() for p in ab]
    groups.append({"params": value, "lr": vlr})
    return groups


def load_policy(cfg: PPOConfig, device=None, dtype=None) -> Models:
    """Build policy, reference and value from cfg.policy (+ cfg.adapter); see the module docstring."""
    model = Transformer.from_pretrained(cfg.policy, dtype=dtype, device=device, value_head=False)
    targets = cfg.lora_targets if isinstance(cfg.lora_targets, str) else list(cfg.lora_targets)
    ref_lora, sft = None, None
    if cfg.adapter and cfg.continue_adapter:
        load_adapter(model, cfg.adapter, trainable=True)
        ref_lora = _lora_snapshot(model, trainable=False)
    else:
        if cfg.adapter:
            load_adapter(model, cfg.adapter, trainable=False)
            sft = {name: (mod.lora_A.weight.detach().cpu().clone(), mod.lora_B.weight.detach().cpu().clone(),
                          mod.scaling) for name, mod in lora_modules(model)}
            merge_and_unload(model)
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, targets=targets)
    disable_dropout(model)
    with torch.no_grad():
        # generate_batch re-lays the weights for CPU decoding under inference_mode, which would
        # make it an inference tensor that backward cannot use; doing it here first makes that a no-op
        use_column_major_weights(model)
    head = nn.Linear(model.config.dim, 1, device=model.embed_tokens.weight.device, dtype=torch.float32)
    nn.init.zeros_(head.weight)  # V = 0 at the start: no random baseline in the first advantages
    nn.init.zeros_(head.bias)
    m = Models(model=model, value_head=head, ref_lora=ref_lora, sft=sft)
    if cfg.critic == "separate":
        # starts as the policy's trunk: a fresh adapter (B = 0) or a copy of the continued SFT adapter
        m.critic_lora = _lora_snapshot(model, trainable=True)
    else:
        model.value_head = head  # so model.values(h) works on the shared trunk
    model.eval()
    return m


def disable_dropout(model):
    """Dropout off everywhere during RL: it would make old and new log-probs disagree."""
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    for _, mod in lora_modules(model):
        mod.lora_dropout = nn.Identity()


class TokenLogprobs(torch.autograd.Function):
    """Per row: log softmax(h @ W.T / T)[target], for a frozen W, with its gradient.

    Chunk by chunk, the gradient with respect to h, (onehot - softmax) @ W / T, is computed in the
    forward pass while the softmax is at hand (sft.ce_grad_, the SFT loss's in-place softmax) and
    only scaled in backward: the (rows, vocab) logits are never kept for backward, and no
    log-softmax backward pass over them is needed.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk):
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h)
        buf = torch.empty(min(chunk, len(h)), weight.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            z = logits_into(h[s:s + chunk], weight, buf).div_(temperature)
            logp[s:s + chunk] = -ce_grad_(z, targets[s:s + chunk])  # z is now d(-logp)/dz
            grad[s:s + chunk] = (z.to(weight.dtype) @ weight).mul_(-1.0 / temperature).to(h.dtype)
        ctx.save_for_backward(grad)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        (grad,) = ctx.saved_tensors
        return grad * grad_logp[:, None].to(grad.dtype), None, None, None, None


def token_logprobs(model, h, targets, temperature, want_entropy=False):
    """(logp, entropy or None) of targets (N,) under softmax(logits(h) / temperature), h (N, dim).

    With a gradient to take through a frozen output matrix (the PPO update), TokenLogprobs; else
    (the no-grad rollout forwards, or a trained output matrix) plain autograd on the logits.
    """
    weight = model.lm_head.weight
    if torch.is_grad_enabled() and h.requires_grad and not weight.requires_grad and not want_entropy:
        chunk = max(1, 2**25 // weight.shape[0])  # 128 MB of float32 logits at a time
        return TokenLogprobs.apply(h, weight, targets, temperature, chunk), None
    z = model.logits(h).float().div_(temperature)  # in place: the fresh logits are not needed unscaled
    lse = z.logsumexp(-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    entropy = None
    if want_entropy:
        with torch.no_grad():  # logged only; one (N, vocab) temporary, multiplied in place
            entropy = lse - z.softmax(-1).mul_(z).sum(-1)
    return logp, entropy


def response_forward(model, ids, attn, P, temperature, value_head=None, want_logp=True, want_entropy=False):
    """Per-token (logp, entropy, values), each (B, R) or None, for the response ids[:, P:].

    ids, attn (B, P + R): left-padded prompt then response; positions come from attn, so padding
    never shifts them. The output at position t predicts token t + 1, so the response's log-probs
    and values are read from P - 1 (the last prompt token) to the second-to-last position.
    Log-probs and entropy are of logits / temperature, the distribution the tokens were sampled from.
    """
    h = model.hidden_states(ids, attention_mask=attn)  # (B, P + R, dim)
    h = h[:, P - 1:-1]  # (B, R, dim): the states that predict the response tokens
    B, R = h.shape[:2]
    logp = entropy = values = None
    if want_logp or want_entropy:
        flat = h.reshape(B * R, -1)  # one (B * R, dim) matrix: a 3-d strided slice would make matmul batch
        logp, entropy = token_logprobs(model, flat, ids[:, P:].reshape(-1), temperature, want_entropy)
        logp = logp.view(B, R) if want_logp else None
        entropy = entropy.view(B, R) if want_entropy else None
    if value_head is not None:
        values = value_head(h.float()).squeeze(-1)
    return logp, entropy, values


# ============================================================================= data

def load_prompts(path, tok, template, max_prompt_len):
    """(rows, ids): prompt records {id, messages, reference} and their rendered prompt ids.

    A conversation ending with an assistant turn loses it (it becomes the reference); one ending
    with a user turn (a to_prompt record) is used as is. Prompts over max_prompt_len are skipped.
    """
    rows, ids, skipped = [], [], 0
    for lineno, obj in iter_jsonl(path):
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{path}:{lineno}: no 'messages' list; each line needs "
                            f'{{"messages": [{{"role": "user", "content": ...}}, ...]}}')
        reference_text = obj.get("reference")
        if msgs[-1].get("role") == "assistant":
            reference_text, msgs = msgs[-1].get("content"), msgs[:-1]
        try:
            prompt = render_prompt(msgs, tok, template)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if len(prompt) > max_prompt_len:
            skipped += 1
            continue
        rows.append({"id": obj.get("id", f"{os.path.basename(path)}-{lineno}"), "messages": msgs,
                     "reference": reference_text})
        ids.append(prompt)
    if not rows:
        raise DataError(f"{path}: no usable prompts ({skipped} longer than max_prompt_len={max_prompt_len})")
    if skipped:
        print(f"{path}: skipped {skipped} prompts longer than max_prompt_len={max_prompt_len} tokens")
    return rows, ids


def prompt_indices(n, start, count, seed):
    """Indices of `count` prompts from global position `start` of an endless, per-pass shuffled order."""
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if i == 0 or not out:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.append(order[i])
    return out


# ============================================================================= reward

def reward_fn_from_model(rm, tok, template):
    """A reward function (see `train`) from a loaded `nanohuatuo.reward.RewardModel`.

    When the reward model uses the policy's tokenizer and template, the token ids are scored as
    they are; otherwise the answers are scored as text in the reward model's own template.
    """
    from .reward import score_ids, score_texts  # the reward stage is only needed when we score with it
    probe = "头痛三天，伴有低烧。Fever 38.5°C?\n"
    same = (rm.template == template and rm.tok.vocab_size == tok.vocab_size and rm.tok.eos_id == tok.eos_id
            and rm.tok.encode(probe) == tok.encode(probe))

    def fn(prompts, responses, rows, texts):
        if same:
            return score_ids(rm, [p + r for p, r in zip(prompts, responses)])
        return score_texts(rm, [row["messages"] for row in rows], texts)
    fn.shares_tokenizer = same
    return fn


def load_reward_fn(path, tok, template, device=None, dtype=None):
    if not path:
        raise ValueError("no reward: pass --reward DIR (a reward model from train_rm.py) or call "
                         "ppo.train(cfg, reward_fn=...)")
    from .reward import load_reward_model
    return reward_fn_from_model(load_reward_model(path, device=device, dtype=dtype), tok, template)


def _same_path(a, b):
    return (a is None and b is None) or (a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b))


def shared_reward_fn(m: Models, cfg: PPOConfig, tok, template):
    """The reward model as one more adapter + head on the policy's base, or None when it cannot be.

    Possible when the reward model is a LoRA reward model (train_rm.py) on the same base and SFT
    adapter as the policy, and our LoRA layers cover its targets: for scoring, the LoRA layers run
    with the reward adapter's tensors (B folded by its scaling over ours) and the value head is the
    reward head, so one copy of the base serves policy, reference, value and reward. Under
    continue_adapter the SFT adapter is concatenated in (the reward model's trunk has it merged).
    """
    from .lora import read_adapter_config
    from .reward import RM_CONFIG, RewardModel, score_ids, score_texts
    where = os.path.join(cfg.reward or "", RM_CONFIG)
    if not cfg.reward or not os.path.exists(where):
        return None
    with open(where) as f:
        rc = json.load(f)
    if not rc.get("lora") or not _same_path(rc.get("base"), cfg.policy) or \
            not _same_path(rc.get("sft_adapter"), cfg.adapter):
        return None
    acfg = read_adapter_config(cfg.reward)
    with torch.device("meta"):
        shell = Transformer(m.model.config)  # weightless: only its LoRA tensors are made real and filled
    apply_lora(shell, r=acfg["r"], alpha=acfg["lora_alpha"], dropout=0.0, targets=acfg["target_modules"],
               use_rslora=bool(acfg.get("use_rslora")))
    for _, mod in lora_modules(shell):
        mod.lora_A.weight = nn.Parameter(torch.empty(mod.lora_A.weight.shape))
        mod.lora_B.weight = nn.Parameter(torch.empty(mod.lora_B.weight.shape))
    extra = load_adapter(shell, cfg.reward)
    rm_lora = {name: (mod.lora_A.weight, mod.lora_B.weight, mod.scaling) for name, mod in lora_modules(shell)}
    ours = dict(lora_modules(m.model))
    if not set(rm_lora) <= set(ours) or set(extra) != {"value_head.weight", "value_head.bias"}:
        return None
    device = m.model.embed_tokens.weight.device
    weights = {}
    for name, mod in ours.items():
        parts = [(a, b) for a, b in [m.ref_lora[name]]] if m.ref_lora is not None else []
        if name in rm_lora:
            a, b, s = rm_lora[name]
            parts.append((a, b * (s / mod.scaling)))  # our layer multiplies by its own scaling
        weights[name] = None if not parts else tuple(
            nn.Parameter(torch.cat(t, dim=d).to(device), requires_grad=False)
            for t, d in ((tuple(p[0] for p in parts), 0), (tuple(p[1] for p in parts), 1)))
    head = nn.Linear(m.model.config.dim, 1, device=device, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(extra["value_head.weight"])
        head.bias.copy_(extra["value_head.bias"])
    rm = RewardModel(model=m.model, tok=tok, template=rc["template"], bias=float(rc["bias"]),
                     gain=float(rc.get("gain", 1.0)), max_len=int(rc["max_len"]))

    def fn(prompts, responses, rows, texts):
        model = m.model
        keep = model.value_head
        model.value_head = head
        try:
            with use_lora_weights(model, weights), torch.no_grad():
                if rm.template == template:
                    return score_ids(rm, [p + r for p, r in zip(prompts, responses)])
                return score_texts(rm, [row["messages"] for row in rows], texts)
        finally:
            model.value_head = keep
    return fn


# ============================================================================= distributed helpers

def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_mean(values: dict) -> dict:
    """Average a dict of floats over ranks (one all-reduce); identity on one process."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def all_reduce_grads(params):
    """Average gradients over ranks in one flat all-reduce (LoRA tensors are small)."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


# ============================================================================= one PPO step

def _rows(exp, idx):
    """Rows idx of the experience with all-padding columns dropped: (ids, attn, P, r)."""
    P = exp["P"]
    attn = exp["attn"][idx]
    p0 = P - int(attn[:, :P].sum(-1).max())  # leading columns that are padding in every row
    r = int(exp["mask"][idx].sum(-1).max())  # the widest response among these rows
    return exp["ids"][idx][:, p0:P + r], attn[:, p0:P + r], P - p0, r


def pack(prompts, responses, stop_ids, pad_id, device=None):
    """One batch from prompt and response ids: left-padded prompts, then responses cut after their
    first stop token and right-padded, as a dict:

    ids, attn (B, P + R): tokens and the mask of real ones (padding on both sides is 0);
    P: the padded prompt width; mask (B, R): real response tokens, stop token included;
    ended (B,): whether the response has a stop token.
    """
    prompt_ids, prompt_attn = left_pad(prompts, pad_id, device)  # (B, P)
    B, R = len(responses), max(max(len(r) for r in responses), 1)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    resp, mask, ended = masks_after_stop(resp, stop_ids, pad_id, lengths=[len(r) for r in responses])
    resp, mask, ended = resp.to(device), mask.to(device), ended.to(device)
    return {"ids": torch.cat([prompt_ids, resp], 1), "attn": torch.cat([prompt_attn, mask], 1),
            "P": prompt_ids.shape[1], "mask": mask, "ended": ended}


@torch.no_grad()
def make_experience(m: Models, cfg: PPOConfig, kl_coef, prompts, rows, reward_fn, tok, stops, stop_strs, seed):
    """Roll out the prompts, score them, and compute everything the update needs, as a dict.

    Tensors (B, R) over the response: mask, old_logp, ref_logp, values, rewards, kl, advantages,
    returns; plus ids/attn (B, P + R), P, scores (B,), ended (B,), texts and metrics.
    """
    model = m.model
    device = model.embed_tokens.weight.device
    model.eval()
    chunk = cfg.rollout_batch_size or len(prompts)
    responses, gen_logp, finished = [], [], []
    for s in range(0, len(prompts), chunk):
        gen = generate_batch(model, prompts[s:s + chunk], cfg.max_new_tokens, temperature=cfg.temperature,
                             top_k=0, top_p=1.0, seed=seed + s, stop_ids=stops, stop_strings=stop_strs,
                             tokenizer=tok, pad_id=tok.pad_id, compile=cfg.compile, return_logprobs=True)
        responses += gen.tokens
        gen_logp += gen.logprobs
        finished += gen.finished
    exp = pack(prompts, responses, stops, tok.pad_id, device)
    B, R = exp["mask"].shape
    mask = exp["mask"]
    ended = exp["ended"] = exp["ended"] | torch.tensor(finished, device=device)  # a stop string ends it too
    sampled_logp = torch.zeros(B, R, device=device)
    for i, lp in enumerate(gen_logp):
        sampled_logp[i, :len(lp)] = torch.tensor(lp[:R])

    # old log-probs recomputed by the same forward the update uses; reference and values likewise
    old_logp, ref_logp, values, entropy = (torch.zeros(B, R, device=device) for _ in range(4))
    for idx in torch.arange(B, device=device).split(cfg.micro_batch_size):
        ids, attn, p, r = _rows(exp, idx)
        lp, ent, v = response_forward(model, ids, attn, p, cfg.temperature, want_entropy=True,
                                      value_head=m.value_head if m.critic_lora is None else None)
        old_logp[idx, :r], entropy[idx, :r] = lp, ent
        with reference(m):
            ref_logp[idx, :r] = response_forward(model, ids, attn, p, cfg.temperature)[0]
        if m.critic_lora is not None:
            with critic(m):
                v = response_forward(model, ids, attn, p, cfg.temperature, m.value_head, want_logp=False)[2]
        values[idx, :r] = v
    maskf = mask.float()
    old_logp, ref_logp, values = old_logp * maskf, ref_logp * maskf, values * maskf

    # scores: the reward model reads the answer up to its stop token; a never-ending answer gets the penalty
    lengths = mask.sum(-1).tolist()
    resp = exp["ids"][:, exp["P"]:]
    resp_lists = [resp[i, :n].tolist() for i, n in enumerate(lengths)]
    texts = [cut_at_stop(tok.decode([t for t in r if t not in stops]), stop_strs) for r in resp_lists]
    scores = torch.as_tensor(reward_fn(prompts, resp_lists, rows, texts), dtype=torch.float32).to(device).reshape(B)
    rm_scores = scores.clone()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))

    rewards, kl = compute_rewards(scores, old_logp, ref_logp, maskf, kl_coef, cfg.kl_estimator)
    advantages, returns = gae(rewards, values, maskf, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, maskf)
    exp.update(old_logp=old_logp, ref_logp=ref_logp, values=values, rewards=rewards, kl=kl,
               advantages=advantages, returns=returns, scores=scores, texts=texts, responses=resp_lists)
    exp["metrics"] = {
        "score": scores.mean().item(),
        "rm_score": rm_scores.mean().item(),
        "kl": kl.sum(-1).mean().item(),  # per answer, summed over tokens, with the chosen estimator
        "reward": rewards.sum(-1).mean().item(),  # score - kl_coef * KL, per answer
        "entropy": masked_mean(entropy, maskf).item(),
        "response_length": maskf.sum(-1).mean().item(),
        "eos_rate": ended.float().mean().item(),
        "value_ev": explained_variance(values, returns, maskf).item(),
        # sampling-time vs recomputed log-probs: should be ~0 (fp32) or small (bf16); large means a bug
        "logprob_gap": masked_mean((sampled_logp - old_logp).abs(), maskf).item(),
    }
    return exp


def ppo_update(m: Models, cfg: PPOConfig, exp, optimizer, params, seed):
    """PPO epochs over shuffled minibatches of the experience; returns the mean of the update stats."""
    model = m.model
    model.train()  # only enables gradient checkpointing: dropout is off everywhere
    model.grad_checkpointing = cfg.grad_checkpointing
    B = exp["mask"].shape[0]
    device = exp["mask"].device
    g = torch.Generator().manual_seed(seed)
    sums, n_mb, skipped, epochs = {}, 0, 0, 0
    for epoch in range(cfg.ppo_epochs):
        epochs += 1
        epoch_kl, epoch_n = 0.0, 0
        perm = torch.randperm(B, generator=g).to(device)
        for mb in perm.chunk(cfg.num_mini_batches):
            n_tok = exp["mask"][mb].sum().clamp(min=1).float()
            acc = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "ratio": 0.0,
                   "vf_clipfrac": 0.0}
            for idx in mb.split(cfg.micro_batch_size):
                ids, attn, p, r = _rows(exp, idx)
                mask = exp["mask"][idx, :r].float()
                old_v, ret = exp["values"][idx, :r], exp["returns"][idx, :r]
                shared = m.critic_lora is None
                logp, _, v = response_forward(model, ids, attn, p, cfg.temperature,
                                              value_head=m.value_head if shared else None)
                pg, pst = policy_loss(logp, exp["old_logp"][idx, :r], exp["advantages"][idx, :r], mask,
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
            all_reduce_grads(params)
            acc = all_mean(acc)
            if not math.isfinite(acc["ratio"]) or acc["ratio"] > cfg.max_ratio:
                skipped += 1  # a runaway ratio means the policy moved too far: drop this minibatch
                optimizer.zero_grad(set_to_none=True)
                continue
            acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
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

def _ckpt_dirs(out):
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")]
    return [os.path.join(root, d) for d in sorted(names)]


def save_checkpoint(m: Models, cfg: PPOConfig, optimizer, state: dict):
    """Adapter(s) + value head + optimizer + RNG + step, kl coef and data position, written atomically.

    Everything goes to checkpoints/step_N.tmp, which is renamed to step_N once complete; older
    checkpoints beyond keep_checkpoints are then removed.
    """
    root = os.path.join(cfg.out, "checkpoints")
    final = os.path.join(root, f"step_{state['step']:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    head = {"value_head.weight": m.value_head.weight, "value_head.bias": m.value_head.bias}
    if m.critic_lora is None:
        save_adapter(m.model, os.path.join(tmp, "policy"), extra=head)
    else:
        save_adapter(m.model, os.path.join(tmp, "policy"))
        with critic(m):
            save_adapter(m.model, os.path.join(tmp, "critic"), extra=head)
    torch.save({**state, "optimizer": optimizer.state_dict(), "rng": rng_state(), "config": asdict(cfg)},
               os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in _ckpt_dirs(cfg.out)[:-max(cfg.keep_checkpoints, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(m: Models, path, optimizer, device):
    """Restore what save_checkpoint wrote; returns the state dict (step, kl_coef, data_pos)."""
    extra = load_adapter(m.model, os.path.join(path, "policy"), trainable=True)
    if m.critic_lora is not None:
        with critic(m):
            extra = load_adapter(m.model, os.path.join(path, "critic"), trainable=True)
    if "value_head.weight" not in extra:
        raise KeyError(f"{path}: no value head in the checkpoint (was it written with another --critic?)")
    with torch.no_grad():
        m.value_head.weight.copy_(extra["value_head.weight"])
        m.value_head.bias.copy_(extra["value_head.bias"])
    m.model.eval()
    state = torch.load(os.path.join(path, "state.pt"), map_location=device, weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    set_rng_state(state.pop("rng"))
    return state


def save_policy_adapter(m: Models, out_dir):
    """Write the trained policy as one PEFT adapter on the original base (value head in extra).

    With a merged SFT adapter, the export concatenates SFT and PPO into one adapter (see the
    module docstring), built on a weightless (meta-device) copy of the model.
    """
    head = {"value_head.weight": m.value_head.weight, "value_head.bias": m.value_head.bias}
    if m.sft is None:
        if m.critic_lora is not None:
            save_adapter(m.model, out_dir)
        else:
            save_adapter(m.model, out_dir, extra=head)
        return
    ppo = {name: (mod.lora_A.weight.detach().cpu(), mod.lora_B.weight.detach().cpu(), mod.scaling)
           for name, mod in lora_modules(m.model)}
    r1 = max(a.shape[0] for a, _, _ in m.sft.values())
    r2 = max(a.shape[0] for a, _, _ in ppo.values())
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in list(m.sft) + list(ppo)})
    with torch.device("meta"):
        shell = Transformer(m.model.config)
    apply_lora(shell, r=r1 + r2, alpha=r1 + r2, dropout=0.0, targets=suffixes)  # scaling 1
    for name, mod in lora_modules(shell):
        A = torch.zeros(r1 + r2, mod.in_features)
        B = torch.zeros(mod.out_features, r1 + r2)
        if name in m.sft:
            a, b, s = m.sft[name]
            A[:a.shape[0]], B[:, :a.shape[0]] = a, b * s
        if name in ppo:
            a, b, s = ppo[name]
            A[r1:r1 + a.shape[0]], B[:, r1:r1 + a.shape[0]] = a, b * s
        mod.lora_A.weight, mod.lora_B.weight = nn.Parameter(A), nn.Parameter(B)
    shell.source_dir = getattr(m.model, "source_dir", None)
    save_adapter(shell, out_dir, extra=None if m.critic_lora is not None else head)


def save_merged(m: Models, out_dir):
    """A full model with every adapter folded in (destroys the LoRA layers: call last)."""
    model = m.model
    model.value_head = None
    merge_and_unload(model)
    model.save_pretrained(out_dir)


# ============================================================================= the loop

def _setup_distributed(cfg):
    """(device, whether we started the process group): torchrun's group, gloo on CPU, nccl on CUDA."""
    d = setup_distributed(cfg.device or "auto")  # the SFT loop's: one process or torchrun's group
    return d.device, d.owns_group


def _dtype(cfg, device):
    if cfg.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _print_samples(step, exp, prompts, tok, out, n=2):
    with open(os.path.join(out, "samples.jsonl"), "a", encoding="utf-8") as f:
        for i in range(min(n, len(prompts))):
            prompt = tok.decode(prompts[i])
            row = {"step": step, "prompt": prompt, "response": exp["texts"][i], "score": exp["scores"][i].item()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"--- sample {i} at step {step} (score {row['score']:.3f})\n[prompt] ...{prompt[-300:]}\n"
                  f"[answer] {row['response']}")


PLOTS = {"curves.png": ["score", "kl", "reward", "response_length", "eos_rate"],
         "ppo_stats.png": ["entropy", "approx_kl", "clipfrac", "value_ev", "kl_coef"]}


def _plot(out, path):
    for name, keys in PLOTS.items():
        plot_metrics(path, os.path.join(out, name), keys, title="PPO")


def train(cfg: PPOConfig, reward_fn=None) -> dict:
    """Run PPO; returns the last step's metrics plus first/last score and KL and the per-step history.

    reward_fn(prompts, responses, rows, texts) -> (B,) scores, for prompt ids, response ids (cut
    after the first stop token, which they include), prompt records {id, messages, reference} and
    answer texts (stop token/strings removed). It may also be a loaded `nanohuatuo.reward.RewardModel`.
    None: the reward model in cfg.reward is loaded.
    """
    cfg.check()
    device, started = _setup_distributed(cfg)
    try:
        return _train(cfg, reward_fn, device)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()  # we made it, we end it (a process exiting with it alive aborts)


def _train(cfg, reward_fn, device):
    rank, world = _world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world} ranks")
    dtype = _dtype(cfg, device)
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank
    random.seed(cfg.seed)
    tok = Tokenizer.from_pretrained(cfg.policy)
    template = cfg.template or guess_template(cfg.policy)
    stops = sorted(stop_token_ids(tok, template))
    stop_strs = stop_strings(template)
    if tok.pad_id in stops:
        print(f"note: {cfg.policy}'s pad id {tok.pad_id} is also a stop id; masks use lengths, so EOS still counts")
    m = load_policy(cfg, device=device, dtype=dtype)
    rows, prompts = load_prompts(cfg.prompts, tok, template, cfg.max_prompt_len)
    if reward_fn is None:
        reward_fn = shared_reward_fn(m, cfg, tok, template)
        if reward_fn is not None and rank == 0:
            print(f"reward model {cfg.reward} shares the policy's base: scoring with its adapter and head "
                  f"on the same weights (no second copy)")
        if reward_fn is None:
            reward_fn = load_reward_fn(cfg.reward, tok, template, device=device, dtype=dtype)
    elif not callable(reward_fn):
        reward_fn = reward_fn_from_model(reward_fn, tok, template)
    groups = trainable_groups(m, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.Adam(groups, eps=cfg.adam_eps)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    max_steps = cfg.max_steps or math.ceil(len(rows) / cfg.batch_size)
    local = cfg.batch_size // world
    if local < cfg.num_mini_batches:
        raise ValueError(f"{local} rollouts per rank cannot make {cfg.num_mini_batches} minibatches; "
                         f"raise --batch-size or lower --num-mini-batches")

    state = {"step": 0, "kl_coef": cfg.kl_coef, "data_pos": 0}
    found = _ckpt_dirs(cfg.out)
    if found and not cfg.resume:
        raise FileExistsError(f"{cfg.out} already has checkpoints ({found[-1]}); pass --resume to continue "
                              f"or choose another --out")
    if cfg.resume and found:
        state = load_checkpoint(m, found[-1], optimizer, device)
        if rank == 0:
            print(f"resumed from {found[-1]} (step {state['step']}, kl_coef {state['kl_coef']:.4g})")
    elif rank == 0:
        if cfg.resume:
            print(f"--resume: no checkpoint in {cfg.out}/checkpoints, starting from step 0")
        os.makedirs(cfg.out, exist_ok=True)
        for f in ("metrics.jsonl", "samples.jsonl"):
            if os.path.exists(os.path.join(cfg.out, f)):
                os.remove(os.path.join(cfg.out, f))
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "ppo_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), total_steps=max_steps,
                     stream=None if rank else sys.stdout)
    history = []
    kl_coef = state["kl_coef"]
    last_plot = time.time()
    for step in range(state["step"] + 1, max_steps + 1):
        if cfg.anneal_lr:
            frac = 1 - (step - 1) / max_steps
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * frac
        idx = prompt_indices(len(rows), state["data_pos"], cfg.batch_size, cfg.seed)[rank * local:(rank + 1) * local]
        step_seed = (cfg.seed * 1_000_003 + step) * 1009 + rank  # rollouts and shuffles reproducible on resume
        t0 = time.time()
        exp = make_experience(m, cfg, kl_coef, [prompts[i] for i in idx], [rows[i] for i in idx], reward_fn,
                              tok, stops, stop_strs, step_seed)
        t1 = time.time()
        stats = ppo_update(m, cfg, exp, optimizer, params, step_seed)
        t2 = time.time()
        metrics = all_mean(exp["metrics"])
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["kl"], cfg.kl_target, cfg.kl_horizon, cfg.batch_size)
        state.update(step=step, kl_coef=kl_coef, data_pos=state["data_pos"] + cfg.batch_size)
        row = {**metrics, **stats, "kl_coef": kl_coef, "lr": optimizer.param_groups[0]["lr"],
               "rollout_s": t1 - t0, "update_s": t2 - t1,
               "tokens": int(exp["mask"].sum().item()) * world}
        history.append(log.write(step, **row) if rank == 0 else dict(row, step=step))
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            _print_samples(step, exp, [prompts[i] for i in idx], tok, cfg.out)
        if step % cfg.save_every == 0 or step == max_steps:
            if rank == 0:
                save_checkpoint(m, cfg, optimizer, state)
                if time.time() - last_plot > 120:  # a plot costs about a second: refresh it now and then
                    _plot(cfg.out, log.path)
                    last_plot = time.time()
            if dist.is_initialized():
                dist.barrier()

    if rank == 0:
        save_policy_adapter(m, cfg.out)
        if m.critic_lora is not None:
            with critic(m):
                save_adapter(m.model, os.path.join(cfg.out, "critic"),
                             extra={"value_head.weight": m.value_head.weight, "value_head.bias": m.value_head.bias})
        if history and os.path.exists(log.path):
            _plot(cfg.out, log.path)
        if cfg.save_merged:
            save_merged(m, os.path.join(cfg.out, "merged"))
        print(f"wrote the policy adapter to {cfg.out} (load with --model {cfg.policy} --adapter {cfg.out})")
    if dist.is_initialized():
        dist.barrier()
    summary = dict(history[-1]) if history else {}
    if history:
        summary.update(first_score=history[0]["score"], last_score=history[-1]["score"],
                       first_kl=history[0]["kl"], last_kl=history[-1]["kl"])
    summary.update(steps=len(history), out=cfg.out, history=history)
    return summary


# ============================================================================= CLI

def _float_or_none(text):
    return None if text.lower() in ("none", "off") else float(text)


def parse_args(argv=None) -> PPOConfig:
    d = PPOConfig()
    p = argparse.ArgumentParser(
        description="PPO with LoRA on an SFT model against a reward model (HuatuoGPT's RLAIF stage).",
        epilog="torchrun --nproc-per-node N train_ppo.py ... runs data-parallel (each rank rolls out its share).")
    a = p.add_argument
    a("--policy", required=True, help="base model directory (HF layout with tokenizer)")
    a("--adapter", help="SFT LoRA adapter on --policy (merged into the weights, then a fresh PPO LoRA is added)")
    a("--continue-adapter", action="store_true", help="keep training the SFT adapter instead of a fresh LoRA")
    a("--reward", help="reward model directory from train_rm.py")
    a("--prompts", required=True, help="JSONL conversations (last assistant turn dropped) or prompt records")
    a("--out", required=True, help="output directory: adapter, metrics.jsonl, curves.png, checkpoints/")
    a("--template", help="chat template (default: guessed from --policy)")
    a("--max-prompt-len", type=int, default=d.max_prompt_len)
    a("--max-steps", type=int, help="PPO steps (default: one pass over the prompts)")
    a("--batch-size", type=int, default=d.batch_size, help="rollouts per step over all ranks")
    a("--max-new-tokens", type=int, default=d.max_new_tokens)
    a("--temperature", type=float, default=d.temperature)
    a("--rollout-batch-size", type=int, default=d.rollout_batch_size, help="rows generated at once (0: all)")
    a("--missing-eos-penalty", type=_float_or_none, default=d.missing_eos_penalty,
      help="score of answers that never stop ('none' keeps the reward model's score)")
    a("--kl-coef", type=float, default=d.kl_coef)
    a("--kl-estimator", choices=["k1", "k3"], default=d.kl_estimator)
    a("--adaptive-kl", action="store_true")
    a("--kl-target", type=float, default=d.kl_target)
    a("--kl-horizon", type=int, default=d.kl_horizon)
    a("--ppo-epochs", type=int, default=d.ppo_epochs)
    a("--num-mini-batches", type=int, default=d.num_mini_batches)
    a("--micro-batch-size", type=int, default=d.micro_batch_size)
    a("--gamma", type=float, default=d.gamma)
    a("--lam", type=float, default=d.lam)
    a("--clip-range", type=float, default=d.clip_range)
    a("--clip-range-value", type=float, default=d.clip_range_value)
    a("--vf-coef", type=float, default=d.vf_coef)
    a("--no-whiten-advantages", dest="whiten_advantages", action="store_false")
    a("--max-ratio", type=float, default=d.max_ratio)
    a("--target-approx-kl", type=float, default=d.target_approx_kl)
    a("--lr", type=float, default=d.lr)
    a("--value-lr", type=float, default=d.value_lr)
    a("--adam-eps", type=float, default=d.adam_eps)
    a("--max-grad-norm", type=float, default=d.max_grad_norm)
    a("--anneal-lr", action="store_true")
    a("--lora-r", type=int, default=d.lora_r)
    a("--lora-alpha", type=float, default=d.lora_alpha)
    a("--lora-targets", default=",".join(d.lora_targets), help="comma-separated module names, or all-linear")
    a("--critic", choices=["shared", "separate"], default=d.critic)
    a("--device")
    a("--dtype", choices=["float32", "bfloat16", "float16"])
    a("--grad-checkpointing", action="store_true")
    a("--compile", action="store_true")
    a("--seed", type=int, default=d.seed)
    a("--sample-every", type=int, default=d.sample_every)
    a("--save-every", type=int, default=d.save_every)
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--save-merged", action="store_true", help="also write OUT/merged, a full model with the adapters folded in")
    args = vars(p.parse_args(argv))
    targets = args.pop("lora_targets")
    args["lora_targets"] = targets if targets == "all-linear" else tuple(t for t in targets.split(",") if t)
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    return PPOConfig(**{k: v for k, v in args.items() if k in fields})


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"train_ppo.py: {e}", file=sys.stderr)  # bad input: the message names the file or flag
        return 1
    return 0
