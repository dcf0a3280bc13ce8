"""Generation engine shared by chat, serving, evaluation and PPO rollouts.

Prompts of different lengths are left-padded into one batch; a KV cache sized for prompt plus
answer is allocated once and written in place. Prefill runs the whole padded prompt, then each
decode step feeds one token per row with fixed shapes, so `torch.compile` (CUDA graphs) can
capture it. Padding never shifts a sequence: each row's RoPE positions count only its real
tokens and padded keys are masked out, so a prompt gets exactly the tokens it gets alone.

    generate(model, prompts, max_new_tokens, temperature=0.0, ...) -> new tokens per prompt
    generate_batch(...)  -> Generation(tokens, logprobs, finished)   (PPO needs the log-probs)
    stream(model, prompt, ...) -> yields token ids one at a time      (chat)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import torch._dynamo

from .model import KVCache, Transformer


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the stop token/string
    logprobs: list[list[float]] | None  # log-prob of each sampled token under logits / temperature
    finished: list[bool]  # True if it stopped on a stop token or string, False if it hit the length limit


# ----------------------------------------------------------------------------- sampling

def process_logits(logits, temperature, top_k, top_p, repetition_penalty, seen):
    """Apply repetition penalty, temperature, top-k and top-p (in that order, as transformers does)."""
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature > 0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample(logits, temperature, generator):
    """One token per row: argmax at temperature 0, else a draw from softmax(logits) by inverse CDF.

    One uniform number per row against the cumulative probabilities: torch.multinomial draws an
    exponential variate per vocabulary entry, which on a CPU costs more than the rest of a small
    model's decode step. right=True never lands on a zero-probability (masked) token, and the clamp
    to the last token with mass guards the top end against rounding.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = logits.float().softmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=generator, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # the last token with mass
    return torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(-1), last)


# ----------------------------------------------------------------------------- the engine

def left_pad(prompts, pad_id, device):
    """(B, P) ids left-padded with pad_id and the (B, P) mask of real tokens."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def use_column_major_weights(model):
    """On CPU, store the output matrix and the blocks' projections column-major (same values,
    transposed strides).

    A decode step is dominated by reading the weights once per token; CPU BLAS reads them faster
    for a few rows of activations when a (out, in) matrix is laid out as (in, out): about twice as
    fast for the (vocab, dim) output matrix, and 1.3-1.5x for the projections at batch 8 (measured
    with bench/generate.py). The parameter objects are kept, so tied embeddings stay tied, and
    saving writes the usual row-major tensors.
    """
    w = getattr(model.lm_head, "weight", None)
    if w is None or w.device.type != "cpu" or not w.is_floating_point() or not w.is_contiguous():
        return
    w.data = w.data.t().contiguous().t()
    # the blocks' projections too: with a few rows (batched decoding) MKL reads (in, out) faster
    for name, m in model.layers.named_modules():
        if isinstance(m, torch.nn.Linear) and "lora_" not in name and m.weight.is_floating_point() \
                and m.weight.is_contiguous():  # LoRA's own small matrices stay as they are
            m.weight.data = m.weight.data.t().contiguous().t()


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def head_logits(model, h):
    """float32 logits (B, vocab) of the last hidden states h (B, dim).

    On CPU with several rows, MKL's sgemm reads a tall (vocab, dim) matrix far below memory speed
    on some processors; oneDNN's linear kernel does not, so batched decoding uses it there.
    """
    head = model.lm_head
    if (_ONEDNN_LINEAR and h.device.type == "cpu" and h.shape[0] > 1 and type(head) is torch.nn.Linear
            and head.weight.dtype == torch.float32):
        return torch.ops.mkldnn._linear_pointwise(h, head.weight, None, "none", [], "")
    return model.logits(h).float()


def make_cache(model, B, S, dtype, device, keep=False):
    """A KV cache for B rows of S slots. With `keep` (compiled decoding) one cache is kept on the model
    and reused while the shapes match: CUDA graphs replay on fixed addresses, so the cache tensors
    are marked static and must not be reallocated each call. Stale entries never leak: every slot a
    query may see is rewritten by the prefill or an earlier decode step."""
    if not keep:
        return KVCache(model.config, B, S, dtype, device)
    cache = getattr(model, "_static_cache", None)
    if cache is None or cache.k[0].shape != (B, model.config.n_kv_heads, S, model.config.head_dim) \
            or cache.k[0].dtype != dtype or cache.k[0].device != torch.device(device):
        model._static_cache = None  # free the old one before allocating
        cache = KVCache(model.config, B, S, dtype, device)
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)
        model._static_cache = cache
    return cache


def _decode_one(model, x, positions, attention_mask, cache, cache_pos):
    # one decode step: fixed shapes, so torch.compile can capture it as a CUDA graph
    h = model.hidden_states(x, attention_mask=attention_mask, positions=positions, cache=cache, cache_pos=cache_pos)
    return head_logits(model, h[:, -1])


_compiled = {}


def decode_step_fn(compile: bool):
    if not compile:
        return _decode_one
    if "step" not in _compiled:
        _compiled["step"] = torch.compile(_decode_one, mode="reduce-overhead", fullgraph=True)
    return _compiled["step"]


def _steps(model: Transformer, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
           seed, pad_id, compile, logprobs=False):
    """Yield (tokens (B,), logprobs (B,) or None) for each new position until max_new_tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a BOS token or some text)")
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    c = model.config
    use_column_major_weights(model)
    ids, real = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    S = P + max_new_tokens
    if compile:
        S = -(-S // 256) * 256  # few distinct cache shapes, so few compilations and CUDA graphs
    cache = make_cache(model, B, S, dtype, device, keep=compile)
    attention_mask = torch.ones((B, S), dtype=torch.long, device=device)
    attention_mask[:, :P] = real  # generated slots are all real; later slots are hidden by causality
    lengths = real.sum(-1)  # (B,)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros((B, c.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, ids, real.bool())

    # prefill
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    h = model.hidden_states(ids, attention_mask=attention_mask, positions=positions, cache=cache,
                            cache_pos=torch.arange(P, device=device))
    logits = head_logits(model, h[:, -1])
    step = decode_step_fn(compile)
    for t in range(max_new_tokens):
        processed = process_logits(logits, temperature, top_k, top_p, repetition_penalty, seen)
        tok = sample(processed, temperature, generator)
        logp = None
        if logprobs:
            scaled = logits / temperature if temperature > 0 else logits
            logp = torch.log_softmax(scaled, -1).gather(-1, tok[:, None]).squeeze(-1)
        yield tok, logp
        if t == max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        logits = step(model, tok[:, None], (lengths + t)[:, None], attention_mask, cache,
                      torch.tensor([P + t], device=device))


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                   stop_ids=(), stop_strings=(), tokenizer=None, pad_id: int = 0, compile: bool = False,
                   return_logprobs: bool = False) -> Generation:
    """Generate for a batch of token-id prompts; rows stop on a stop id or stop string.

    Stop strings need the tokenizer; a row stops at the token that completes one (that token is
    kept; `cut_at_stop` trims the text). Log-probs are taken from logits / temperature before
    top-k/top-p, which is what PPO's importance ratios need under pure sampling.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    stop_ids = set(int(i) for i in stop_ids)
    B = len(prompts)
    out = [[] for _ in range(B)]
    lps = [[] for _ in range(B)]
    done = [False] * B
    tail = max((len(s) for s in stop_strings), default=0) + 8  # tokens decoded per stop-string check
    for tok, logp in _steps(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            seed, pad_id, compile, logprobs=return_logprobs):
        tok = tok.tolist()
        logp = logp.tolist() if logp is not None else [0.0] * B
        for i in range(B):
            if done[i]:
                continue
            out[i].append(tok[i])
            lps[i].append(logp[i])
            if tok[i] in stop_ids:
                done[i] = True
            elif stop_strings:
                text = tokenizer.decode(out[i][-tail:])
                if any(s in text for s in stop_strings):
                    done[i] = True
        if all(done):
            break
    return Generation(out, lps if return_logprobs else None, done)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             **kw) -> list[list[int]]:
    """New tokens for each prompt (greedy by default). See generate_batch for the options."""
    return generate_batch(model, prompts, max_new_tokens, temperature=temperature, **kw).tokens


@torch.inference_mode()
def stream(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
           stop_ids=(), **kw):
    """Yield new token ids one at a time for one prompt, stopping after a stop id."""
    stop_ids = set(int(i) for i in stop_ids)
    defaults = dict(top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, pad_id=0, compile=False)
    defaults.update(kw)
    for tok, _ in _steps(model, [prompt], max_new_tokens, temperature, **defaults):
        t = int(tok[0])
        yield t
        if t in stop_ids:
            return


def cut_at_stop(text: str, stop_strings) -> str:
    """The text before the first stop string (the whole text if none occurs)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
