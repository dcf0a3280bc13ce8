"""Rollout plumbing shared by the RL stages (PPO, GRPO): the policy on one base, the prompt file,
the order prompts are drawn in, sampling answers, and prompts + sampled responses packed into one
left/right-padded batch for the forwards.

    model, ref_lora, sft = policy_model(model_dir, adapter, continue_adapter, r, alpha, targets)
    with reference(model, ref_lora): ...                             # the SFT model: adapters off
    rows, ids = load_prompts(path, tok, template, max_prompt_len)   # prompt records + rendered ids
    idx = prompt_indices(n, start, count, seed)                      # an endless per-pass shuffle
    answers, logprobs, cut = sample_answers(model, prompts, ...)     # answers ending on the end token
    b = pack(prompt_ids, responses, stop_ids, pad_id)                # a Batch; b.rows(idx) for a micro-batch
    tokens, mask, ended = masks_after_stop(tokens, stop_ids, pad_id) # responses cut after their stop token
    responses, texts = answer_texts(b, tok, stops, stop_strs, end_id)   # what the reward reads
    scale = score_scale(reward, cfg, state, d)                       # RM scores in units of their spread
    log = open_run_log(cfg, "ppo", resumed, state["step"], max_steps, d, hold)   # config, metrics.jsonl
    if end_of_step(step, max_steps, cfg, save, plot, d, clock): ...  # checkpoint; True: --stop-after
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import adapters, checkpoint
from .cli import write_config
from .data import DataError, iter_jsonl, split_prompt
from .heap import large_blocks_kept
from .generate import cut_at_stop, generate_batch, left_pad, use_column_major_weights
from .lora import apply_lora, default_targets, disabled_adapters, load_adapter, lora_modules
from .metrics import MetricsLog
from .model import Transformer
from .reward_model import ScoreScale, end_at_stop_string, end_token
from .templates import render_prompt, stop_strings, stop_token_ids, tokenizer_and_template


def chat_setup(model_dir, template_name, adapter=None):
    """(tok, template, stop ids, stop strings, end id): the model's tokenizer and chat template (the SFT
    adapter's, when it carries them, as sampling and chat use), the tokens and strings an answer stops
    on, and the token that closes an assistant turn (what a reward model reads last)."""
    tok, template = tokenizer_and_template(model_dir, adapter, template_name)
    return tok, template, sorted(stop_token_ids(tok, template)), stop_strings(template), end_token(tok, template)


def policy_model(model_dir, adapter=None, continue_adapter=False, lora_r=16, lora_alpha=32.0, targets=(),
                 device=None, dtype=None, quant="none", compile=False):
    """(model, ref_lora, sft): the base with the trainable LoRA layers an RL stage trains.

    The SFT adapter is merged into the weights at load (before any quantisation: a 4-bit base
    takes no merge, `quant`) and a fresh LoRA (B = 0, so step 0 is the SFT model) goes on `targets`
    (default: every attention and MLP linear of the family), so the reference is simply "adapters
    off"; `sft` keeps the merged tensors for the export. `continue_adapter` keeps training the SFT
    adapter itself; `ref_lora` is then a frozen copy of its tensors. `compile`: the rollouts decode
    with a compiled step (the CPU kernels are chosen for it)."""
    merge_sft = bool(adapter) and not continue_adapter
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device, value_head=False, merge=True,
                                        adapter=adapter if merge_sft else None, quant=quant)
    ref_lora, sft = None, None
    if adapter and continue_adapter:
        load_adapter(model, adapter, trainable=True)
        ref_lora = adapters.snapshot(model, trainable=False)
    else:
        if merge_sft:  # its tensors, for the export on the original base
            sft = adapters.read_lora_tensors(adapter, model.config)[0]
        apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=0.0, targets=list(targets) or default_targets(model))
    for mod in model.modules():  # dropout off everywhere: it would make old and new log-probs disagree
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    for _, mod in lora_modules(model):
        mod.lora_dropout = nn.Identity()
    with torch.no_grad():
        # generate_batch re-lays the weights for CPU decoding under inference_mode, which would
        # make it an inference tensor that backward cannot use; doing it here first makes that a no-op
        use_column_major_weights(model, compiled=compile)
    model.eval()
    return model, ref_lora, sft


def reference(model, ref_lora=None):
    """The SFT model: adapters off (merged SFT), or the SFT adapter's frozen tensors (continue_adapter)."""
    return adapters.use_lora_weights(model, ref_lora) if ref_lora is not None else disabled_adapters(model)


def load_prompts(path, tok, template, max_prompt_len):
    """(rows, ids): prompt records {id, messages, reference} and their rendered prompt ids.

    A conversation ending with an assistant turn loses it (it becomes the reference); one ending
    with a user turn (a to_prompt record) is used as is. Prompts over max_prompt_len are skipped.
    """
    rows, ids, skipped = [], [], 0
    for lineno, obj in iter_jsonl(path):
        msgs, reference_text = split_prompt(obj, f"{path}:{lineno}")
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
        why = (f"no usable prompts (all {skipped} longer than --max-prompt-len {max_prompt_len})" if skipped else
               "no prompts (the file is empty); make them with `python data.py prompts`")
        raise DataError(f"{path}: {why}")
    if skipped:
        print(f"{path}: skipped {skipped} prompts longer than --max-prompt-len {max_prompt_len} tokens")
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


def sample_answers(model, prompts, max_new_tokens, temperature, tok, stops, stop_strs, end_id, seed, chunk=0,
                   compile=False):
    """(answers, logprobs, cut): one sampled answer per prompt (top_k 0, top_p 1), with the log-prob
    of each sampled token, `chunk` prompts at a time (0: all at once).

    Identical prompts (K answers to one prompt) are prefilled once by the engine. An answer that
    stops on a stop *string* is cut before it and ends on the template's end token `end_id`, so a
    reward model reads the position it was trained on; cut[i] is that end token's position (its
    log-prob was never sampled), None for the others."""
    chunk = chunk or len(prompts)
    answers, logprobs, cut = [], [], []
    with large_blocks_kept():  # the steps' temporaries reuse memory; training's allocator setting after
        for s in range(0, len(prompts), chunk):
            gen = generate_batch(model, prompts[s:s + chunk], max_new_tokens, temperature=temperature, top_k=0,
                                 top_p=1.0, seed=seed + s, stop_ids=stops, stop_strings=stop_strs, tokenizer=tok,
                                 pad_id=tok.pad_id, compile=compile, return_logprobs=True)
            for tokens, lp, finished in zip(gen.tokens, gen.logprobs, gen.finished):
                fixed = finished and stop_strs and not any(t in stops for t in tokens) and \
                    end_at_stop_string(tokens, tok, stop_strs, end_id)
                cut.append(len(fixed) - 1 if fixed else None)
                answers.append(fixed or tokens)
                logprobs.append(lp)
    return answers, logprobs, cut


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


@dataclass
class Batch:
    """Prompts and responses packed for the forwards."""
    ids: torch.Tensor  # (B, P + R) left-padded prompts, then responses right-padded
    attn: torch.Tensor  # (B, P + R) 1 on real tokens (padding on both sides is 0)
    P: int  # the padded prompt width
    mask: torch.Tensor  # (B, R) real response tokens, stop token included
    ended: torch.Tensor  # (B,) whether the response has a stop token

    def rows(self, idx):
        """Rows idx with all-padding columns dropped: (ids, attn, P, r)."""
        attn = self.attn[idx]
        p0 = self.P - int(attn[:, :self.P].sum(-1).max())  # leading columns that are padding in every row
        r = int(self.mask[idx].sum(-1).max())  # the widest response among these rows
        return self.ids[idx][:, p0:self.P + r], attn[:, p0:self.P + r], self.P - p0, r


def pack(prompts, responses, stop_ids, pad_id, device=None) -> Batch:
    """Left-padded prompts, then responses cut after their first stop token and right-padded."""
    prompt_ids, prompt_attn = left_pad(prompts, pad_id, device)  # (B, P)
    B, R = len(responses), max(max(len(r) for r in responses), 1)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    resp, mask, ended = masks_after_stop(resp, stop_ids, pad_id, lengths=[len(r) for r in responses])
    resp, mask, ended = resp.to(device), mask.to(device), ended.to(device)
    return Batch(torch.cat([prompt_ids, resp], 1), torch.cat([prompt_attn, mask], 1), prompt_ids.shape[1], mask, ended)


def answer_texts(b: Batch, tok, stops, stop_strs, end_id=None):
    """(responses, texts): each packed answer's ids up to and including its stop token, and its text
    without the stop token and cut at the first stop string (what a reward function reads). With
    end_id, an answer cut by the token limit is closed by it, as a reward model reads answers."""
    resp = b.ids[:, b.P:]
    responses = [resp[i, :n].tolist() for i, n in enumerate(b.mask.sum(-1).tolist())]
    texts = [cut_at_stop(tok.decode([t for t in r if t not in stops]), stop_strs) for r in responses]
    if end_id is not None:
        responses = [r if b.ended[i] else r + [end_id] for i, r in enumerate(responses)]
    return responses, texts


def write_samples(out, step, rows: list[dict], log=None):
    """Sample answers of one step ({"step", "prompt", "response", "score", ...} each): appended to
    OUT/samples.jsonl, printed with their numbers, and handed to the experiment tracker as a table."""
    with open(os.path.join(out, "samples.jsonl"), "a", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            numbers = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
            print(f"--- sample {i} at step {step} ({numbers})\n[prompt] ...{row['prompt'][-300:]}\n"
                  f"[answer] {row['response']}")
    if log is not None and rows:
        log.table("samples", list(rows[0]), [list(r.values()) for r in rows], step)


# ----------------------------------------------------------------------------- the run around the steps

def score_scale(reward, cfg, state: dict, d) -> ScoreScale | None:
    """Reward-model scores in units of their spread (reward_norm std): the checkpoint's scale on resume,
    else the spread train_rm.py stored (None in it: estimated on the first rollout batch)."""
    if not (reward.from_rm and cfg.reward_norm == "std"):
        return None
    if reward.spread is not None and d.main:
        print(f"reward: scores divided by {reward.spread:.4g}, the reward model's std on SFT-like answers")
    return ScoreScale(*state["score_scale"]) if state.get("score_scale") else ScoreScale(0.0, reward.spread)


def open_run_log(cfg, name: str, resumed: bool, step: int, max_steps: int, d, hold) -> MetricsLog:
    """The run's config written, its logs cut back to the checkpoint's step (the rows after it come
    again), and its metrics log (printed and tracked by the main process), closed with the run."""
    if d.main:
        write_config(cfg.out, cfg, name)
        for log_file in ("metrics.jsonl", "samples.jsonl"):
            checkpoint.truncate_jsonl(os.path.join(cfg.out, log_file), step if resumed else -1)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), total_steps=max_steps,
                     stream=sys.stdout if d.main else None, report_to=cfg.report_to if d.main else (),
                     config=dataclasses.asdict(cfg))
    hold.callback(log.close)
    return log


def end_of_step(step: int, max_steps: int, cfg, save, plot, d, clock: dict) -> bool:
    """After a step: save() at --save-every, the last step and --stop-after, with plot() refreshed at
    most every two minutes (a plot costs about a second; clock["plot"] is when it last ran). True
    when --stop-after ends the run here."""
    if step % cfg.save_every == 0 or step == max_steps or step == cfg.stop_after:
        save()
        if d.main and time.time() - clock["plot"] > 120:
            plot()
            clock["plot"] = time.time()
    if step == cfg.stop_after and step < max_steps:
        if d.main:
            print(f"stopped after step {step} (--stop-after); continue with --resume")
        return True
    return False
