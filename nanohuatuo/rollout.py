"""Rollout plumbing shared by the RL stages: the prompt file, the order prompts are drawn in, and
prompts + sampled responses packed into one left/right-padded batch for the forwards.

    rows, ids = load_prompts(path, tok, template, max_prompt_len)   # prompt records + rendered ids
    idx = prompt_indices(n, start, count, seed)                      # an endless per-pass shuffle
    b = pack(prompt_ids, responses, stop_ids, pad_id)                # a Batch; b.rows(idx) for a micro-batch
    tokens, mask, ended = masks_after_stop(tokens, stop_ids, pad_id) # responses cut after their stop token
"""

import os
from dataclasses import dataclass

import torch

from .data import DataError, iter_jsonl
from .generate import left_pad
from .templates import render_prompt


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
        raise DataError(f"{path}: no usable prompts ({skipped} longer than --max-prompt-len {max_prompt_len})")
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
