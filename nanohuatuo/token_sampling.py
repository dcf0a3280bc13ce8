"""How the engine turns a row of logits into a token: each request's own settings.

`SamplingParams` is what a request asks for; `process_rows` applies each row's repetition
penalty, temperature, top-k and top-p (as transformers does, in that order); `sample_rows` draws
one token per row with that row's own torch.Generator, so a request's tokens do not depend on
what else is in the batch; `next_tokens` is both, a few rows at a time, as the engine runs them;
`sample_seed` gives the n samples of one request their own seeds.
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
        # only the seen tokens' logits change (a few hundred a row): where() over the whole (B, V)
        # took 0.15 ms a row of 151,936
        r, c = seen.nonzero(as_tuple=True)
        v, pen = logits[r, c], col(penalty)[r, 0]
        logits = logits.index_put((r, c), torch.where(v < 0, v * pen, v / pen))
    if any(t > 0 for t in temperature):
        logits = logits / col([t if t > 0 else 1.0 for t in temperature])
    ks = [k if 0 < k < V else 0 for k in top_k]
    if any(ks):
        kth = torch.topk(logits, max(ks), dim=-1).values  # (B, max k), descending
        thr = kth.gather(-1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        thr = thr.masked_fill(torch.tensor([k == 0 for k in ks], device=dev)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < thr, float("-inf"))
    if any(p < 1.0 for p in top_p):
        logits = logits.masked_fill(top_p_drop(logits, top_p), float("-inf"))
    return logits


def top_p_drop(logits, top_p, candidates: int = 1024):
    """(B, V) bool, the tokens top-p drops, as transformers' TopPLogitsWarper: the row sorted
    ascending, the tokens whose cumulative probability is <= 1 - p go, the most likely one stays
    (p >= 1: none go).

    On a CPU torch.sort of 151,936 logits took 11 ms a row (2-core AMD EPYC), as long as a 100M
    model's whole decode step, and torch.topk of a row's `candidates` largest 0.3-0.5 ms. So a
    row is sorted in full only where its candidates cannot decide:
    - a row with no more finite logits than that (top-k first, as Qwen's generation_config asks:
      top_k 20, top_p 0.8): its candidates are laid out after V - k logits of -inf, where the full
      sort puts them (probability exactly 0): the full sort's tensor (up to the order of equal
      logits), so the same sums, bit for bit;
    - else, where the tokens outside the candidates hold less than 1 - p of the probability (with
      a margin for rounding), they all go, and the candidates' cumulative sums start from their
      mass: the full sort's choice up to rounding (the softmax and that mass summed in the row's
      order, not the sorted one: the sums may differ in their last bits);
    - any other row: the full sort, as on other devices (where sorting is cheap).
    """
    B, V = logits.shape
    low = torch.tensor([1 - p if p < 1.0 else -1.0 for p in top_p], dtype=logits.dtype, device=logits.device)
    k = min(candidates, V)
    if logits.device.type != "cpu" or k == V:
        return _top_p_sorted(logits, low[:, None])
    drop = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
    rows = [i for i, p in enumerate(top_p) if p < 1.0]
    if not rows:
        return drop
    x = logits if len(rows) == B else logits[rows]
    n_finite = (x > float("-inf")).sum(-1).tolist()
    k = min(k, max(1, *n_finite))  # top-k left fewer: topk of 20 is cheaper than of 1,024
    vals, idx = x.topk(k, dim=-1)
    vals, idx = vals.flip(-1), idx.flip(-1)  # ascending, as the sort
    undecided = []
    for j, i in enumerate(rows):  # a row at a time: (B, V) temporaries cost page faults (sample_rows)
        if n_finite[j] <= k:
            laid = torch.full_like(logits[i], float("-inf"))
            laid[V - k:] = vals[j]
            # the sums over the tail only: before it, zeros (CPU cumsum adds in float64: still 0)
            cum = laid.softmax(-1)[V - k:].cumsum(-1)
        else:
            probs = logits[i].softmax(-1)
            cand = probs[idx[j]].double()
            rest = probs.sum(dtype=torch.float64) - cand.sum()
            if rest >= low[i] - 1e-5:  # the candidates cannot decide
                undecided.append(i)
                continue
            cum = (rest + cand.cumsum(0)).to(logits.dtype)
        d = cum <= low[i]
        d[-1] = False  # always keep the most likely token
        drop[i] = torch.ones_like(drop[i]).scatter_(0, idx[j], d)  # the rest: -inf, or below 1 - p
    if undecided:  # sorted together: one sort runs rows on both threads
        drop[undecided] = _top_p_sorted(logits[undecided], low[undecided, None])
    return drop


def _top_p_sorted(logits, low):
    """top_p_drop by the full sort; low (B, 1) is 1 - p (-1: off)."""
    sorted_logits, idx = torch.sort(logits, dim=-1)  # ascending
    drop = sorted_logits.softmax(-1).cumsum(-1) <= low
    drop[..., -1] = False  # always keep the most likely token
    return drop.scatter(-1, idx, drop)


def rows_at_once(logits) -> int:
    """Rows of logits (B, V) processed together. On a CPU as many as keep their float64 sums within
    4 MiB (larger temporaries came back as fresh pages at every step), rounded up to a multiple of
    torch's threads (a sort or topk splits rows between threads: 3 rows on 2 take as long as 4);
    elsewhere all of them (each block is more kernel launches)."""
    B, V = logits.shape
    if logits.device.type != "cpu":
        return max(B, 1)
    t = torch.get_num_threads()
    return max(1, -(-((4 << 20) // (8 * V)) // t)) * t


def next_tokens(logits, temperature, top_k, top_p, penalty, seen, generators):
    """`process_rows` then `sample_rows` (the engine's step): one token per row of logits (B, V).

    A few rows at a time (`rows_at_once`), the same tokens (a row's never depends on the others'):
    at temperature 1, 16 rows of 151,936 logits at once took 19 MB of float64 sums that came back
    as fresh pages at every call (7,000-9,500 page faults, 9.5-11.6 ms on a 2-core AMD EPYC), 4
    rows at a time none (1.4-1.5 ms); with `heap.keep_large_blocks` 64 rows at once still
    paid 38,000 (50 ms against 7.4 ms in blocks).
    With Qwen2.5's defaults (temperature 0.7, top-k 20, top-p 0.8, repetition penalty 1.05), 16
    rows of 151,936 logits took 57.6 ms a step on a 2-core AMD EPYC when processed at once, with a
    full sort a row and a where() over every logit, against 14.6 ms now (bench/token_sampling.py).
    Greedy rows without a penalty are not processed and take one argmax."""
    B, V = logits.shape
    if not any(t > 0 for t in temperature) and (seen is None or all(p == 1.0 for p in penalty)):
        return greedy_tokens(logits)
    per = rows_at_once(logits)
    out = []
    for a in range(0, B, per):
        b = slice(a, a + per)
        x = process_rows(logits[b], temperature[b], top_k[b], top_p[b], penalty[b], None if seen is None else seen[b])
        out.append(sample_rows(x, temperature[b], generators[b]))
    return torch.cat(out)


def token_logprobs(logits, temperature, tokens, n_top: int = 0):
    """Log-probs under logits / temperature (temperature <= 0: 1, as greedy) of tokens (B,), and the
    n_top most likely per row as (values, indices) (B, n_top), or None.

    A few rows at a time (`rows_at_once`), the values log_softmax gives over all rows at once: in
    one at 32 rows of 151,936 logits, a 100M model's decode step paid 9,464 page faults and took
    43.3 ms against 34.5 ms in blocks (2-core AMD EPYC; at 16 rows it paid them or not, by what
    the process had freed before), and PPO and GRPO rollouts ask for it at every token."""
    B = logits.shape[0]
    per = rows_at_once(logits)
    temp = torch.tensor([t if t > 0 else 1.0 for t in temperature], device=logits.device)[:, None]
    lps, vals, idx = [], [], []
    for a in range(0, B, per):
        lp = torch.log_softmax(logits[a:a + per] / temp[a:a + per], -1)
        lps.append(lp.gather(-1, tokens[a:a + per, None]).squeeze(-1))
        if n_top:
            top = lp.topk(n_top, dim=-1)
            vals.append(top.values)
            idx.append(top.indices)
    return torch.cat(lps), ((torch.cat(vals), torch.cat(idx)) if n_top else None)


def process_logits(logits, temperature, top_k, top_p, repetition_penalty, seen):
    """`process_rows` with the same settings for every row of logits (B, V)."""
    B = logits.shape[0]
    return process_rows(logits, [temperature] * B, [top_k] * B, [top_p] * B, [repetition_penalty] * B, seen)


def greedy_tokens(logits, chunk: int = 1024):
    """logits.argmax(-1): each row's first largest logit (a NaN counting as the largest, as argmax).

    On a CPU through the max of each `chunk` logits: argmax carries an index beside every value it
    compares and ran one element at a time (0.09 ms for one 151,936-logit row, 0.7 ms for 16, on a
    2-core AMD EPYC), where amax is vectorised; the argmax is then taken within the first chunk that
    holds the row's max, which is where argmax's first largest logit is (about 3x as fast at 1 row,
    5-6x at 8 to 16: bench/token_sampling.py)."""
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


def sample_rows(logits, temperature, generators):
    """One token per row of logits (B, V): argmax where temperature <= 0, else a draw from
    softmax(logits) by inverse CDF with one uniform from that row's generator.

    One uniform number per row against the cumulative probabilities: torch.multinomial draws an
    exponential variate per vocabulary entry, which on a CPU costs more than the rest of a small
    model's decode step. right=True never lands on a zero-probability (masked) token; a uniform
    that rounds to the total (no entry above it) takes the first token where the cumulative sum
    reaches the total, a token with mass (found by bisection: a pass over every row's
    probabilities for the last token with mass took a third of the sampling's time). All rows at
    once: the engine calls it a few rows at a time (`next_tokens`).
    """
    rows = [i for i, t in enumerate(temperature) if t > 0]
    if not rows:
        return greedy_tokens(logits)
    sub = logits if len(rows) == len(temperature) else logits[rows]
    probs = sub.float().softmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64, device=cdf.device) for i in rows])
    total = cdf[:, -1:].contiguous()
    reach = torch.searchsorted(cdf, total).clamp_max(cdf.shape[-1] - 1)  # (NaN logits: in range)
    drawn = torch.minimum(torch.searchsorted(cdf, u[:, None] * total, right=True), reach).squeeze(-1)
    if len(rows) == len(temperature):
        return drawn
    tok = greedy_tokens(logits)  # only the greedy rows' argmax is needed
    tok[rows] = drawn
    return tok


def sample(logits, temperature, generator):
    """`sample_rows` with one temperature and one generator for every row."""
    return sample_rows(logits, [temperature] * logits.shape[0], [generator] * logits.shape[0])
