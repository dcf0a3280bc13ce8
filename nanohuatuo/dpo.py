"""DPO with LoRA: the policy learns the AI judge's rankings directly, no reward model, no rollouts.

    python train_dpo.py --model BASE --adapter SFT_ADAPTER --data prefs.jsonl --out out/dpo
    torchrun --nproc_per_node 2 train_dpo.py ...          # the pairs of each batch split over processes
    dpo.train(DPOConfig(...)) -> dict

Top to bottom: `DPOConfig`; the pairs (`make_pairs`, `plan`, `fit`); the model (`load_policy`);
reference log-probs (`reference_logprobs`); one optimizer step (`dpo_step`) and the held-out
evaluation; checkpoints; the loop. The objectives live one layer down in losses.py (`dpo_loss`,
`sequence_logprobs`), the preference files in preferences.py (shared with the reward model).

- Data: preference records of `python -m nanohuatuo.feedback rank` (K answers, best first), or
  TRL's prompt/chosen/rejected, or MedicalGPT's question/response_chosen/response_rejected files
  (preferences.py). `--pairs all` makes every ranked pair (better, worse) of a record, C(K, 2) of
  them; `--pairs best-worst` only the first against the last. With mixed feedback the doctor's
  reply is one of the ranked answers and forms pairs like the others, as in the reward model:
  the judge ranked it, so the ranking says what is better. A sequence longer than --max-len loses
  prompt tokens from the left (the answer is kept whole when it fits, else cut at its end).
- Model: one copy of the base. Policy = base + the SFT adapter merged into the weights + a fresh
  LoRA (B = 0: step 0 is the SFT model). The reference is the same network with the adapters off
  (lora.disabled_adapters): the SFT model, without a second copy of anything.
- Reference log-probs are computed once per answer, before training, under no_grad, in a fixed
  order (answer by answer id, micro-batch by micro-batch), for the answers the planned steps and
  the held-out pairs use: one forward per answer, no reference forward in the steps, and a
  resumed run computes bit-identical values.
- Loss (losses.dpo_loss): sigmoid (DPO), with --label-smoothing e the conservative DPO of labels
  wrong with probability e; ipo (on per-token mean log-probs, as the IPO paper); hinge (SLiC).
  A batch's loss is the mean over its pairs; micro-batches accumulate; each process takes a
  share of every batch and the LoRA gradients are averaged with one all-reduce (dist.py).
- Logged per step (metrics.jsonl, metrics.png): loss, accuracy (pairs whose implicit reward
  beta * (logp - ref_logp) is higher for the better answer), margin (chosen minus rejected
  reward), chosen and rejected rewards, log_ratio (logp - ref_logp of an answer, summed over its
  tokens and averaged over both answers: how far the policy moved on these answers, a sampled
  KL-like figure), and the same on held-out pairs every --eval-every steps and at the end.
- AdamW on the LoRA tensors, linear warm-up then cosine decay to 0, gradient clipping.
  Checkpoints (checkpoint.py) every --save-every steps: adapter, optimizer, RNG; the batches and
  the learning rate are functions of the step, so `--resume` ends with the weights of an
  uninterrupted run.

Saved in --out: the DPO adapter in PEFT layout for the ORIGINAL base (with a merged SFT adapter,
the exact concatenation SFT (+) DPO, as PPO writes), the chat template, dpo_config.json (the
resolved config, which --config reads back), metrics.jsonl and metrics.png; with --save-merged
also OUT/merged, a full model.
"""

import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import adapters, checkpoint, dist
from .cli import (ExportFlags, LoRAFlags, ModelFlags, TrainLoopFlags, UserError, arg, cli_main, like, prepare_out,
                  resolve_dtype, write_config)
from .data import split_heldout
from .lora import (apply_lora, default_targets, disabled_adapters, load_adapter, lora_modules, lora_parameters,
                   save_adapter)
from .losses import dpo_loss, sequence_logprobs
from .metrics import REPORT_TO_HELP, MetricsLog, check_report_to, plot_metrics
from .model import Transformer
from .preferences import read_preferences
from .quant import QUANT_HELP, QUANTS
from .reward_model import right_pad
from .templates import save_chat_template, tokenizer_and_template


@dataclass
class DPOConfig(ExportFlags, TrainLoopFlags, LoRAFlags, ModelFlags):
    model: str = like(ModelFlags, "model", help="base model directory (Hugging Face layout, with the tokenizer)")
    adapter: str | None = arg(None, "SFT LoRA adapter on --model (merged into the weights, then a fresh DPO LoRA; "
                                    "the reference is this SFT model)")
    data: list[str] = arg([], "preference JSONL file(s): `python -m nanohuatuo.feedback rank` records, TRL "
                              "prompt/chosen/rejected or MedicalGPT question/response_chosen/response_rejected rows",
                          metavar="FILE")
    out: str = like(TrainLoopFlags, "out", "out/dpo", "output directory: adapter, metrics.jsonl, metrics.png, "
                                                      "checkpoints/")
    pairs: str = arg("all", "all: every ranked pair (better, worse) of a record; best-worst: first against last",
                     choices=["all", "best-worst"])
    eval_data: list[str] | None = arg(None, "held-out preference JSONL file(s) (then all of --data trains)",
                                      metavar="FILE")
    eval_frac: float = arg(0.1, "fraction of the --data records held out when --eval-data is not given",
                           bounds="[0, 1)")
    max_len: int = arg(1024, "tokens per prompt + answer; longer ones lose prompt tokens from the left",
                       bounds="[1, inf)")
    # the objective
    loss: str = arg("sigmoid", "sigmoid: DPO; ipo: IPO's squared loss on per-token mean log-probs; hinge: SLiC",
                    choices=["sigmoid", "ipo", "hinge"])
    beta: float = arg(0.1, "strength of the pull towards the reference (DPO's beta; IPO's tau)", bounds="(0, inf)")
    label_smoothing: float = arg(0.0, "conservative DPO: the probability that a ranking is wrong (sigmoid loss)",
                                 bounds="[0, 0.5)")
    # LoRA and optimisation
    lora_r: int = like(LoRAFlags, "lora_r", 8, "rank of the DPO LoRA")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input (0: the policy starts exactly at the reference)",
                              bounds="[0, 1)")
    lr: float = arg(5e-5, "peak learning rate of the LoRA tensors", bounds="(0, inf)")
    weight_decay: float = arg(0.0, "AdamW weight decay", bounds="[0, inf)")
    warmup_frac: float = arg(0.1, "fraction of the steps spent in linear warm-up", bounds="[0, 1]")
    epochs: int = arg(1, "passes over the pairs (ignored with --max-steps)", bounds="[1, inf)")
    batch_size: int = like(TrainLoopFlags, "batch_size", 16, "pairs per optimizer step, over all processes")
    micro_batch_size: int = like(TrainLoopFlags, "micro_batch_size", 2, "pairs per forward/backward per process "
                                                                        "(each brings two answers)")
    quant: str = arg("none", QUANT_HELP, choices=list(QUANTS))
    # run
    report_to: list[str] = arg([], REPORT_TO_HELP, metavar="TRACKER")
    eval_every: int = arg(50, "held-out loss and accuracy every N steps (and at the end)", bounds="[1, inf)")
    save_every: int = like(TrainLoopFlags, "save_every", 50)
    seed: int = arg(0, "seed of the split, the pair order and the LoRA init")

    def check(self):
        if not self.model or not self.data:
            raise UserError("DPO needs --model (model directory) and --data (preference JSONL)")
        if self.beta <= 0:
            raise UserError(f"--beta {self.beta}: it must be > 0 (0.1 is usual)")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing {self.label_smoothing}: a probability below 0.5")
        if self.label_smoothing and self.loss != "sigmoid":
            raise UserError("--label-smoothing is conservative DPO: it goes with --loss sigmoid")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise UserError("--batch-size and --micro-batch-size must be at least 1")


# ============================================================================= pairs

def make_pairs(examples: list[dict], mode: str) -> list[tuple[int, int, int]]:
    """(record, better answer, worse answer) for every pair `mode` takes; answers are ranked best first."""
    pairs = []
    for e, ex in enumerate(examples):
        k = len(ex["seqs"])
        pairs += [(e, 0, k - 1)] if mode == "best-worst" else [(e, i, j) for i in range(k) for j in range(i + 1, k)]
    return pairs


def plan(n_pairs: int, batch_size: int, epochs: int, max_steps: int | None, seed: int) -> list[list[int]]:
    """The batches (pair indices) of every step: a seeded shuffle per epoch, cut into batch_size pieces.
    With max_steps the epochs repeat as often as needed, then the list is cut to max_steps."""
    batches, epoch = [], 0
    while epoch < epochs or (max_steps and len(batches) < max_steps):
        order = list(range(n_pairs))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        batches += [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        epoch += 1
    return batches[:max_steps] if max_steps else batches


def fit(seq: list[int], start: int, max_len: int) -> tuple[list[int], int]:
    """(seq, answer start) cut to max_len: prompt tokens go from the left, keeping at least one
    before the answer (it predicts the answer's first token); an answer longer than that loses its end."""
    if len(seq) <= max_len:
        return seq, start
    keep = max(1, max_len - (len(seq) - start))
    cut = start - keep
    return seq[cut:cut + max_len], keep


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at update `step` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ============================================================================= the model

def load_policy(cfg: DPOConfig, device, dtype) -> tuple[Transformer, dict | None]:
    """Base (+ merged SFT adapter) with a fresh LoRA; returns the model and the merged SFT tensors (export)."""
    # the SFT adapter is merged at load, before any quantisation: a 4-bit base takes no merge
    model = Transformer.from_pretrained(cfg.model, dtype=dtype, device=device, value_head=False, merge=True,
                                        adapter=cfg.adapter, quant=cfg.quant)
    if model.lm_head is None:
        raise UserError(f"{cfg.model}: this model has no language-model head (a reward model?); DPO needs one")
    sft = adapters.read_lora_tensors(cfg.adapter, model.config)[0] if cfg.adapter else None  # for the export
    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
               targets=cfg.lora_targets or default_targets(model))
    lora_dropout = {id(m.lora_dropout) for _, m in lora_modules(model)}
    for mod in model.modules():  # no dropout in the trunk: policy and reference must agree at step 0
        if isinstance(mod, nn.Dropout) and id(mod) not in lora_dropout:
            mod.p = 0.0
    model.grad_checkpointing = cfg.grad_checkpointing
    return model, sft


def answer_batch(seqs, keys, pad_id, device):
    """Right-padded ids of the answers `keys` ((record, answer) pairs) and their answer starts and lengths."""
    rows = [seqs[k] for k in keys]
    ids, mask = right_pad([s for s, _ in rows], pad_id, None, device)
    starts = torch.tensor([st for _, st in rows], device=device)
    return ids, starts, mask.sum(-1)


@torch.no_grad()
def reference_logprobs(model, seqs, keys, pad_id, chunk, device) -> dict:
    """{answer key: (summed log-prob, tokens)} under the reference (adapters off), in sorted key order."""
    out = {}
    keys = sorted(set(keys))
    was = model.training
    model.eval()
    with disabled_adapters(model):
        for s in range(0, len(keys), chunk):
            part = keys[s:s + chunk]
            logp, n = sequence_logprobs(model, *answer_batch(seqs, part, pad_id, device))
            out.update({k: (lp, c) for k, lp, c in zip(part, logp.tolist(), n.tolist())})
    model.train(was)
    return out


# ============================================================================= the step

def pair_losses(model, cfg: DPOConfig, seqs, ref, pairs, pad_id, device):
    """(per-pair losses, chosen rewards, rejected rewards, log-ratios of both answers) for `pairs`."""
    keys = [(e, i) for e, i, _ in pairs] + [(e, j) for e, _, j in pairs]
    logp, n = sequence_logprobs(model, *answer_batch(seqs, keys, pad_id, device))
    ref_logp = torch.tensor([ref[k][0] for k in keys], device=device)
    log_ratio = (logp - ref_logp).detach()
    if cfg.loss == "ipo":  # IPO compares per-token means: a long answer does not weigh more
        logp, ref_logp = logp / n, ref_logp / torch.tensor([ref[k][1] for k in keys], device=device)
    m = len(pairs)
    losses, cr, rr = dpo_loss(logp[:m], logp[m:], ref_logp[:m], ref_logp[m:], cfg.beta, cfg.loss, cfg.label_smoothing)
    return losses, cr, rr, log_ratio


def _stats(losses, cr, rr, log_ratio) -> dict:
    """Sums over the pairs, divided by the pair count by the caller."""
    return {"loss": losses.detach().sum().item(), "accuracy": (cr > rr).float().sum().item(),
            "margin": (cr - rr).sum().item(), "chosen_reward": cr.sum().item(), "rejected_reward": rr.sum().item(),
            "log_ratio": log_ratio.view(2, -1).mean(0).sum().item()}


def dpo_step(model, cfg: DPOConfig, seqs, ref, pairs, n_global: int, optimizer, params, d, pad_id) -> dict:
    """One optimizer step on this process's `pairs` of a batch of n_global pairs; returns the batch means."""
    sums = dict.fromkeys(("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "log_ratio"), 0.0)
    for s in range(0, len(pairs), cfg.micro_batch_size):
        losses, cr, rr, ratio = pair_losses(model, cfg, seqs, ref, pairs[s:s + cfg.micro_batch_size], pad_id, d.device)
        # all_reduce_grads averages over processes: scaled by world, the sum is the batch's pair mean
        (losses.sum() * (d.world / n_global)).backward()
        for k, v in _stats(losses, cr, rr, ratio).items():
            sums[k] += v
    dist.all_reduce_grads(params, d)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    means = {k: dist.all_sum(v, d) / n_global for k, v in sums.items()}
    if not math.isfinite(means["loss"]):
        raise UserError(f"the DPO loss is {means['loss']}; lower --lr, and train in bfloat16 or float32")
    return {**means, "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(model, cfg: DPOConfig, seqs, ref, pairs, d, pad_id) -> dict:
    """Mean loss, accuracy, margin and log-ratio over held-out pairs (each process its share)."""
    was = model.training
    model.eval()
    sums = dict.fromkeys(("loss", "accuracy", "margin", "log_ratio"), 0.0)
    mine = pairs[d.rank::d.world]
    for s in range(0, len(mine), cfg.micro_batch_size):
        for k, v in _stats(*pair_losses(model, cfg, seqs, ref, mine[s:s + cfg.micro_batch_size], pad_id,
                                        d.device)).items():
            if k in sums:
                sums[k] += v
    model.train(was)
    return {f"eval_{k}": dist.all_sum(v, d) / len(pairs) for k, v in sums.items()}


# ============================================================================= checkpoints

# settings a resumed run must keep: the checkpoint's tensors would not fit the others
FIXED = ("model", "adapter", "lora_r", "lora_alpha", "lora_targets", "quant")
# settings that change nothing a resumed run computes
BOOKKEEPING = {"resume", "overwrite", "report_to", "stop_after", "eval_every", "save_every", "keep_checkpoints", "device",
               "out", "save_merged"}


def save_checkpoint(model, cfg: DPOConfig, optimizer, step: int, d) -> None:
    checkpoint.save(cfg.out, step, cfg.keep_checkpoints, d, dataclasses.asdict(cfg), optimizer,
                    lambda tmp: save_adapter(model, tmp / "adapter"))


def load_checkpoint(model, cfg: DPOConfig, path, optimizer, d) -> int:
    """Restore adapter, optimizer and RNG; returns the step. A changed FIXED setting is refused,
    any other applied from here on (and said)."""
    state, _ = checkpoint.read_resume(path, dataclasses.asdict(cfg), FIXED, BOOKKEEPING,
                                      say=print if d.main else lambda *a: None)
    load_adapter(model, path / "adapter", trainable=True)
    checkpoint.restore(path, optimizer, d, lrs=[cfg.lr])
    return state["step"]


# ============================================================================= the loop

def train(cfg: DPOConfig) -> dict:
    """Train the DPO adapter as `cfg` says; returns the summary: first/last loss, the last step's
    means (accuracy, margin, rewards, log_ratio), held-out figures, steps, out, seconds (ref_seconds of
    them computing the reference log-probs), history (the logged rows)."""
    cfg.check()
    return dist.run(cfg.device, lambda d, hold: _train(cfg, d, hold))


def _read(paths, tok, template, max_len):
    examples = [ex for p in paths for ex in read_preferences(p, tok, template)]
    for ex in examples:
        ex["fitted"] = [fit(s, st, max_len) for s, st in zip(ex["seqs"], ex["answer_starts"])]
    return examples


def _train(cfg: DPOConfig, d, hold) -> dict:
    t_start = time.time()
    say = print if d.main else (lambda *a, **k: None)
    check_report_to(cfg.report_to)  # a missing tracker package is said now, not after the model loads
    dtype = resolve_dtype(cfg.dtype, d.device, training=True)
    # every input is read and checked before --out is touched
    # the SFT adapter's tokenizer and chat template win over the base's, as sampling read the answers in them
    tok, template = tokenizer_and_template(cfg.model, cfg.adapter, cfg.template)
    examples = _read(cfg.data, tok, template, cfg.max_len)
    if cfg.eval_data:
        train_ex, eval_ex = examples, _read(cfg.eval_data, tok, template, cfg.max_len)
    else:
        train_ex, eval_ex = split_heldout(examples, cfg.eval_frac, cfg.seed)
    # one table of answers: training records first, then held-out ones
    seqs = {(e, i): f for e, ex in enumerate(train_ex + eval_ex) for i, f in enumerate(ex["fitted"])}
    pairs = make_pairs(train_ex, cfg.pairs)
    eval_pairs = [(e + len(train_ex), i, j) for e, i, j in make_pairs(eval_ex, cfg.pairs)]
    if not pairs:
        raise UserError(f"no training pairs in {', '.join(cfg.data)}")
    batches = plan(len(pairs), cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.seed)
    total = len(batches)
    warmup = round(cfg.warmup_frac * total)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every process
    model, sft = load_policy(cfg, d.device, dtype)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW([{"params": params, "lr": cfg.lr}], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)

    hold.enter_context(prepare_out(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, main_process=d.main,
                                   inputs=cfg))
    out = Path(cfg.out)
    ckpt = checkpoint.resume_from(out, cfg.resume, say)
    start = load_checkpoint(model, cfg, ckpt, optimizer, d) if ckpt else 0
    mine = [[pairs[p] for p in b[d.rank::d.world]] for b in batches]  # this process's share of every step
    keys = [(e, k) for b in mine for e, i, j in b for k in (i, j)] + \
        [(e, k) for e, i, j in eval_pairs[d.rank::d.world] for k in (i, j)]
    t_ref = time.time()
    ref = reference_logprobs(model, seqs, keys, tok.pad_id, 2 * cfg.micro_batch_size, d.device)
    t_ref = time.time() - t_ref
    n_long = sum(len(s) > cfg.max_len for ex in train_ex for s in ex["seqs"])
    say(f"dpo: {len(train_ex)} training records -> {len(pairs)} pairs ({cfg.pairs}), {len(eval_ex)} held out "
        f"({len(eval_pairs)} pairs); template {template}; {n_long} answers cut to --max-len {cfg.max_len}")
    say(f"dpo: loss {cfg.loss} beta {cfg.beta:g}" + (f" label smoothing {cfg.label_smoothing:g}"
                                                     if cfg.label_smoothing else "")
        + f"; LoRA r={cfg.lora_r} on {','.join(model.lora_config['target_modules'])}, "
        f"{sum(p.numel() for p in params):,} trainable; {total} steps of {cfg.batch_size} pairs, lr {cfg.lr:g}; "
        f"{dtype}, {d.device}, {d.world} process(es); reference log-probs of {len(ref)} answers in {t_ref:.1f}s"
        + (f"; resuming after step {start} from {ckpt}" if ckpt else ""))
    if d.main:
        write_config(out, cfg, "dpo")
        checkpoint.truncate_jsonl(out / "metrics.jsonl", start if ckpt else -1)
    log = MetricsLog(out / "metrics.jsonl", total_steps=total, stream=sys.stdout if d.main else None,
                     report_to=cfg.report_to if d.main else (), config=dataclasses.asdict(cfg))
    hold.callback(log.close)

    model.train()
    history, evals, stopped = [], {}, False
    # the checks above passed and training begins: the outputs of an earlier run stop looking like this one's
    if cfg.resume and d.main:
        checkpoint.unfinish(out, say)
    for step in range(start, total):
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, total, warmup)
        row = dpo_step(model, cfg, seqs, ref, mine[step], len(batches[step]), optimizer, params, d, tok.pad_id)
        done = step + 1
        row.update(lr=optimizer.param_groups[0]["lr"],
                   tokens=dist.all_sum(sum(len(seqs[(e, k)][0]) for e, i, j in mine[step] for k in (i, j)), d))
        history.append(log.write(done, **row) if d.main else dict(row, step=done))
        if eval_pairs and (done % cfg.eval_every == 0 or done == total):  # the log of a resumed run is the same
            evals = evaluate(model, cfg, seqs, ref, eval_pairs, d, tok.pad_id)
            if d.main:
                log.write(done, **evals)
        if done % cfg.save_every == 0 or done == total or done == cfg.stop_after:
            save_checkpoint(model, cfg, optimizer, done, d)
        if done == cfg.stop_after and done < total:
            say(f"stopped after step {done} (--stop-after); continue with --resume")
            stopped = True
            break

    if d.main and not stopped:
        save_chat_template(out, tok, template)  # first: the adapter's files mark the directory done
        adapters.save_on_base(model, out, merged=sft)  # for the original base: SFT (+) DPO when SFT was merged
        say(f"wrote the DPO adapter to {out} (load with --model {cfg.model} --adapter {out})")
    if d.main and os.path.exists(log.path) and os.path.getsize(log.path):
        plot_metrics(log.path, out / "metrics.png", ["loss", "accuracy", "margin", "eval_loss", "eval_accuracy"],
                     title="DPO")
    if d.main and cfg.save_merged and not stopped:  # merges the LoRA layers away (a 4-bit base: a fresh one): last
        adapters.save_merged(out, cfg.model, tok, template, model=model if cfg.quant == "none" else None, dtype=dtype)
    dist.barrier(d)
    summary = dict(history[-1]) if history else {}
    summary.pop("time", None)
    summary.update(evals)
    if history:
        summary.update(first_loss=history[0]["loss"], last_loss=history[-1]["loss"])
    summary.update(steps=start + len(history), out=str(out), seconds=time.time() - t_start, ref_seconds=t_ref,
                   stopped=stopped, history=history)
    return summary


def main(argv=None) -> int:
    return cli_main(train, DPOConfig, argv, prog="train_dpo.py", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    dist.exit_process(main())
