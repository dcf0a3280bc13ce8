"""Supervised fine-tuning (SFT) on chat conversations, HuatuoGPT's recipe: `train(SFTConfig)` and its CLI.

    python train_sft.py --model DIR --data a.jsonl b.jsonl --out out/sft [--lora-r 8] [--max-steps N]
    torchrun --nproc_per_node 2 train_sft.py ...          # DDP (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node 8 train_sft.py --fsdp ...   # FSDP for models that do not fit one GPU

What happens, in order (`_train` is the loop, `train_step` one optimizer step; read them top to bottom):
- Data: conversation files (data.load_conversations: schema JSONL, or OpenAI `messages`, ShareGPT
  or Alpaca rows in JSONL, a JSON array, Parquet or a datasets folder), a held-out split (--eval-frac, or --eval-data),
  optional per-source resampling (data.mix_sources). Each conversation is rendered with its chat
  template (--template auto: the model's own; templates.render -> ids and the mask of assistant
  tokens), and the outputs carry that template in their tokenizer files. A conversation longer than
  --max-len keeps its first max_len tokens (the tail is cut: later turns build on earlier ones); one
  with no assistant token left to predict is dropped and counted.
- Batches: length-grouped and padded, no packing. Each epoch is a seeded shuffle; windows of 64
  global batches are sorted by length and cut into global batches, whose order is shuffled again.
  Padding goes on the right, so the plain causal mask already keeps every real token from seeing
  a pad: no attention mask is needed and nothing crosses between conversations. The last
  len % batch_size rows of each epoch's shuffle wait for the next epoch (a different few each time).
- Loss: next-token cross-entropy on assistant tokens only (labels[t] = ids[t+1] where mask[t+1]),
  averaged over all assistant tokens of the global batch (token mean, not sequence mean: a long
  answer weighs by its length, as transformers' loss does). Every process knows the whole batch, so
  each scales its sum by world_size / tokens_in_global_batch; gradient accumulation sums and
  DDP's average then give exactly the single-process gradient of the same global batch.
  Logits are computed only at labelled positions, a chunk of rows at a time, with the gradient
  taken in the same pass (losses.linear_cross_entropy): the (tokens, vocab) logits never exist in full.
- Update: AdamW (weight decay 0.1 on matrices, none on norms and biases), cosine schedule with
  linear warm-up (5%), gradient clipping at 1.0. bf16 autocast on CUDA; float32 on CPU.
- Around it: held-out loss every --eval-every steps and at the end; progress and metrics.jsonl
  through metrics.MetricsLog; loss.png; checkpoints (checkpoint.py: weights or adapter, optimizer,
  step, every process's RNG; the schedule and the data position are functions of the step), so
  `--resume` continues with the same losses as an uninterrupted run.

LoRA (default, --lora-r 8, on every attention and MLP projection) or full fine-tuning (--lora-r 0).
LoRA trains float32 adapters on a frozen base kept in --dtype; full fine-tuning keeps float32
master weights under autocast. Outputs in --out: LoRA: adapter_config.json +
adapter_model.safetensors (PEFT layout); full: config.json + safetensors + tokenizer files;
--save-merged adds the merged full model in out/merged.

FSDP (--fsdp, torch's fully_shard): every transformer block is one shard unit and the rest
(embedding, final norm, output matrix) the root unit. Gradients are reduce-scattered after every
micro-batch (no accumulation in unsharded form: that memory is what FSDP is for). Each process
still reads the full weights once at start before they are sharded, and checkpoints gather full
weights and optimizer state on rank 0's CPU, so checkpoints are the same files as without FSDP
and a run may resume with another number of processes (exactly only without LoRA dropout).
"""

import contextlib
import dataclasses
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from . import adapters, checkpoint, dist
from .cli import (ExportFlags, LoRAFlags, ModelFlags, TrainLoopFlags, UserError, arg, cli_main, like, prepare_out,
                  resolve_dtype, write_config)
from .data import load_conversations, mix_sources, split_heldout
from .dist import Dist
from .lora import apply_lora, default_targets, load_adapter, save_adapter
from .losses import IGNORE, linear_cross_entropy, output_weight
from .metrics import REPORT_TO_HELP, MetricsLog, check_report_to, plot_metrics
from .model import Transformer
from .quant import QUANT_HELP, QUANTS
from .templates import render, resolve_template, save_chat_template
from .tokenizer import Tokenizer

LORA_LR_LIMIT = 2e-4  # above this a narrow medical LoRA is known to erode general ability
WINDOW = 64  # global batches per length-sorted window


@dataclass
class SFTConfig(ExportFlags, TrainLoopFlags, LoRAFlags, ModelFlags):
    model: str = like(ModelFlags, "model",
                      help="model directory to fine-tune (Hugging Face layout with tokenizer files)")
    data: list[str] = arg([], "conversation file(s) to train on: schema JSONL, or OpenAI messages, ShareGPT or "
                                "Alpaca rows (JSONL, JSON array, Parquet, datasets folder)", metavar="FILE")
    out: str = like(TrainLoopFlags, "out", "out/sft", "output directory: adapter or model, metrics.jsonl, loss.png, "
                                                      "checkpoints/")
    source_weights: dict[str, float] | None = arg(
        None, "resample sources, e.g. distilled_instructions=1,real_doctor_instructions=2; sources not named are "
              "dropped (data.mix_sources)", metavar="SOURCE=W,...")
    eval_data: list[str] | None = arg(None, "held-out conversation file(s), as --data; default: --eval-frac of --data", metavar="FILE")
    eval_frac: float = arg(0.05, "fraction of --data held out for the eval loss when --eval-data is not given",
                           bounds="[0, 1)")
    max_len: int = arg(2048, "tokens per conversation; longer ones keep their first max_len tokens", bounds="[1, inf)")
    # what is trained
    lora_dropout: float = arg(0.05, "dropout on the LoRA input", bounds="[0, 1)")
    lr: float | None = arg(None, "peak learning rate (default 5e-5 full fine-tuning, 1e-4 LoRA)", bounds="(0, inf)")
    allow_high_lr: bool = arg(False, f"allow a LoRA learning rate above {LORA_LR_LIMIT:g}")
    # schedule and batches
    epochs: int = arg(3, "passes over the training data (ignored with --max-steps)", bounds="[1, inf)")
    max_steps: int | None = like(TrainLoopFlags, "max_steps",
                                 help="optimizer steps in all (the cosine schedule spans them)")
    batch_size: int = like(TrainLoopFlags, "batch_size", 128,
                           "global batch: conversations per optimizer step, over all processes")
    micro_batch_size: int = like(TrainLoopFlags, "micro_batch_size", 2, "conversations per forward pass per process "
                                                                        "(accumulation = the rest)")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices (norms and biases get none)", bounds="[0, inf)")
    warmup_frac: float = arg(0.05, "fraction of the steps spent in linear warm-up", bounds="[0, 1]")
    max_grad_norm: float = like(TrainLoopFlags, "max_grad_norm")
    quant: str = arg("none", QUANT_HELP, choices=list(QUANTS))
    seed: int = arg(0, "seed of the split, the shuffles, LoRA init and dropout")
    # bookkeeping
    eval_every: int = arg(200, "held-out loss every N steps (and before the first step and at the end)",
                          bounds="[1, inf)")
    save_every: int = like(TrainLoopFlags, "save_every", 500)
    keep_checkpoints: int = like(TrainLoopFlags, "keep_checkpoints", 2)
    log_every: int = arg(1, "print progress every N steps (metrics.jsonl gets every step)", bounds="[1, inf)")
    report_to: list[str] = arg([], REPORT_TO_HELP, metavar="TRACKER")
    save_merged: bool = like(ExportFlags, "save_merged", help="also write the merged full model to out/merged (LoRA)")
    # hardware
    dtype: str = like(ModelFlags, "dtype", help="compute dtype: auto (bfloat16 autocast on CUDA, float32 on CPU), "
                                               "float32, bfloat16")
    fsdp: bool = arg(False, "shard parameters, gradients and optimizer state over the processes (torchrun)")


# ----------------------------------------------------------------------------- data

class Example(NamedTuple):
    ids: torch.Tensor  # (T,) int32 token ids (half the memory of int64 on a large corpus)
    mask: torch.Tensor  # (T,) bool, True on tokens the model must learn (templates.render)
    source: str

    @property
    def n_targets(self) -> int:
        return int(self.mask[1:].sum())  # the first token is never predicted


def load_rows(cfg: SFTConfig) -> tuple[list[dict], list[dict], dict]:
    """Training and held-out rows: the split comes before resampling, so no duplicate lands on both sides."""
    if not cfg.data:
        raise UserError("no training data: pass --data FILE [FILE ...] (schema JSONL or another chat format, see "
                        "nanohuatuo/data.py)")
    rows = [row for path in cfg.data for row in load_conversations(path)]
    if cfg.eval_data:
        train, held = rows, [row for path in cfg.eval_data for row in load_conversations(path)]
    else:
        train, held = split_heldout(rows, cfg.eval_frac, cfg.seed)
    info = {"read": Counter(r["source"] for r in train)}
    if cfg.source_weights:
        train = mix_sources(train, cfg.source_weights, cfg.seed)
    return train, held, info


def tokenize(rows: list[dict], tok: Tokenizer, template: str, max_len: int) -> tuple[list[Example], dict]:
    """Render every conversation; cut to max_len tokens; drop those left with nothing to learn."""
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        ids, mask = render(row["messages"], tok, template)
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            truncated += 1
        if not any(mask[1:]):
            dropped += 1
            continue
        examples.append(Example(torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool),
                                row["source"]))
    stats = {"truncated": truncated, "dropped": dropped, "tokens": sum(len(e.ids) for e in examples),
             "targets": sum(e.n_targets for e in examples)}
    return examples, stats


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch as lists of example indices, each sorted longest first."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[: len(order) // batch_size * batch_size]
    batches = []
    span = batch_size * WINDOW
    for start in range(0, len(order), span):
        window = sorted(order[start:start + span], key=lambda i: -lengths[i])  # stable: ties keep shuffle order
        batches += [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
    rng.shuffle(batches)  # else every window would run from long to short
    return batches


def micro_batches(batch: list[int], micro_batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's micro-batches of a global batch: consecutive slices, dealt round-robin to ranks."""
    slices = [batch[k:k + micro_batch_size] for k in range(0, len(batch), micro_batch_size)]
    return slices[rank::world]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids (B, T) and labels (B, T): labels[b, t] = ids[b, t+1] where trained, else IGNORE."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = e.ids
        labels[b, :n - 1] = torch.where(e.mask[1:], e.ids[1:], IGNORE)
    return ids, labels


# ----------------------------------------------------------------------------- loss

class SFTLoss(nn.Module):
    """The model and its summed SFT loss in one forward call, the unit DDP and FSDP wrap."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        # right padding: the causal mask alone keeps real tokens from seeing pads (see module doc)
        h = self.model.hidden_states(ids)  # (B, T, dim)
        keep = (labels != IGNORE).flatten().nonzero().squeeze(1)
        return linear_cross_entropy(h.flatten(0, 1)[keep], output_weight(self.model), labels.flatten()[keep])


# ----------------------------------------------------------------------------- optimizer and schedule

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices decay, norms and biases (1-d) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to peak, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- model

def build_model(cfg: SFTConfig, d: Dist, compute_dtype, ckpt: Path | None) -> Transformer:
    """The model to train: base + fresh or checkpointed LoRA, or full weights from base or checkpoint."""
    if cfg.lora_r:
        # frozen base in the compute dtype (a 7B fits a 24 GB card in bf16) or NF4; adapters stay float32
        model = Transformer.from_pretrained(cfg.model, dtype=compute_dtype, device=d.device, quant=cfg.quant)
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=cfg.lora_targets or default_targets(model))
        if ckpt is not None:
            load_adapter(model, ckpt / "adapter", trainable=True)
    else:
        # float32 master weights: bf16 weights would lose most small AdamW updates
        model = Transformer.from_pretrained(ckpt / "model" if ckpt else cfg.model, dtype=torch.float32,
                                            device=d.device)
        model.source_dir = os.path.abspath(cfg.model)
        for p in model.parameters():
            p.requires_grad_(True)
    if model.lm_head is None:
        raise UserError(f"{cfg.model}: this model has no language-model head (a reward model?); SFT needs one")
    model.grad_checkpointing = cfg.grad_checkpointing
    return model.train()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(wrapped, examples: list[Example], cfg: SFTConfig, d: Dist, pad_id: int, autocast) -> float | None:
    """Token-mean cross-entropy over the held-out conversations (all processes share the work)."""
    if not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    batches = [order[k:k + cfg.micro_batch_size] for k in range(0, len(order), cfg.micro_batch_size)]
    mine = batches[d.rank::d.world]
    # every process runs as many forwards as the busiest one (FSDP's all-gathers must pair up)
    n_rounds = math.ceil(len(batches) / d.world)
    was_training = wrapped.training
    wrapped.eval()
    total = 0.0
    for k in range(n_rounds):
        batch = mine[k] if k < len(mine) else batches[0]
        ids, labels = collate([examples[i] for i in batch], pad_id)
        with autocast():
            loss = wrapped(ids.to(d.device), labels.to(d.device))
        total += loss.item() if k < len(mine) else 0.0
    wrapped.train(was_training)
    if hasattr(wrapped, "reshard"):
        wrapped.reshard()  # FSDP keeps the root unit gathered after a forward with no backward to follow
    return dist.all_sum(total, d) / sum(e.n_targets for e in examples)


# ----------------------------------------------------------------------------- training

def train_step(wrapped, optimizer, params, micro, n_targets: int, lr: float, max_grad_norm: float, d: Dist,
               autocast=contextlib.nullcontext) -> tuple[float, float]:
    """One optimizer step over this process's micro-batches [(ids, labels), ...].

    n_targets counts the labelled tokens of the whole global batch (every process's micro-batches), so
    the gradient is that of the global token mean. Returns (this process's summed loss, gradient norm
    before clipping)."""
    loss_sum = torch.zeros((), device=d.device)
    for k, (ids, labels) in enumerate(micro):
        # DDP all-reduces on the last micro-batch only; FSDP reduce-scatters after each (module doc)
        sync = k == len(micro) - 1 or not hasattr(wrapped, "no_sync")
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            with autocast():
                loss = wrapped(ids.to(d.device), labels.to(d.device))
            # DDP and FSDP average gradients over processes: scale by world to get the global token mean
            (loss * (d.world / n_targets)).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
        grad_norm = grad_norm.full_tensor()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item(), grad_norm.item()


def train(cfg: SFTConfig) -> dict:
    """Fine-tune cfg.model on cfg.data; write the results to cfg.out; return the final metrics.

    Returns {"train_loss", "eval_loss", "first_eval_loss", "steps", "out", "tokens", "seconds",
    "stopped"} (eval losses None without held-out data; first_eval_loss is before step 1, None
    when resuming)."""
    check_report_to(cfg.report_to)  # a missing tracker package is said now, not after the model loads
    return dist.run(cfg.device, lambda d, hold: _train(cfg, d, hold))


def _train(cfg: SFTConfig, d: Dist, hold: contextlib.ExitStack) -> dict:
    t_start = time.time()
    say = (lambda *a: print(*a, flush=True)) if d.main else (lambda *a: None)
    out = Path(cfg.out)
    if not cfg.model:
        raise UserError("no model: pass --model DIR (a Hugging Face model directory)")
    lora = cfg.lora_r > 0
    if cfg.quant != "none" and not lora:
        raise UserError(f"--quant {cfg.quant} freezes the base weights: it needs LoRA (--lora-r > 0)")
    if cfg.quant != "none" and cfg.fsdp:
        raise UserError(f"--quant {cfg.quant} with --fsdp: FSDP does not shard 4-bit weights; use one of them "
                        f"(a 4-bit 7B base fits one 24 GB GPU)")
    peak_lr = cfg.lr if cfg.lr is not None else (1e-4 if lora else 5e-5)
    if lora and peak_lr > LORA_LR_LIMIT and not cfg.allow_high_lr:
        raise UserError(f"--lr {peak_lr:g} for LoRA is above {LORA_LR_LIMIT:g}: a narrow medical LoRA at a high "
                        f"learning rate is known to erode general ability; keep it near 1e-4 or pass --allow-high-lr")
    micro_total = cfg.micro_batch_size * d.world
    if cfg.batch_size % micro_total:
        raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size "
                        f"{cfg.micro_batch_size} x {d.world} process(es); make it one "
                        f"(e.g. {micro_total * max(1, cfg.batch_size // micro_total)})")
    accum = cfg.batch_size // micro_total
    compute_dtype = resolve_dtype(cfg.dtype, d.device, training=True)
    use_autocast = compute_dtype != torch.float32

    # data (every process reads and tokenizes all of it: each must know the whole global batch)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.from_pretrained(cfg.model)
    template = resolve_template(cfg.model, cfg.template, tok)
    train_rows, eval_rows, info = load_rows(cfg)
    train_ex, tstats = tokenize(train_rows, tok, template, cfg.max_len)
    eval_ex, estats = tokenize(eval_rows, tok, template, cfg.max_len)
    lengths = [len(e.ids) for e in train_ex]
    steps_per_epoch = len(train_ex) // cfg.batch_size
    if not train_ex:  # the real cause, not "lower --batch-size"
        raise UserError(f"no training conversations: {len(train_rows)} read from --data {' '.join(cfg.data)}, "
                        f"{tstats['dropped']} of them with no answer token left within --max-len {cfg.max_len}")
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_ex)} training conversations make less than one global batch "
                        f"(--batch-size {cfg.batch_size}); lower --batch-size or add data")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if total_steps < 1:
        raise UserError(f"nothing to train: --max-steps {cfg.max_steps}, --epochs {cfg.epochs}; "
                        f"give at least one step")
    warmup = math.ceil(cfg.warmup_frac * total_steps)

    # the model (every input is checked before --out is touched); then --out, locked for the run
    ckpt = checkpoint.resume_from(out, cfg.resume, say)
    model = build_model(cfg, d, compute_dtype, ckpt)
    hold.enter_context(prepare_out(out, resume=cfg.resume, overwrite=cfg.overwrite, main_process=d.main, inputs=cfg))
    n_params = model.num_params()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start_step = check_resume(cfg, ckpt, d, say) if ckpt else 0
    if ckpt:
        checkpoint.load_rng(ckpt, d.rank)
    else:
        torch.manual_seed(cfg.seed + d.rank)  # per-process dropout streams, fixed by the seed
    wrapped = dist.wrap(SFTLoss(model), d, cfg.fsdp, shard=model.layers)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, betas=(0.9, 0.999), eps=1e-8)
    if ckpt:
        dist.load_optimizer_state(optimizer, wrapped, ckpt / checkpoint.OPTIMIZER, d, cfg.fsdp)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def autocast():
        return torch.autocast(d.device.type, dtype=compute_dtype, enabled=use_autocast)

    # summary
    targets = "" if not lora else f" on {','.join(model.lora_config['target_modules'])}"
    say(f"sft: {cfg.model} ({model.config.arch}, {n_params / 1e6:.1f}M params), template {template}, "
        f"{d.device} {'autocast ' if use_autocast else ''}{str(compute_dtype).removeprefix('torch.')}, "
        f"{d.world} process(es){' FSDP' if cfg.fsdp and d.world > 1 else ' DDP' if d.world > 1 else ''}")
    what = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} dropout {cfg.lora_dropout:g}{targets}" if lora \
        else "full fine-tuning"
    say(f"  {what}: {n_trainable / 1e6:.2f}M trainable ({100 * n_trainable / n_params:.2f}%)")
    # conversations as read and weighted; those that tokenising drops are counted on the next line
    used, held = Counter(r["source"] for r in train_rows), Counter(r["source"] for r in eval_rows)
    for source in sorted(set(info["read"]) | set(used) | set(held)):
        mixed = f" -> {used[source]} after weighting" if cfg.source_weights else ""
        say(f"  {source}: {info['read'][source]} train rows{mixed}, {held[source]} held out")
    say(f"  tokens: {tstats['tokens']:,} train ({tstats['targets']:,} trained on), {estats['tokens']:,} held out; "
        f"{tstats['truncated'] + estats['truncated']} conversations cut to {cfg.max_len} tokens, "
        f"{tstats['dropped']} training and {estats['dropped']} held-out ones dropped (no assistant token left)")
    say(f"  steps: {total_steps} ({steps_per_epoch} per epoch; global batch {cfg.batch_size} = "
        f"{cfg.micro_batch_size} x {accum} accumulation x {d.world} process(es)), lr {peak_lr:g} cosine, "
        f"{warmup} warm-up" + (f"; resuming after step {start_step} from {ckpt}" if ckpt else ""))

    log = None
    if d.main:
        write_config(out, cfg, "sft")
        # rows logged after the checkpoint are written again by this run (every row, without one)
        checkpoint.truncate_jsonl(out / "metrics.jsonl", start_step if ckpt else -1)
        log = MetricsLog(out / "metrics.jsonl", total_steps=total_steps, print_every=cfg.log_every,
                         report_to=cfg.report_to, config=dataclasses.asdict(cfg))
        hold.callback(log.close)

    first_eval = eval_loss = None
    if start_step == 0:
        first_eval = eval_loss = evaluate(wrapped, eval_ex, cfg, d, tok.pad_id, autocast)
        if log and eval_loss is not None:
            log.write(0, eval_loss=eval_loss)
    plan, plan_epoch_no = None, -1
    train_loss, tokens_seen, stopped, last_saved, done = None, 0, False, start_step, start_step
    # the checks above passed and training begins: the outputs of an earlier run stop looking like this one's
    if cfg.resume and d.main:
        checkpoint.unfinish(out, say)
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != plan_epoch_no:
            plan, plan_epoch_no = plan_epoch(lengths, cfg.batch_size, cfg.seed, epoch), epoch
        batch = plan[index]
        n_targets = sum(train_ex[i].n_targets for i in batch)  # over the global batch, known to every rank
        n_tokens = sum(lengths[i] for i in batch)
        lr = lr_at(step, total_steps, peak_lr, warmup)
        mine = [collate([train_ex[i] for i in mb], tok.pad_id)
                for mb in micro_batches(batch, cfg.micro_batch_size, d.rank, d.world)]
        loss_sum, grad_norm = train_step(wrapped, optimizer, trainable, mine, n_targets, lr, cfg.max_grad_norm, d,
                                         autocast)
        train_loss = dist.all_sum(loss_sum, d) / n_targets
        tokens_seen += n_tokens
        done = step + 1
        if log:
            log.write(done, loss=train_loss, lr=lr, grad_norm=grad_norm, epoch=round(done / steps_per_epoch, 3),
                      tokens=n_tokens)
        if not math.isfinite(train_loss):
            raise UserError(f"step {done}: the loss is {train_loss}; lower --lr (now {peak_lr:g}), check the data, "
                            f"or resume from an earlier checkpoint in {out / 'checkpoints'}")
        final = done == total_steps or done == cfg.stop_after
        if done % cfg.eval_every == 0 or final:
            eval_loss = evaluate(wrapped, eval_ex, cfg, d, tok.pad_id, autocast)
            if log and eval_loss is not None:
                log.write(done, eval_loss=eval_loss)
        if done % cfg.save_every == 0 or final:
            path = save_checkpoint(cfg, d, done, model, wrapped, optimizer, tok)
            last_saved = done
            if log:
                plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "eval_loss"])
                say(f"checkpoint: {path}")
        if done == cfg.stop_after and done < total_steps:
            stopped = True
            say(f"stopped after step {done} (--stop-after); continue with --resume")
            break

    if start_step == total_steps:
        say(f"{ckpt} is already at the last step ({total_steps}); writing the outputs again")
        eval_loss = evaluate(wrapped, eval_ex, cfg, d, tok.pad_id, autocast)
    if not stopped:
        write_outputs(cfg, d, model, tok, template, say)
    if d.main and last_saved == start_step and (out / "metrics.jsonl").exists():
        plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "eval_loss"])
    seconds = time.time() - t_start
    say(f"done in {seconds:.0f}s: train loss {_fmt(train_loss)}, eval loss {_fmt(eval_loss)}"
        f" (before training {_fmt(first_eval)}); metrics {out / 'metrics.jsonl'}, plot {out / 'loss.png'}")
    return {"train_loss": train_loss, "eval_loss": eval_loss, "first_eval_loss": first_eval,
            "steps": done, "out": str(out),
            "tokens": tokens_seen, "seconds": seconds, "stopped": stopped}


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


# ----------------------------------------------------------------------------- checkpoints and outputs

def save_checkpoint(cfg: SFTConfig, d: Dist, step: int, model, wrapped, optimizer, tok) -> Path:
    """Adapter (LoRA) or full model, optimizer, step and every process's RNG (checkpoint.py's format)."""
    with checkpoint.writing(cfg.out, step, cfg.keep_checkpoints, d.main, lambda: dist.barrier(d)) as tmp:
        host = dist.gather_model(model, d, cfg.fsdp)
        opt_state = dist.optimizer_state(optimizer, wrapped, d, cfg.fsdp)
        if d.main:
            if cfg.lora_r:
                save_adapter(host, tmp / "adapter")
            else:
                host.save_pretrained(tmp / "model")
                tok.save_pretrained(tmp / "model")
            checkpoint.save_optimizer(tmp, opt_state)
            checkpoint.save_state(tmp, step, dataclasses.asdict(cfg), world=d.world)
        checkpoint.save_rng(tmp, d.rank)
    return Path(cfg.out) / "checkpoints" / f"step_{step:06d}"


# settings that may change between a run and its resumption without changing the losses
RESUMABLE = {"resume", "overwrite", "report_to", "stop_after", "eval_every", "save_every", "keep_checkpoints",
             "log_every", "save_merged", "device", "out"}


def check_resume(cfg: SFTConfig, ckpt: Path, d: Dist, say) -> int:
    """The checkpoint's step; changed settings are applied and announced (the losses will differ)."""
    state = checkpoint.read_state(ckpt)
    changed = checkpoint.config_changes(state["config"], dataclasses.asdict(cfg), RESUMABLE)
    if changed:
        say(f"warning: resuming {ckpt} with changed settings, applied from here on (losses will differ from an "
            f"uninterrupted run): " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if state["world"] != d.world and cfg.lora_r and cfg.lora_dropout:
        say(f"warning: {ckpt} was written by {state['world']} processes, this run has {d.world}: the LoRA "
            f"dropout masks (per-process RNG) will differ from an uninterrupted run")
    return state["step"]


def write_outputs(cfg: SFTConfig, d: Dist, model: Transformer, tok: Tokenizer, template, say):
    """The adapter (LoRA) or the full model with its tokenizer in cfg.out; with --save-merged the merged model.
    Each carries the chat template it was trained with, so transformers and vLLM render that format."""
    host = dist.gather_model(model, d, cfg.fsdp)
    if not d.main:
        return
    out = Path(cfg.out)
    # the tokenizer and template first (save_chat_template copies the tokenizer files): the adapter's or
    # model's own files, written last, mark the directory finished, so a run killed in between leaves
    # none that looks done
    save_chat_template(out, tok, template)
    if cfg.lora_r:
        save_adapter(host, out)
        say(f"adapter (PEFT layout): {out / 'adapter_config.json'}, {out / 'adapter_model.safetensors'}")
    else:
        host.save_pretrained(out)
        say(f"model: {out} (config.json, safetensors, tokenizer)")
    if cfg.save_merged:
        if not cfg.lora_r:
            say("--save-merged: full fine-tuning already wrote a full model; nothing to merge")
            return
        # the FSDP shadow holds only the adapter, and a 4-bit base takes no merge: onto a freshly loaded full base
        fresh = (cfg.fsdp and d.world > 1) or cfg.quant != "none"
        say(f"merged model: {adapters.save_merged(out, cfg.model, tok, template, model=None if fresh else model)}")


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    return cli_main(train, SFTConfig, argv, prog="train_sft.py", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    dist.exit_process(main())
