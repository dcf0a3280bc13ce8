"""Reward model training: a scalar score for (conversation, answer), learned from the AI judge's
rankings (RLAIF step 3). `train(RMConfig)` and its CLI (train_rm.py, python -m nanohuatuo.reward).
The preference files (ours, TRL's, MedicalGPT's) are read by preferences.py, shared with DPO.

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
Full-weight training (lora_r=0) defaults to lr 1e-5. LoRA targets default to SFT's: every
attention and MLP linear of the family.

Held-out pairwise accuracy (fraction of held-out pairs with r_better > r_worse) is logged during
and after training. Then the answers of the training preferences (or --norm-samples) are scored,
the doctor's reply of mixed-feedback records left out (the policy never writes it), and their mean
is stored as `bias`, so SFT-like answers score 0 on average at PPO time; 1/std is
stored as `gain` only with normalize_std (otherwise gain is 1 and the std is kept as `score_std`,
which PPO divides by: its penalty and KL coefficient are in units of the score spread).

Checkpoints and resume work as in SFT and PPO (checkpoint.py): --save-every, --stop-after,
--resume continues with the same losses and ends with the same weights as an uninterrupted run.
Every input (model, data, held-out data, normalisation samples, template) is read and checked
before --out is touched, so a mistyped flag never damages an earlier reward model there.

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

Scoring (what PPO, the demo and evaluation use) lives in reward_model.py, below the stages:
load_reward_model, score_ids, score_texts (re-exported here).
"""

import contextlib
import dataclasses
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint
from .cli import (LoRAFlags, ModelFlags, TrainLoopFlags, UserError, arg, cli_main, like, prepare_out,
                  resolve_device, resolve_dtype, write_config)
from .data import DataError, iter_jsonl, split_heldout
from .hf import LLAMA_LIKE, read_config
from .lora import apply_lora, default_targets, load_adapter, save_adapter
from .metrics import REPORT_TO_HELP, MetricsLog, check_report_to, plot_metrics
from .model import Transformer
from .preferences import policy_seqs, read_preferences, reference_index  # noqa: F401 (re-exported)
from .quant import QUANT_HELP, QUANTS
from .reward_model import (RM_CONFIG, RewardModel, load_reward_model, load_trunk, raw_scores, right_pad,  # noqa: F401
                           rm_forward, score_ids, score_texts, scored_seq, with_answer)
from .templates import save_chat_template, tokenizer_and_template
from .tokenizer import Tokenizer


@dataclass
class RMConfig(TrainLoopFlags, LoRAFlags, ModelFlags):
    model: str = like(ModelFlags, "model", help="model directory the reward model starts from (Hugging Face layout), "
                                                "usually the SFT model's base")
    adapter: str | None = arg(None, "SFT LoRA adapter on --model, merged into it before the reward model's own LoRA")
    data: list[str] = arg([], "preference JSONL file(s): `python -m nanohuatuo.feedback rank` records, TRL "
                              "prompt/chosen/rejected or MedicalGPT question/response_chosen/response_rejected rows",
                          metavar="FILE")
    out: str = like(TrainLoopFlags, "out", "out/rm", "output directory: the reward model, reward_config.json, "
                                                    "metrics.jsonl, checkpoints/")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input", bounds="[0, 1)")
    lr: float | None = arg(None, "peak learning rate (default 1e-4 with LoRA, 1e-5 for all weights)", bounds="(0, inf)")
    head_lr: float | None = arg(None, "value-head learning rate (default: --lr)", bounds="(0, inf)")
    weight_decay: float = arg(0.0, "AdamW weight decay on matrices", bounds="[0, inf)")
    warmup_frac: float = arg(0.03, "fraction of the steps spent in linear warm-up", bounds="[0, 1]")
    schedule: str = arg("cosine", "learning-rate decay to 0 after the warm-up", choices=["cosine", "linear"])
    epochs: int = arg(1, "passes over the preferences (ignored with --max-steps)", bounds="[1, inf)")
    batch_size: int = like(TrainLoopFlags, "batch_size", 4,
                           "prompts per optimizer step (each brings all its K answers)", old=("--batch-prompts",))
    micro_batch_size: int = like(TrainLoopFlags, "micro_batch_size", 0, "prompts per forward/backward (gradient "
                                                                        "accumulation); 0: the whole batch",
                                 old=("--micro-prompts",), bounds="[0, inf)")
    max_len: int = arg(1024, "tokens per prompt + answer; longer ones lose tokens from the left (the score is "
                             "read at the end)", bounds="[1, inf)")
    eval_frac: float = arg(0.1, "fraction of --data held out when --eval-data is not given", bounds="[0, 1)")
    eval_data: list[str] | None = arg(None, "held-out preference JSONL file(s) (then all of --data trains)",
                                      metavar="FILE")
    eval_every: int = arg(200, "held-out accuracy every N steps (and at the end)", bounds="[1, inf)")
    center_coef: float = arg(0.0, "weight of the mean squared score of each pair, keeping scores near 0 (0.01 is "
                                  "usual when used)", bounds="[0, inf)")
    norm_samples: str | None = arg(None, "JSONL of SFT-like answers for the bias (default: the training answers)",
                                   metavar="FILE")
    norm_max: int = arg(2000, "at most this many answers scored for the bias", bounds="[1, inf)")
    normalize_std: bool = arg(False, "also scale scores to std 1 (gain = 1/std); PPO divides by the stored std "
                                     "either way")
    quant: str = arg("none", QUANT_HELP, choices=list(QUANTS))
    report_to: list[str] = arg([], REPORT_TO_HELP, metavar="TRACKER")
    seed: int = arg(0, "seed of the split, the batch order, LoRA and value-head init")


# ----------------------------------------------------------------------------- loss

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


# ----------------------------------------------------------------------------- data

def read_norm_samples(path, tok: Tokenizer, template: str) -> list[list[int]]:
    """Token ids of SFT-like answers for the bias: every answer of preference records or judge items
    but the doctor's reply of a mixed record, or conversations ending with an assistant turn (scored
    as they are)."""
    seqs = []
    for lineno, row in iter_jsonl(path):
        try:
            if isinstance(row.get("answers"), list):
                prompt = row.get("prompt", row.get("question"))
                skip = reference_index(row, f"{path}:{lineno}")
                seqs += [scored_seq(with_answer(prompt, a), tok, template)[0] for i, a in enumerate(row["answers"])
                         if i != skip]
            elif isinstance(row.get("messages"), list):
                seqs.append(scored_seq(row["messages"], tok, template)[0])
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
    raise UserError(f"schedule {schedule!r}; use cosine or linear")


def build_model(cfg: RMConfig, device, dtype) -> tuple[Transformer, list, list]:
    """The trainable reward model and its (trunk params, head params)."""
    torch.manual_seed(cfg.seed)  # value head and LoRA A initialisation
    # full mode keeps lm_head outside the Llama family: only there is the head-less layout reloadable
    keep = cfg.lora_r == 0 and read_config(cfg.model)[1].arch not in LLAMA_LIKE
    model = load_trunk(cfg.model, cfg.adapter, device, dtype, keep_lm_head=keep, quant=cfg.quant)
    model.value_head.requires_grad_(True)
    head = list(model.value_head.parameters())
    if cfg.lora_r > 0:
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=cfg.lora_targets or default_targets(model))
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
    with contextlib.ExitStack() as hold:  # holds the lock on --out until the run ends, however it ends
        return _train(cfg, hold)


def _train(cfg: RMConfig, hold: contextlib.ExitStack) -> dict:
    if not cfg.model or not cfg.data:
        raise UserError("the reward model needs --model (model directory) and --data (preference JSONL)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would train and write its own copy
        raise UserError("train_rm.py runs in one process (it has no data-parallel path, unlike SFT and PPO); "
                        "start it with python, not torchrun")
    check_report_to(cfg.report_to)  # a missing tracker package is said now, not after the model loads
    if cfg.quant != "none" and cfg.lora_r <= 0:
        raise UserError(f"--quant {cfg.quant} freezes the base weights: it needs LoRA (--lora-r > 0)")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, training=True)
    lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.lora_r > 0 else 1e-5)
    head_lr = cfg.head_lr if cfg.head_lr is not None else lr

    # every input is read and checked before --out is touched
    # the SFT adapter's tokenizer and chat template win over the base's, as sampling read the answers in them
    tok, template = tokenizer_and_template(cfg.model, cfg.adapter, cfg.template)
    examples = [ex for path in cfg.data for ex in read_preferences(path, tok, template)]
    if cfg.eval_data:
        train_ex, eval_ex = examples, [ex for path in cfg.eval_data for ex in read_preferences(path, tok, template)]
    else:
        train_ex, eval_ex = split_heldout(examples, cfg.eval_frac, cfg.seed)
    norm = read_norm_samples(cfg.norm_samples, tok, template) if cfg.norm_samples else policy_seqs(train_ex)
    if not norm:  # the bias is their mean score: with none it would be NaN, and so every score at PPO time
        raise UserError(f"--norm-samples {cfg.norm_samples}: no answers in it to normalise the scores with"
                        if cfg.norm_samples else "no training answers to normalise the scores with")
    model, trunk, head = build_model(cfg, device, dtype)

    out = Path(cfg.out)
    hold.enter_context(prepare_out(out, resume=cfg.resume, overwrite=cfg.overwrite, inputs=cfg))
    ckpt = checkpoint.resume_from(out, cfg.resume)

    n_seqs = sum(len(ex["seqs"]) for ex in train_ex)
    n_long = sum(len(s) > cfg.max_len for ex in train_ex for s in ex["seqs"])
    print(f"reward: {len(train_ex)} training prompts ({n_seqs} answers), {len(eval_ex)} held out; template "
          f"{template}; {n_long} training answers longer, with their prompt, than --max-len {cfg.max_len} lose their "
          "first tokens")
    model.train()
    targets = f" on {','.join(model.lora_config['target_modules'])}" if cfg.lora_r else ""
    print(f"reward: {'LoRA r=%d' % cfg.lora_r if cfg.lora_r else 'all weights'}{targets}, "
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
        batches += [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    batches = batches[:cfg.max_steps] if cfg.max_steps else batches
    total = len(batches)
    warmup = round(cfg.warmup_frac * total)

    start, recent = 0, []
    if ckpt:
        start, recent = load_checkpoint(cfg, ckpt, model, opt, device)
        print(f"reward: resuming after step {start} from {ckpt}")
    write_config(out, cfg, "rm")
    checkpoint.truncate_jsonl(out / "metrics.jsonl", start if ckpt else -1)
    log = MetricsLog(out / "metrics.jsonl", total_steps=total, report_to=cfg.report_to, config=dataclasses.asdict(cfg))
    hold.callback(log.close)
    micro = cfg.micro_batch_size or cfg.batch_size
    result, params, stopped, final_ev = {}, trunk + head, False, None

    # the checks above passed and training begins: the outputs of an earlier run stop looking like this one's
    if cfg.resume:
        checkpoint.unfinish(out)
    for step in range(start, total):
        batch = batches[step]
        factor = lr_factor(step, total, warmup, cfg.schedule)
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
        opt.zero_grad(set_to_none=True)
        loss_sum, correct, pairs, tokens = 0.0, 0, 0, 0
        for s in range(0, len(batch), micro):
            chunk = [train_ex[i] for i in batch[s:s + micro]]
            ids, mask = right_pad([q for ex in chunk for q in ex["seqs"]], tok.pad_id, cfg.max_len, device)
            r, i, losses = rm_forward(model, ids, mask), 0, []
            for ex in chunk:
                k = len(ex["seqs"])
                losses.append(pairwise_loss(r[i:i + k], center_coef=cfg.center_coef))
                c, n = pairwise_accuracy(r[i:i + k].detach())
                correct, pairs, i = correct + c, pairs + n, i + k
            loss = torch.stack(losses).sum() / len(batch)  # mean over the step's prompts
            if not torch.isfinite(loss):
                raise UserError(f"the reward model's loss is {loss.item()} at step {step + 1}; lower --lr, and "
                                f"train in bfloat16 or float32")
            loss.backward()
            loss_sum += loss.item()
            tokens += int(mask.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        opt.step()
        done = step + 1
        recent = (recent + [(loss_sum, correct, pairs)])[-20:]
        log.write(done, loss=loss_sum, accuracy=correct / pairs, lr=lr * factor,
                  grad_norm=float(grad_norm), tokens=tokens)
        # the last step's evaluation is logged before its checkpoint: a run killed between the two and
        # resumed does not log it twice
        if eval_ex and (done == total or cfg.eval_every and done % cfg.eval_every == 0):
            ev = evaluate(model, eval_ex, tok.pad_id, cfg.max_len, cfg.batch_size, cfg.center_coef)
            log.write(done, **ev)
            if done == total:
                final_ev = ev
        if done % cfg.save_every == 0 or done == total or done == cfg.stop_after:
            print(f"checkpoint: {save_checkpoint(cfg, done, model, opt, tok, recent)}")
        if done == cfg.stop_after and done < total:
            print(f"stopped after step {done} (--stop-after); continue with --resume")
            stopped = True
            break
    if stopped:
        return {"steps": cfg.stop_after, "stopped": True, "out": os.path.abspath(cfg.out)}

    model.eval()
    # resumed after its last step, the run evaluates again (the same figures), logged once already
    ev = final_ev or evaluate(model, eval_ex, tok.pad_id, cfg.max_len, cfg.batch_size, cfg.center_coef)
    result.update(ev)
    result["steps"] = total
    result["train_loss"] = sum(x[0] for x in recent) / max(len(recent), 1)  # over the last 20 steps
    result["train_accuracy"] = sum(x[1] for x in recent) / max(sum(x[2] for x in recent), 1)

    # normalisation: SFT-like answers should score 0 on average at PPO time
    if len(norm) > cfg.norm_max:
        norm = random.Random(cfg.seed).sample(norm, cfg.norm_max)
    scores = raw_scores(model, norm, tok.pad_id, cfg.max_len)
    bias = scores.mean().item()
    std = scores.std(correction=0).item() if len(scores) > 1 else None
    if std is not None and std < 1e-6:  # every answer scored alike: no spread to put PPO's scores in units of
        print(f"reward: warning: the {len(norm)} normalisation answers all score {bias:.4f}; their spread is not "
              f"stored (PPO measures it on its first batch)")
        std = None
    gain = 1.0 / std if cfg.normalize_std and std else 1.0
    result.update(bias=bias, gain=gain, score_std=std, norm_samples=len(norm), stopped=False)
    print(f"reward: bias {bias:.4f} (mean raw score of {len(norm)} SFT answers), std "
          f"{'not measured' if std is None else f'{std:.4f}'}, gain {gain:.4f}; "
          f"held-out pairwise accuracy {ev['eval_accuracy']:.3f} over {ev['eval_pairs']} pairs")

    save_reward_model(model, cfg, template, bias, gain, std, ev["eval_accuracy"], tok)
    try:
        plot_metrics(out / "metrics.jsonl", out / "metrics.png",
                     ["loss", "accuracy", "eval_loss", "eval_accuracy", "lr"], title="reward model")
    except ValueError:
        pass  # nothing logged (zero steps)
    result["out"] = os.path.abspath(cfg.out)
    return result


# ----------------------------------------------------------------------------- checkpoints and outputs

def _head(model) -> dict:
    return {"value_head.weight": model.value_head.weight, "value_head.bias": model.value_head.bias}


def save_checkpoint(cfg: RMConfig, step: int, model, opt, tok, recent) -> Path:
    """The trained weights (LoRA adapter + head, or the full model), optimizer, RNG and step."""
    with checkpoint.writing(cfg.out, step, cfg.keep_checkpoints) as tmp:
        if cfg.lora_r:
            save_adapter(model, tmp / "adapter", extra=_head(model))
        else:
            model.save_pretrained(tmp / "model")
            tok.save_pretrained(tmp / "model")
        checkpoint.save_optimizer(tmp, opt.state_dict())
        checkpoint.save_state(tmp, step, dataclasses.asdict(cfg), recent=recent)
        checkpoint.save_rng(tmp)
    return Path(cfg.out) / "checkpoints" / f"step_{step:06d}"


# settings that may change between a run and its resumption without changing the result
RESUMABLE = {"resume", "overwrite", "stop_after", "eval_every", "save_every", "keep_checkpoints", "device", "out"}


def load_checkpoint(cfg: RMConfig, ckpt: Path, model, opt, device) -> tuple[int, list]:
    """Restore weights, optimizer and RNG; returns (step, the recent-loss window). Changed settings are
    applied and announced."""
    state = checkpoint.read_state(ckpt)
    changed = checkpoint.config_changes(state["config"], dataclasses.asdict(cfg), RESUMABLE)
    if changed:
        print(f"warning: resuming {ckpt} with changed settings, applied from here on (the result will differ "
              f"from an uninterrupted run): " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if cfg.lora_r:
        extra = load_adapter(model, ckpt / "adapter", trainable=True)
        with torch.no_grad():
            model.value_head.weight.copy_(extra["value_head.weight"])
            model.value_head.bias.copy_(extra["value_head.bias"])
    else:
        saved = Transformer.from_pretrained(ckpt / "model", dtype=model.embed_tokens.weight.dtype, device=device)
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(saved.state_dict()[name])
    model.train()
    checkpoint.load_optimizer(ckpt, opt, device)
    checkpoint.load_rng(ckpt)
    return state["step"], [tuple(x) for x in state["recent"]]


def save_reward_model(model, cfg: RMConfig, template, bias, gain, score_std, eval_accuracy, tok=None):
    """Write the layout described in the module docstring; reward_config.json last (a full reward model,
    its own model directory, carries its chat template, written before it)."""
    out = cfg.out
    base = os.path.abspath(cfg.model)
    adapter = os.path.abspath(cfg.adapter) if cfg.adapter else None
    lora = cfg.lora_r > 0
    if lora:
        save_adapter(model, out, extra=_head(model))
    else:
        model.save_pretrained(out, copy_from=base)  # tokenizer files come along from the base
        if tok is not None:
            save_chat_template(out, tok, template)
    checkpoint.atomic_json(os.path.join(out, RM_CONFIG), {
        "base": base if lora else os.path.abspath(out),
        "sft_adapter": adapter if lora else None,  # full mode: already merged into the saved weights
        "template": template if isinstance(template, str) else template.spec, "bias": bias, "gain": gain, "lora": lora, "max_len": cfg.max_len,
        "score_std": score_std, "eval_accuracy": None if math.isnan(eval_accuracy) else eval_accuracy,
        "trained_from": {"base": base, "sft_adapter": adapter}})


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    return cli_main(train, RMConfig, argv, prog="train_rm.py", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
