"""A trained reward model, for scoring: load one (ours or a released one) and score answers.

    rm = load_reward_model(path)             # our RM dir (train_rm.py), or a released HuatuoGPT/Ziya RM dir
    score_ids(rm, seqs) -> (B,) float32      # (raw - bias) * gain at each sequence's last token
    score_texts(rm, messages_list, answers)  # renders with rm.template, then score_ids
    scorer(rm, tok, template) -> Scorer      # a reward function for a policy's rollouts (PPO)
    reward_scorer(fn | rm | path, tok, template, share=...) -> Scorer   # any of those, sharing when it can
    ScoreScale(shift, scale)(scores, d)      # scores in units of the RM's spread on SFT-like answers
    scored_seq(messages, tok, template) -> (ids, mask)   # a rendered conversation, ended at the answer's end token
    end_token(tok, template), end_at_stop_string(tokens, tok, stop_strs, end_id)   # answers as the RM reads them

The model is a transformer trunk plus a linear value head d -> 1 read at the LAST REAL token of a
right-padded batch (the answer's end token: `scored_seq` ends a rendered conversation there, as
a policy's answers end, even where the template writes more after it). Training it is the reward
stage (reward.py); PPO, the demo and evaluation only score with it, so this lives below the stages.

`share_base` makes a LoRA reward model one more adapter + head on a policy model that already
holds the reward model's base and SFT adapter (PPO: one copy of the base for everything).

Our layout (written by reward.py): LoRA mode: adapter files + extra.safetensors (value_head.*) on
`base` (+ `sft_adapter` merged); full mode: a model directory in the Ziya/HuatuoGPT reward-model
layout. Both carry reward_config.json {"base", "sft_adapter", "template", "bias", "gain", "lora",
"max_len", "score_std", ...}, written last. A released RM has no reward_config.json: bias 0, gain 1,
no score statistics (`score_std` None), its template given by the caller (`template=`).
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import adapters, dist
from .cli import resolve_device, resolve_dtype
from .generate import cut_at_stop
from .lora import CONFIG_FILE as ADAPTER_CONFIG, load_adapter, lora_modules
from .model import Transformer
from .templates import ChatTemplate, render, resolve_template, template_dir
from .tokenizer import Tokenizer

RM_CONFIG = "reward_config.json"


@dataclass
class RewardModel:
    model: Transformer  # with value_head, eval mode, frozen
    tok: Tokenizer
    template: ChatTemplate
    bias: float
    gain: float
    max_len: int
    score_std: float | None = None  # std of raw scores on SFT-like answers (None: not measured)
    path: str | None = None
    swap: object = None  # shared with a policy (share_base): a context manager that puts the RM's tensors in
    lora: dict | None = None  # shared: its LoRA (A, B) per policy layer (adapters.stack), what swap puts in
    head: nn.Module | None = None  # shared: its value head (the trunk's own value_head otherwise)

    @property
    def spread(self) -> float | None:
        """The std of its (normalised) scores on SFT-like answers, None when not measured."""
        return None if self.score_std is None else self.score_std * self.gain


def rm_template(model_dir, name: str | None, recorded: str | None = None, adapter=None) -> ChatTemplate:
    """The chat template a reward model scores in: `name` when given (not "auto"), else the one
    train_rm.py recorded, else the model directory's own (templates.resolve_template); "auto" is the
    SFT adapter's template when that directory carries one, as train_rm.py read it."""
    return resolve_template(template_dir(model_dir, adapter), name if name and name != "auto" else recorded or "auto")


# ----------------------------------------------------------------------------- forward

def right_pad(seqs: list[list[int]], pad_id: int, max_len: int | None = None, device=None):
    """(B, T) ids right-padded with pad_id and the (B, T) mask of real tokens; longer rows keep their last max_len."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an empty token sequence cannot be scored; render prompt + answer first")
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
        raise ValueError("rm_forward needs right padding (real tokens first); build the batch with right_pad")
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


def as_messages(prompt) -> list[dict]:
    """A preference record's prompt (a question string or a messages list) as messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def with_answer(prompt, answer: str) -> list[dict]:
    return as_messages(prompt) + [{"role": "assistant", "content": answer}]


def scored_seq(messages: list[dict], tok, template) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation ending with an answer, as a reward model reads it and DPO sums its answer:
    rendered in the template and ended at the answer's end token; mask is the template's, every assistant turn's
    tokens (preferences.answer_start finds the last answer's). What a template writes after that token (Qwen's
    "<|im_end|>\\n") is cut: a policy's answer ends at the end token, where PPO reads its score, and a reward
    model trained one token further on would be read where it never learned to score."""
    ids, mask = render(messages, tok, template)
    end = max((i for i, v in enumerate(mask) if v), default=len(ids) - 1) + 1
    return ids[:end], mask[:end]


# ----------------------------------------------------------------------------- loading and scoring

def load_trunk(base, sft_adapter, device, dtype, keep_lm_head=False, quant="none") -> Transformer:
    """Base (+ merged SFT adapter) with a value head (loaded, or fresh) and, usually, no lm_head;
    quant="nf4": blocks in 4 bits after the merge (quant.py)."""
    model = Transformer.from_pretrained(base, dtype=dtype, device=device, adapter=sft_adapter, value_head=True,
                                        merge=True, quant=quant)
    if not keep_lm_head:
        model.lm_head = None  # a reward model never needs the vocab projection: save its memory
        model.config.lm_head = False
    return model


def read_rm_config(path) -> dict | None:
    """reward_config.json of our reward-model directory, or None (a released RM, or not a RM); its
    normalisation (bias, gain) must be finite numbers, or every score, and the policy trained on
    them, would be NaN."""
    where = os.path.join(path, RM_CONFIG)
    if not os.path.exists(where):
        return None
    try:
        with open(where, encoding="utf-8") as f:
            rc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not a JSON file ({e}); train the reward model again (train_rm.py)") from None
    if not isinstance(rc, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rc).__name__}")

    def number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

    for key, ok, want in (("lora", lambda v: isinstance(v, bool), "true or false"),
                          ("base", lambda v: isinstance(v, str) and v, "the base model's directory"),
                          ("template", lambda v: isinstance(v, str) and v, "the chat template's name"),
                          ("max_len", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                           "a positive number of tokens"),
                          ("bias", number, "a finite number"), ("gain", number, "a finite number"),
                          ("score_std", lambda v: v is None or number(v) and v > 0, "a positive number or null")):
        v = rc.get(key, 1.0 if key in ("gain", "score_std") else None)
        if not ok(v):  # a NaN bias would make every score, and the policy trained on them, NaN
            raise ValueError(f"{where}: '{key}' is {v!r}, not {want}: the reward model's config is broken; train "
                             f"it again (train_rm.py)")
    return rc


def load_reward_model(path, device=None, dtype=None, template: str | None = None, quant="none") -> RewardModel:
    """A frozen reward model in eval mode from our RM directory (LoRA or full) or a released
    HuatuoGPT/Ziya reward-model directory (value_head.* tensors, no reward_config.json: bias 0,
    gain 1, max_len from its config, the template `template` or, when None/"auto", its directory's
    own chat template). `template` overrides the one our reward_config.json records. quant="nf4": the
    frozen blocks in 4 bits (quant.py)."""
    device = resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    rc = read_rm_config(path)
    if rc is not None:
        where = os.path.join(path, RM_CONFIG)
        if rc["lora"]:
            if not os.path.isdir(rc["base"]):
                raise FileNotFoundError(f"{where}: base model {rc['base']} not found; fix 'base' in that file")
            model = load_trunk(rc["base"], rc.get("sft_adapter"), device, dtype, quant=quant)
            extra = load_adapter(model, path)
            if set(extra) != {"value_head.weight", "value_head.bias"}:
                raise KeyError(f"{path}/extra.safetensors: expected value_head.weight and value_head.bias, found "
                               f"{sorted(extra)}; the directory is not a complete reward model")
            with torch.no_grad():
                model.value_head.weight.copy_(extra["value_head.weight"])
                model.value_head.bias.copy_(extra["value_head.bias"])
            tok = Tokenizer(rc["base"])
        else:
            model = Transformer.from_pretrained(path, dtype=dtype, device=device, quant=quant)
            tok = Tokenizer(path)
        tmpl = rm_template(rc["base"] if rc["lora"] else path, template, rc["template"],
                           rc.get("sft_adapter") if rc["lora"] else None)
        bias, gain, max_len, std = rc["bias"], rc["gain"], rc["max_len"], rc.get("score_std")
    else:
        # train_rm.py writes rm_config.json first and reward_config.json last: one without the other is a run
        # that did not finish (a full reward model's weights may already be there, and would pass as released)
        if os.path.exists(os.path.join(path, "rm_config.json")):
            raise FileNotFoundError(f"{os.path.join(path, RM_CONFIG)} not found but {path} holds rm_config.json: "
                                    f"reward-model training did not finish; rerun train_rm.py (--resume)")
        if os.path.exists(os.path.join(path, ADAPTER_CONFIG)):
            raise FileNotFoundError(f"{path} holds a LoRA adapter ({ADAPTER_CONFIG}) but no {RM_CONFIG}: not a "
                                    f"reward model (an SFT adapter?); pass the directory train_rm.py wrote")
        model = Transformer.from_pretrained(path, dtype=dtype, device=device, quant=quant)
        if model.value_head is None:
            raise ValueError(f"{path}: no value_head tensors and no {RM_CONFIG}; this is not a reward model "
                             f"(train one with train_rm.py)")
        tok = Tokenizer(path)
        tmpl = rm_template(path, template)
        bias, gain, max_len, std = 0.0, 1.0, model.config.max_seq_len, None
    model.requires_grad_(False)
    model.eval()
    return RewardModel(model=model, tok=tok, template=tmpl, bias=float(bias), gain=float(gain),
                       max_len=int(max_len), score_std=None if std is None else float(std), path=str(path))


def score_ids(rm: RewardModel, seqs: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Normalised scores (B,) float32 on the model's device: (raw - bias) * gain at each sequence's
    last token. seqs: prompt + response ids as the template renders them, ending with the end token;
    sequences longer than rm.max_len keep their last max_len tokens."""
    with rm.swap() if rm.swap is not None else contextlib.nullcontext():
        raw = raw_scores(rm.model, seqs, rm.tok.pad_id, rm.max_len, batch_size)
    return (raw - rm.bias) * rm.gain


def score_texts(rm: RewardModel, messages_list: list, answers: list[str], batch_size: int = 16) -> torch.Tensor:
    """Scores (B,) of each answer to its conversation (messages ending with a user turn, or a question string)."""
    if len(messages_list) != len(answers):
        raise ValueError(f"score_texts got {len(messages_list)} conversations but {len(answers)} answers; "
                         f"pass one answer per conversation")
    seqs = [scored_seq(with_answer(m, a), rm.tok, rm.template)[0] for m, a in zip(messages_list, answers)]
    return score_ids(rm, seqs, batch_size)


@dataclass
class Scorer:
    """A reward for RL: fn(prompts, responses, rows, texts) -> (B,) scores, for a policy's prompt ids,
    response ids (ending with their end token), prompt records {messages, ...} and answer texts."""
    fn: object
    from_rm: bool = False  # a reward model (whose scores PPO puts in units of their spread)
    spread: float | None = None  # std of its scores on SFT-like answers; None: not measured
    rm: RewardModel | None = None  # the reward model itself (PPO's critic can start from a shared one)

    def __call__(self, prompts, responses, rows, texts) -> torch.Tensor:
        """(B,) float32 scores, checked: one NaN or infinite score would make the policy's weights NaN
        at the next update, so the run stops there (its last checkpoint kept)."""
        scores = torch.as_tensor(self.fn(prompts, responses, rows, texts), dtype=torch.float32).reshape(len(prompts))
        bad = (~torch.isfinite(scores.cpu())).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ValueError(f"the reward gave {len(bad)} of {len(prompts)} answers a score that is not a finite "
                             f"number ({scores[i].item()} for {texts[i][:40]!r}); check the reward model or function")
        return scores


def scorer(rm: RewardModel, tok, template) -> Scorer:
    """Token ids scored as they are when the reward model shares the policy's tokenizer and template,
    else the answers re-rendered as text in the reward model's own template."""
    probe = "头痛三天，伴有低烧。Fever 38.5°C?\n"
    same = (rm.template == template and rm.tok.vocab_size == tok.vocab_size and rm.tok.eos_id == tok.eos_id
            and rm.tok.encode(probe) == tok.encode(probe))

    def fn(prompts, responses, rows, texts):
        if same:
            return score_ids(rm, [p + r for p, r in zip(prompts, responses)])
        return score_texts(rm, [row["messages"] for row in rows], texts)
    return Scorer(fn, from_rm=True, spread=rm.spread, rm=rm)


# ----------------------------------------------------------------------------- answers as a reward model reads them

def end_token(tok, template) -> int:
    """The token that closes an assistant turn in this template (what the reward model reads)."""
    ids, mask = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tok, template)
    return ids[max(i for i, v in enumerate(mask) if v)]


def end_at_stop_string(tokens, tok, stop_strs, end_id) -> list[int] | None:
    """An answer that stopped on a stop string, as the tokens before it plus end_id; None without one.

    Scored as written, the reward model would read the stop string's last token, a position it was
    never trained on, and the policy would learn to write the string instead of ending its turn."""
    text = tok.decode(tokens)
    kept = cut_at_stop(text, stop_strs)
    if kept == text:
        return None
    k = len(tokens)
    while k > 0 and not kept.startswith(tok.decode(tokens[:k])):  # the stop string is at the end: a few steps
        k -= 1
    return tokens[:k] + [end_id]


def _same_path(a, b):
    return (a is None and b is None) or (a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b))


def share_base(path, model: Transformer, base, sft_adapter, tok, template=None, stack_first=None):
    """(the reward model in `path` as an adapter + head on `model`, "") or (None, why it cannot be).

    `model` is `base` with `sft_adapter` merged and LoRA layers of its own (a PPO policy). Possible
    when `path` is a LoRA reward model (train_rm.py) on the same base and SFT adapter whose targets
    `model`'s LoRA layers cover: for scoring, the LoRA layers run with the reward adapter's tensors
    (adapters.stack) and the value head is the reward head; everything is put back afterwards.
    stack_first: LoRA tensors to stack under the reward adapter's (a policy that keeps training its
    SFT adapter instead of merging it). `template` overrides the recorded one."""
    rc = read_rm_config(path) if path else None
    if rc is None:
        return None, "it has no reward_config.json (not a reward model from train_rm.py)"
    if not rc.get("lora"):
        return None, "it was trained with all weights (train_rm.py --lora-r 0), not as a LoRA adapter"
    if not _same_path(rc.get("base"), base):
        return None, f"it was trained on {rc.get('base')}, the policy is {os.path.abspath(base)}"
    if not _same_path(rc.get("sft_adapter"), sft_adapter):
        return None, f"it was trained on the SFT adapter {rc.get('sft_adapter')}, the policy has {sft_adapter}"
    tensors, extra = adapters.read_lora_tensors(path, model.config)
    ours = dict(lora_modules(model))
    if not set(tensors) <= set(ours):
        return None, (f"its LoRA layers ({len(tensors)}) are not all among the policy's ({len(ours)}): give the "
                      f"policy the reward model's LoRA targets too")
    if set(extra) != {"value_head.weight", "value_head.bias"}:
        return None, f"{path}/extra.safetensors holds {sorted(extra)}, not a value head"
    device = model.embed_tokens.weight.device
    weights = adapters.stack(model, ([stack_first] if stack_first else []) + [tensors], device)
    head = nn.Linear(model.config.dim, 1, device=device, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(extra["value_head.weight"])
        head.bias.copy_(extra["value_head.bias"])

    @contextlib.contextmanager
    def swap():
        keep = model.value_head
        model.value_head = head
        try:
            with adapters.use_lora_weights(model, weights), torch.no_grad():
                yield
        finally:
            model.value_head = keep
    tmpl = rm_template(base, template, rc["template"], rc.get("sft_adapter"))
    rm = RewardModel(model=model, tok=tok, template=tmpl,
                     bias=float(rc["bias"]), gain=float(rc.get("gain", 1.0)), max_len=int(rc["max_len"]),
                     score_std=rc.get("score_std"), path=str(path), swap=swap, lora=weights, head=head)
    return rm, ""


def reward_scorer(reward, tok, template, share=None, device=None, dtype=None, reward_template=None,
                  say=print, quant="none") -> Scorer:
    """A policy's reward: `reward` a function fn(prompts, responses, rows, texts), a loaded RewardModel,
    or a reward model directory. A directory's model is `share()`'s (rm, why) when that gives one (one
    more adapter + head on the policy's base, share_base), else loaded as its own model with a line
    saying why it could not share."""
    if isinstance(reward, RewardModel):
        return scorer(reward, tok, template)
    if callable(reward):
        return Scorer(reward)
    rm, why = share() if share is not None else (None, "no policy model to share")
    if rm is not None:
        say(f"reward model {reward} shares the policy's base: scoring with its adapter and head on the "
            f"same weights (no second copy)")
    else:
        say(f"reward model {reward} cannot share the policy's base ({why}): loading it as its own model")
        rm = load_reward_model(reward, device=device, dtype=dtype, template=reward_template, quant=quant)
    return scorer(rm, tok, template)


@dataclass
class ScoreScale:
    """Reward-model scores in units of their spread: (score - shift) / scale."""
    shift: float = 0.0
    scale: float | None = None  # None: estimated on the first rollout batch (a released RM, no statistics)

    def __call__(self, scores, d):
        """scores (B,) of this process's rollouts; d: the run's dist.Dist (the first estimate is over all ranks)."""
        if self.scale is None:
            s = dist.all_mean({"mean": scores.mean().item(), "square": (scores ** 2).mean().item()}, d)
            std = math.sqrt(max(s["square"] - s["mean"] ** 2, 0.0))
            self.shift, self.scale = s["mean"], max(std, 1e-6)
            if d.main:
                print(f"reward: the reward model stores no score statistics; from the first rollout batch: bias "
                      f"{self.shift:.4g}, std {std:.4g}; scores are (score - bias) / std from here on")
        return (scores - self.shift) / self.scale
