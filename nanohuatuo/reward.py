"""Reward model: a scalar score for (conversation, answer), trained on the AI judge's rankings (RLAIF step 3).

The model is the base transformer (with the SFT adapter merged into it, when given) plus a LoRA
adapter (or all weights trained: lora_r=0) plus a linear value head d -> 1 read at the LAST REAL
token of a right-padded batch (the answer's end token). Loss, per prompt with answers ranked
best first: all C(K,2) pairs form one batch element,
    loss = mean over pairs (better, worse) of -logsigmoid(r_better - r_worse)
           [+ center_coef * mean((r_better + r_worse)^2), which keeps scores near 0]
and a batch is the mean over its prompts (InstructGPT: shuffling single pairs over the dataset
overfits within one epoch). One epoch, AdamW, short warm-up, lr annealed to 0 (cosine or linear).
LoRA lr 1e-4 by default (higher erodes a medical model, lower barely moves a fresh head in one
epoch); the value head gets the same lr; LoRA and head weights stay float32 on a bf16 base.
Full-weight training (lora_r=0) defaults to lr 1e-5.

Held-out pairwise accuracy (fraction of held-out pairs with r_better > r_worse) is logged during
and after training. Then the answers of the training preferences (or --norm-samples) are scored
and their mean is stored as `bias`, so SFT-like answers score 0 on average at PPO time; 1/std is
stored as `gain` only with normalize_std (otherwise gain is 1 and the std is kept as `score_std`).

Saved layout in `out`:
    LoRA mode:  adapter_config.json + adapter_model.safetensors   (PEFT layout, the RM's LoRA)
                extra.safetensors: value_head.weight (1, d), value_head.bias (1,)
    full mode:  config.json + model*.safetensors in the Ziya/HuatuoGPT reward-model layout
                (Llama family: architectures LlamaRewardModel, model.* + value_head.*, no lm_head)
                + the base's tokenizer files
    both:       reward_config.json {"base": abs path of the base (full mode: out itself),
                "sft_adapter": adapter merged into the base at load (null in full mode: already in
                the weights), "template", "bias", "gain", "lora", "max_len", "score_std",
                "eval_accuracy", "trained_from": {"base", "sft_adapter"}}, written last: a directory
                with it is complete; metrics.jsonl and metrics.png (loss, accuracy curves).

Scoring API (what PPO uses):
    rm = load_reward_model(path)             # our RM dir, or a released HuatuoGPT/Ziya RM dir
    score_ids(rm, seqs) -> (B,) float32      # (raw - bias) * gain at each sequence's last token
    score_texts(rm, messages_list, answers)  # renders with rm.template, then score_ids
"""

import argparse
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chat import pick_device
from .data import DataError, iter_jsonl, split_heldout
from .hf import LLAMA_LIKE, TORCH_DTYPES, _atomic_json, read_config
from .lora import CONFIG_FILE as ADAPTER_CONFIG, apply_lora, load_adapter, merge_and_unload, save_adapter
from .metrics import MetricsLog, plot_metrics
from .model import Transformer
from .templates import guess_template, render
from .tokenizer import Tokenizer

RM_CONFIG = "reward_config.json"


@dataclass
class RMConfig:
    base: str = ""  # base model directory (Hugging Face layout), usually the SFT model's base
    data: str = ""  # preference JSONL from `python -m nanohuatuo.feedback rank`
    out: str = "runs/rm"
    adapter: str | None = None  # SFT LoRA adapter, merged into the base before the RM's own LoRA
    template: str | None = None  # None: guessed from the base directory
    lora_r: int = 8  # 0: train all weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # or a comma list such as q_proj,v_proj
    lr: float | None = None  # None: 1e-4 with LoRA, 1e-5 for all weights
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    warmup_frac: float = 0.03
    schedule: str = "cosine"  # cosine | linear, both down to 0 at the end
    epochs: int = 1
    batch_prompts: int = 4  # prompts per optimizer step (each brings all its K answers)
    micro_prompts: int = 0  # prompts per forward/backward (gradient accumulation); 0: the whole batch
    max_len: int = 1024  # longer sequences lose tokens from the left (the score is read at the end)
    eval_frac: float = 0.1  # held out from --data when no --eval-data
    eval_data: str | None = None
    eval_every: int = 200  # steps; and always at the end
    max_steps: int | None = None
    center_coef: float = 0.0  # 0.01 is the usual value when used
    norm_samples: str | None = None  # default: the answers of the training preferences
    norm_max: int = 2000  # at most this many answers scored for the bias
    normalize_std: bool = False
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    device: str | None = None
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    seed: int = 0


@dataclass
class RewardModel:
    model: Transformer  # with value_head, eval mode, frozen
    tok: Tokenizer
    template: str
    bias: float
    gain: float
    max_len: int


# ----------------------------------------------------------------------------- loss and forward

def pairwise_loss(rewards: torch.Tensor, order=None, center_coef: float = 0.0) -> torch.Tensor:
    """Mean over all C(K,2) pairs of -logsigmoid(r_better - r_worse) for one prompt's K answers.

    rewards: (K,) scores of the answers; order: answer indices best first (None: already best first).
    """
    r = rewards if order is None else rewards[torch.as_tensor(order, device=rewards.device)]
    i, j = torch.triu_indices(len(r), len(r), offset=1, device=r.device)  # i ranked above j
    loss = -F.logsigmoid(r[i] - r[j]).mean()
    if center_coef:
        loss = loss + center_coef * ((r[i] + r[j]) ** 2).mean()
    return loss


def pairwise_accuracy(rewards: torch.Tensor, order=None) -> tuple[int, int]:
    """(pairs with r_better > r_worse, pairs) for one prompt's K answers; ties count as wrong."""
    r = rewards if order is None else rewards[torch.as_tensor(order, device=rewards.device)]
    i, j = torch.triu_indices(len(r), len(r), offset=1, device=r.device)
    return int((r[i] > r[j]).sum()), len(i)


def right_pad(seqs: list[list[int]], pad_id: int, max_len: int | None = None, device=None):
    """(B, T) ids right-padded with pad_id and the (B, T) mask of real tokens; longer rows keep their last max_len."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("nanohuatuo/reward.py: an empty token sequence cannot be scored; render prompt + answer first")
    seqs = [s[-max_len:] if max_len else s for s in seqs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids.to(device), mask.to(device)


def rm_forward(model: Transformer, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Value-head output (B,) float32 at the last real token of each row of a right-padded batch."""
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("nanohuatuo/reward.py: rm_forward needs right padding (real tokens first); "
                         "build the batch with right_pad")
    # with right padding a real token only attends to earlier real tokens under the causal mask,
    # so no attention mask is needed and SDPA takes its fastest causal path
    h = model.hidden_states(ids)  # (B, T, dim)
    last = mask.sum(-1) - 1  # (B,)
    h_last = h[torch.arange(ids.shape[0], device=ids.device), last]  # (B, dim)
    return model.values(h_last[:, None]).squeeze(1).float()


@torch.no_grad()
def raw_scores(model: Transformer, seqs: list[list[int]], pad_id: int, max_len: int, batch_size: int = 16):
    """Value-head scores (N,) float32 of token sequences, before bias and gain."""
    device = model.embed_tokens.weight.device
    # similar lengths together so little compute goes to padding; scores go back in input order
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), dtype=torch.float32, device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = right_pad([seqs[i] for i in idx], pad_id, max_len, device)
        out[torch.tensor(idx, device=device)] = rm_forward(model, ids, mask)
    return out


# ----------------------------------------------------------------------------- data

def as_messages(prompt) -> list[dict]:
    """A preference record's prompt (a question string or a messages list) as messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def with_answer(prompt, answer: str) -> list[dict]:
    return as_messages(prompt) + [{"role": "assistant", "content": answer}]


def read_preferences(path, tok: Tokenizer, template: str) -> list[dict]:
    """Preference records -> [{"id", "seqs": token ids of prompt + answer, best answer first}]."""
    examples = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        prompt, answers = row.get("prompt", row.get("question")), row.get("answers")
        if not isinstance(prompt, (str, list)) or not isinstance(answers, list) or len(answers) < 2 \
                or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: expected a preference record {{'prompt', 'answers': [best, ..., worst]}} "
                            f"with at least 2 answers, as `python -m nanohuatuo.feedback rank` writes")
        try:
            seqs = [render(with_answer(prompt, a), tok, template)[0] for a in answers]
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        examples.append({"id": row.get("id", where), "seqs": seqs})
    if not examples:
        raise DataError(f"{path}: no preference records; run `python -m nanohuatuo.feedback rank` first")
    return examples


def read_norm_samples(path, tok: Tokenizer, template: str) -> list[list[int]]:
    """Token ids of SFT-like answers for the bias: every answer of preference records or judge items,
    or conversations ending with an assistant turn (scored as they are)."""
    seqs = []
    for lineno, row in iter_jsonl(path):
        try:
            if isinstance(row.get("answers"), list):
                prompt = row.get("prompt", row.get("question"))
                seqs += [render(with_answer(prompt, a), tok, template)[0] for a in row["answers"]]
            elif isinstance(row.get("messages"), list):
                seqs.append(render(row["messages"], tok, template)[0])
            else:
                raise ValueError("expected 'answers' (with 'prompt' or 'question') or 'messages'")
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: normalisation sample: {e}") from None
    return seqs


# ----------------------------------------------------------------------------- training

def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at update `step` (0-based): linear warm-up, then cosine/linear to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - progress
    raise ValueError(f"nanohuatuo/reward.py: schedule {schedule!r}; use cosine or linear")


def _dtype(dtype, device):
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype


def _load_trunk(base, sft_adapter, device, dtype, keep_lm_head=False) -> Transformer:
    """Base (+ merged SFT adapter) with a value head (loaded, or fresh) and, usually, no lm_head."""
    model = Transformer.from_pretrained(base, dtype=dtype, device=device, adapter=sft_adapter, value_head=True)
    if sft_adapter:
        merge_and_unload(model)
    if not keep_lm_head:
        model.lm_head = None  # a reward model never needs the vocab projection: save its memory
        model.config.lm_head = False
    return model


def build_model(cfg: RMConfig, device, dtype) -> tuple[Transformer, list, list]:
    """The trainable reward model and its (trunk params, head params)."""
    torch.manual_seed(cfg.seed)  # value head and LoRA A initialisation
    # full mode keeps lm_head outside the Llama family: only there is the head-less layout reloadable
    keep = cfg.lora_r == 0 and read_config(cfg.base)[1].arch not in LLAMA_LIKE
    model = _load_trunk(cfg.base, cfg.adapter, device, dtype, keep_lm_head=keep)
    model.value_head.requires_grad_(True)
    head = list(model.value_head.parameters())
    if cfg.lora_r > 0:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else tuple(cfg.lora_targets.split(","))
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets)
        model.value_head.requires_grad_(True)  # apply_lora froze everything but the adapters
    elif model.lm_head is not None:
        model.lm_head.requires_grad_(False)
    trunk = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("value_head.")]
    model.grad_checkpointing = cfg.grad_checkpointing
    return model, trunk, head


def evaluate(model, examples, pad_id, max_len, batch_prompts, center_coef=0.0) -> dict:
    """Mean pairwise loss and pairwise accuracy over all pairs of `examples`."""
    was_training = model.training
    model.eval()
    losses, correct, pairs = [], 0, 0
    device = model.embed_tokens.weight.device
    with torch.no_grad():
        for start in range(0, len(examples), batch_prompts):
            chunk = examples[start:start + batch_prompts]
            ids, mask = right_pad([s for ex in chunk for s in ex["seqs"]], pad_id, max_len, device)
            r, i = rm_forward(model, ids, mask), 0
            for ex in chunk:
                k = len(ex["seqs"])
                losses.append(pairwise_loss(r[i:i + k], center_coef=center_coef).item())
                c, n = pairwise_accuracy(r[i:i + k])
                correct, pairs, i = correct + c, pairs + n, i + k
    model.train(was_training)
    if not pairs:
        return {"eval_loss": float("nan"), "eval_accuracy": float("nan"), "eval_pairs": 0}
    return {"eval_loss": sum(losses) / len(losses), "eval_accuracy": correct / pairs, "eval_pairs": pairs}


def train(cfg: RMConfig) -> dict:
    """Train a reward model as `cfg` says, save it to cfg.out, return the final metrics."""
    if not cfg.base or not cfg.data:
        raise ValueError("nanohuatuo/reward.py: RMConfig needs base (model directory) and data (preference JSONL)")
    device = pick_device(cfg.device)
    dtype = _dtype(cfg.dtype, device)
    lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.lora_r > 0 else 1e-5)
    head_lr = cfg.head_lr if cfg.head_lr is not None else lr
    os.makedirs(cfg.out, exist_ok=True)
    for stale in (RM_CONFIG, "metrics.jsonl"):  # no half-old directory if this run stops early
        if os.path.exists(os.path.join(cfg.out, stale)):
            os.remove(os.path.join(cfg.out, stale))

    tok = Tokenizer(cfg.base)
    template = cfg.template or guess_template(cfg.base)
    examples = read_preferences(cfg.data, tok, template)
    if cfg.eval_data:
        train_ex, eval_ex = examples, read_preferences(cfg.eval_data, tok, template)
    else:
        train_ex, eval_ex = split_heldout(examples, cfg.eval_frac, cfg.seed)
    n_seqs = sum(len(ex["seqs"]) for ex in train_ex)
    n_long = sum(len(s) > cfg.max_len for ex in train_ex for s in ex["seqs"])
    print(f"reward: {len(train_ex)} training prompts ({n_seqs} answers), {len(eval_ex)} held out; template "
          f"{template}; {n_long} answers longer than max_len {cfg.max_len} lose their first tokens")

    model, trunk, head = build_model(cfg, device, dtype)
    model.train()
    print(f"reward: {'LoRA r=%d' % cfg.lora_r if cfg.lora_r else 'all weights'}, "
          f"{sum(p.numel() for p in trunk + head):,} trainable parameters, {dtype}, {device}")
    groups = [{"params": [p for p in trunk if p.ndim >= 2], "lr": lr, "weight_decay": cfg.weight_decay},
              {"params": [p for p in trunk if p.ndim < 2], "lr": lr, "weight_decay": 0.0},
              {"params": head, "lr": head_lr, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["peak_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)

    # the batches of every epoch, in a seeded order per epoch
    batches = []
    for epoch in range(cfg.epochs):
        order = list(range(len(train_ex)))
        random.Random(cfg.seed + epoch).shuffle(order)
        batches += [order[s:s + cfg.batch_prompts] for s in range(0, len(order), cfg.batch_prompts)]
    batches = batches[:cfg.max_steps] if cfg.max_steps else batches
    total = len(batches)
    warmup = round(cfg.warmup_frac * total)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), total_steps=total)
    micro = cfg.micro_prompts or cfg.batch_prompts
    recent, result = [], {}
    params = trunk + head

    for step, batch in enumerate(batches):
        factor = lr_factor(step, total, warmup, cfg.schedule)
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
        opt.zero_grad(set_to_none=True)
        loss_sum, correct, pairs, tokens = 0.0, 0, 0, 0
        for start in range(0, len(batch), micro):
            chunk = [train_ex[i] for i in batch[start:start + micro]]
            ids, mask = right_pad([s for ex in chunk for s in ex["seqs"]], tok.pad_id, cfg.max_len, device)
            r, i, losses = rm_forward(model, ids, mask), 0, []
            for ex in chunk:
                k = len(ex["seqs"])
                losses.append(pairwise_loss(r[i:i + k], center_coef=cfg.center_coef))
                c, n = pairwise_accuracy(r[i:i + k].detach())
                correct, pairs, i = correct + c, pairs + n, i + k
            loss = torch.stack(losses).sum() / len(batch)  # mean over the step's prompts
            if not torch.isfinite(loss):
                raise FloatingPointError(f"nanohuatuo/reward.py: loss is {loss.item()} at step {step + 1}; lower "
                                         f"--lr, and train in bfloat16 or float32 rather than float16")
            loss.backward()
            loss_sum += loss.item()
            tokens += int(mask.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        recent = (recent + [(loss_sum, correct, pairs)])[-20:]
        log.write(step + 1, loss=loss_sum, accuracy=correct / pairs, lr=lr * factor,
                  grad_norm=float(grad_norm), tokens=tokens)
        if eval_ex and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
            ev = evaluate(model, eval_ex, tok.pad_id, cfg.max_len, cfg.batch_prompts, cfg.center_coef)
            log.write(step + 1, **ev)

    model.eval()
    ev = evaluate(model, eval_ex, tok.pad_id, cfg.max_len, cfg.batch_prompts, cfg.center_coef)
    if eval_ex:
        log.write(total, **ev)
    result.update(ev)
    result["steps"] = total
    result["train_loss"] = sum(x[0] for x in recent) / max(len(recent), 1)  # over the last 20 steps
    result["train_accuracy"] = sum(x[1] for x in recent) / max(sum(x[2] for x in recent), 1)

    # normalisation: SFT-like answers should score 0 on average at PPO time
    if cfg.norm_samples:
        norm = read_norm_samples(cfg.norm_samples, tok, template)
    else:
        norm = [s for ex in train_ex for s in ex["seqs"]]
    if len(norm) > cfg.norm_max:
        norm = random.Random(cfg.seed).sample(norm, cfg.norm_max)
    scores = raw_scores(model, norm, tok.pad_id, cfg.max_len)
    bias = scores.mean().item()
    std = scores.std(correction=0).item() if len(scores) > 1 else 1.0
    gain = 1.0 / max(std, 1e-6) if cfg.normalize_std else 1.0
    result.update(bias=bias, gain=gain, score_std=std, norm_samples=len(norm))
    print(f"reward: bias {bias:.4f} (mean raw score of {len(norm)} SFT answers), std {std:.4f}, gain {gain:.4f}; "
          f"held-out pairwise accuracy {ev['eval_accuracy']:.3f} over {ev['eval_pairs']} pairs")

    save_reward_model(model, cfg, template, bias, gain, std, ev["eval_accuracy"])
    try:
        plot_metrics(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "metrics.png"),
                     ["loss", "accuracy", "eval_loss", "eval_accuracy", "lr"], title="reward model")
    except ValueError:
        pass  # nothing logged (zero steps)
    result["out"] = os.path.abspath(cfg.out)
    return result


def save_reward_model(model, cfg: RMConfig, template, bias, gain, score_std, eval_accuracy):
    """Write the layout described in the module docstring; reward_config.json last."""
    out = cfg.out
    base = os.path.abspath(cfg.base)
    adapter = os.path.abspath(cfg.adapter) if cfg.adapter else None
    lora = cfg.lora_r > 0
    if lora:
        head = {"value_head.weight": model.value_head.weight, "value_head.bias": model.value_head.bias}
        save_adapter(model, out, extra=head)
    else:
        model.save_pretrained(out, copy_from=base)  # tokenizer files come along from the base
    _atomic_json(os.path.join(out, RM_CONFIG), {
        "base": base if lora else os.path.abspath(out),
        "sft_adapter": adapter if lora else None,  # full mode: already merged into the saved weights
        "template": template, "bias": bias, "gain": gain, "lora": lora, "max_len": cfg.max_len,
        "score_std": score_std, "eval_accuracy": None if math.isnan(eval_accuracy) else eval_accuracy,
        "trained_from": {"base": base, "sft_adapter": adapter}})


# ----------------------------------------------------------------------------- loading and scoring

def load_reward_model(path, device=None, dtype=None) -> RewardModel:
    """A frozen reward model in eval mode from our RM directory (LoRA or full) or a released
    HuatuoGPT/Ziya reward-model directory (LlamaRewardModel, value_head.* tensors, no reward_config.json:
    bias 0, gain 1, template guessed, max_len from its config)."""
    device = pick_device(device)
    dtype = _dtype(dtype, device)
    where = os.path.join(path, RM_CONFIG)
    if os.path.exists(where):
        with open(where) as f:
            rc = json.load(f)
        if rc["lora"]:
            if not os.path.isdir(rc["base"]):
                raise FileNotFoundError(f"{where}: base model {rc['base']} not found; fix 'base' in that file")
            model = _load_trunk(rc["base"], rc.get("sft_adapter"), device, dtype)
            extra = load_adapter(model, path)
            if set(extra) != {"value_head.weight", "value_head.bias"}:
                raise KeyError(f"{path}/extra.safetensors: expected value_head.weight and value_head.bias, found "
                               f"{sorted(extra)}; the directory is not a complete reward model")
            with torch.no_grad():
                model.value_head.weight.copy_(extra["value_head.weight"])
                model.value_head.bias.copy_(extra["value_head.bias"])
            tok = Tokenizer(rc["base"])
        else:
            model = Transformer.from_pretrained(path, dtype=dtype, device=device)
            tok = Tokenizer(path)
        template, bias, gain, max_len = rc["template"], rc["bias"], rc["gain"], rc["max_len"]
    else:
        if os.path.exists(os.path.join(path, ADAPTER_CONFIG)):
            raise FileNotFoundError(f"{where} not found but {path} holds an adapter: reward-model training did "
                                    f"not finish; rerun train_rm.py")
        model = Transformer.from_pretrained(path, dtype=dtype, device=device)
        if model.value_head is None:
            raise ValueError(f"{path}: no value_head tensors and no {RM_CONFIG}; this is not a reward model "
                             f"(train one with train_rm.py)")
        tok = Tokenizer(path)
        template, bias, gain, max_len = guess_template(path), 0.0, 1.0, model.config.max_seq_len
    model.requires_grad_(False)
    model.eval()
    return RewardModel(model=model, tok=tok, template=template, bias=float(bias), gain=float(gain),
                       max_len=int(max_len))


def score_ids(rm: RewardModel, seqs: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Normalised scores (B,) float32 on the model's device: (raw - bias) * gain at each sequence's
    last token. seqs: prompt + response ids as the template renders them, ending with the end token;
    sequences longer than rm.max_len keep their last max_len tokens."""
    raw = raw_scores(rm.model, seqs, rm.tok.pad_id, rm.max_len, batch_size)
    return (raw - rm.bias) * rm.gain


def score_texts(rm: RewardModel, messages_list: list, answers: list[str], batch_size: int = 16) -> torch.Tensor:
    """Scores (B,) of each answer to its conversation (messages ending with a user turn, or a question string)."""
    if len(messages_list) != len(answers):
        raise ValueError(f"nanohuatuo/reward.py: score_texts got {len(messages_list)} conversations but "
                         f"{len(answers)} answers; pass one answer per conversation")
    seqs = [render(with_answer(m, a), rm.tok, rm.template)[0] for m, a in zip(messages_list, answers)]
    return score_ids(rm, seqs, batch_size)


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> dict:
    d = RMConfig()
    ap = argparse.ArgumentParser(prog="train_rm.py", description="Train a reward model on ranked answers.")
    ap.add_argument("--base", required=True, help="base model directory (Hugging Face layout)")
    ap.add_argument("--adapter", help="SFT LoRA adapter, merged into the base before the reward model's LoRA")
    ap.add_argument("--data", required=True, help="preference JSONL from `python -m nanohuatuo.feedback rank`")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--template", help="chat template (default: guessed from --base)")
    ap.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank; 0 trains all weights")
    ap.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    ap.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    ap.add_argument("--lora-targets", default=d.lora_targets, help="all-linear or a comma list (q_proj,v_proj)")
    ap.add_argument("--lr", type=float, help="peak lr (default 1e-4 with LoRA, 1e-5 for all weights)")
    ap.add_argument("--head-lr", type=float, help="value-head lr (default: --lr)")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    ap.add_argument("--schedule", choices=["cosine", "linear"], default=d.schedule)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-prompts", type=int, default=d.batch_prompts, help="prompts per optimizer step")
    ap.add_argument("--micro-prompts", type=int, default=d.micro_prompts,
                    help="prompts per forward/backward (0: the whole batch)")
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--eval-frac", type=float, default=d.eval_frac)
    ap.add_argument("--eval-data", help="held-out preference JSONL (then all of --data trains)")
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--center-coef", type=float, default=d.center_coef, help="e.g. 0.01")
    ap.add_argument("--norm-samples", help="JSONL of SFT answers for the bias (default: the training answers)")
    ap.add_argument("--norm-max", type=int, default=d.norm_max)
    ap.add_argument("--normalize-std", action="store_true", help="also scale scores to std 1 (gain = 1/std)")
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=sorted(TORCH_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--seed", type=int, default=d.seed)
    args = ap.parse_args(argv)
    cfg = RMConfig(**vars(args))
    try:
        result = train(cfg)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"train_rm.py: {e}") from None
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
