"""How the engine turns a row of logits into a token: each request's own settings.

`SamplingParams` is what a request asks for; `process_rows` applies each row's repetition
penalty, temperature, top-k and top-p (as transformers does, in that order); `sample_rows` draws
one token per row with that row's own torch.Generator, so a request's tokens do not depend on
what else is in the batch; `sample_seed` gives the n samples of one request their own seeds.
"""

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop_ids: tuple = ()  # a request ends on one of these tokens (it is kept)
    stop_strings: tuple = ()  # ... or on the token that completes one of these (needs the tokenizer)
    seed: int | None = None  # None: drawn from torch's global RNG when the request is added
    logprobs: bool = False  # log-prob of each token under logits / temperature
    top_logprobs: int = 0  # also the n most likely tokens and their log-probs at each step
    prompt_logprobs: bool = False  # also each prompt token's log-prob (and its top_logprobs), from the prefill


def sample_seed(seed: int, j: int) -> int:
    """The seed of sample j of a request seeded with `seed` (sample 0 keeps it): n samples differ."""
    return seed if j == 0 else (seed * 6364136223846793005 + j * 1442695040888963407) % 2**63


def process_rows(logits, temperature, top_k, top_p, penalty, seen):
    """Each row's repetition penalty, temperature, top-k and top-p (in that order, as transformers does).

    logits (B, V); the settings are lists of B numbers (temperature <= 0: unscaled, top_k 0 and
    top_p 1: off); seen (B, V) marks the tokens each row has seen, or None. A setting that is off
    in every row costs nothing, and a row's result never depends on the other rows.
    """
    dev, dt, V = logits.device, logits.dtype, logits.shape[-1]

    def col(xs):
        return torch.tensor(xs, dtype=dt, device=dev)[:, None]  # (B, 1)

    if seen is not None and any(p != 1.0 for p in penalty):
        pen = col(penalty)
        logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    if any(t > 0 for t in temperature):
        logits = logits / col([t if t > 0 else 1.0 for t in temperature])
    ks = [k if 0 < k < V else 0 for k in top_k]
    if any(ks):
        kth = torch.topk(logits, max(ks), dim=-1).values  # (B, max k), descending
        thr = kth.gather(-1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        thr = thr.masked_fill(torch.tensor([k == 0 for k in ks], device=dev)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < thr, float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, idx = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= col([1 - p if p < 1.0 else -1.0 for p in top_p])
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def process_logits(logits, temperature, top_k, top_p, repetition_penalty, seen):
    """`process_rows` with the same settings for every row of logits (B, V)."""
    B = logits.shape[0]
    return process_rows(logits, [temperature] * B, [top_k] * B, [top_p] * B, [repetition_penalty] * B, seen)


def greedy_tokens(logits, chunk: int = 1024):
    """logits.argmax(-1): each row's first largest logit (a NaN counting as the largest, as argmax).

    On a CPU through the max of each `chunk` logits: argmax carries an index beside every value it
    compares and ran one element at a time (0.09 ms for one 151,936-logit row, 0.7 ms for 16, on a
    2-core AMD EPYC), where amax is vectorised; the argmax is then taken within the first chunk that
    holds the row's max, which is where argmax's first largest logit is (2.5x as fast at 1 row, 6-8x
    at 8 to 16)."""
    B, V = logits.shape
    n = V // chunk
    if logits.device.type != "cpu" or n < 2:
        return logits.argmax(-1)
    maxes = logits[:, :n * chunk].view(B, n, chunk).amax(-1)  # (B, n)
    if n * chunk < V:
        maxes = torch.cat([maxes, logits[:, n * chunk:].amax(-1, keepdim=True)], -1)
    start = maxes.argmax(-1) * chunk  # (B,) the first chunk holding the max
    # the last, shorter chunk is filled up with its last logit again, after it: argmax keeps the first
    at = (start[:, None] + torch.arange(chunk, device=logits.device)).clamp_max(V - 1)
    return start + logits.gather(-1, at).argmax(-1)


def _inverse_cdf(logits, generators):
    """One draw per row of logits from softmax(logits), with one uniform from that row's generator."""
    probs = logits.float().softmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=cdf.device) for g in generators])
    total = cdf[:, -1:].contiguous()
    reach = torch.searchsorted(cdf, total).clamp_max(cdf.shape[-1] - 1)  # (NaN logits: in range)
    return torch.minimum(torch.searchsorted(cdf, u[:, None] * total, right=True), reach).squeeze(-1)


def sample_rows(logits, temperature, generators):
    """One token per row of logits (B, V): argmax where temperature <= 0, else a draw from
    softmax(logits) by inverse CDF with one uniform from that row's generator.

    One uniform number per row against the cumulative probabilities: torch.multinomial draws an
    exponential variate per vocabulary entry, which on a CPU costs more than the rest of a small
    model's decode step. right=True never lands on a zero-probability (masked) token; a uniform
    that rounds to the total (no entry above it) takes the first token where the cumulative sum
    reaches the total, a token with mass (found by bisection: a pass over every row's
    probabilities for the last token with mass took a third of the sampling's time).

    The rows are drawn a few at a time, their float64 sums within 4 MiB: 16 rows of 151,936
    logits at once took 19 MB of sums that came back as fresh pages at every call (7,000-9,500
    page faults, 9.5-11.6 ms on a 2-core AMD EPYC), 4 rows at a time none (1.4-1.5 ms).
    """
    rows = [i for i, t in enumerate(temperature) if t > 0]
    if not rows:
        return greedy_tokens(logits)
    sub = logits if len(rows) == len(temperature) else logits[rows]
    per = max(1, (4 << 20) // (8 * logits.shape[-1]))
    drawn = torch.cat([_inverse_cdf(sub[i:i + per], [generators[j] for j in rows[i:i + per]])
                       for i in range(0, len(rows), per)])
    if len(rows) == len(temperature):
        return drawn
    tok = greedy_tokens(logits)  # only the greedy rows' argmax is needed
    tok[rows] = drawn
    return tok


def sample(logits, temperature, generator):
    """`sample_rows` with one temperature and one generator for every row."""
    return sample_rows(logits, [temperature] * logits.shape[0], [generator] * logits.shape[0])
