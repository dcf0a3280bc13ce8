"""Benchmark: the engine's token choice from a step's logits, against the code it replaced.

Greedy: `token_sampling.greedy_tokens` (on a CPU, the argmax taken through each chunk's max)
against `torch.argmax`. The engine's whole choice (`next_tokens`, a few rows at a time) against
`next_tokens_before` below, the code it replaced (every row at once, a where() over every logit
for the repetition penalty, top-p by the full sort of every row, and `sample_rows_before`, which
computed every row's argmax even with no greedy row and found the last token with mass by a pass
over every probability): sampled at temperature 1 alone, and with Qwen2.5's generation_config
(temperature 0.7, top-k 20, top-p 0.8, repetition penalty 1.05). Top-p 0.8, alone and after
top-k 20: `top_p_drop` (the sort over a row's largest logits where they decide) against
`top_p_drop_before`. The sampled tokens' log-probs (PPO and GRPO rollouts): `token_logprobs`
against one log_softmax over every row. All on the same random logits (Qwen2's vocabulary,
151,936, scaled by 4), in interleaved rounds, best of each; the tokens (or the dropped ones) are
checked to be the same.

    python bench/token_sampling.py                       # batch 1, 8, 16 and 64
    python bench/token_sampling.py --batches 16 --rounds 5 --out sampling.json
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanohuatuo.token_sampling import greedy_tokens, next_tokens, process_rows, token_logprobs, top_p_drop  # noqa: E402


def sample_rows_before(logits, temperature, generators):
    """sample_rows as it was: argmax of every row, and the clamp to the last token with mass."""
    tok = logits.argmax(-1)
    rows = [i for i, t in enumerate(temperature) if t > 0]
    if not rows:
        return tok
    sub = logits if len(rows) == len(temperature) else logits[rows]
    probs = sub.float().softmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64, device=cdf.device) for i in rows])
    u = u[:, None] * cdf[:, -1:]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    drawn = torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(-1), last)
    if len(rows) == len(temperature):
        return drawn
    tok[rows] = drawn
    return tok


def top_p_drop_before(logits, top_p):
    """The tokens top-p dropped as it was: every row sorted in full."""
    low = torch.tensor([1 - p if p < 1.0 else -1.0 for p in top_p], dtype=logits.dtype)[:, None]
    sorted_logits, idx = torch.sort(logits, dim=-1)  # ascending
    drop = sorted_logits.softmax(-1).cumsum(-1) <= low
    drop[..., -1] = False
    return drop.scatter(-1, idx, drop)


def next_tokens_before(logits, temperature, top_k, top_p, penalty, seen, generators):
    """The engine's choice as it was: every row at once, the repetition penalty a where() over every
    logit, temperature and top-k as now, top-p by the full sort, then sample_rows_before."""
    B = logits.shape[0]
    if seen is not None and any(p != 1.0 for p in penalty):
        pen = torch.tensor(penalty, dtype=logits.dtype)[:, None]
        logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    x = process_rows(logits, temperature, top_k, [1.0] * B, [1.0] * B, None)
    if any(p < 1.0 for p in top_p):
        x = x.masked_fill(top_p_drop_before(x, top_p), float("-inf"))
    return sample_rows_before(x, temperature, generators)


def best_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 64], help="rows of logits (default: 1 8 16 64)")
    ap.add_argument("--vocab", type=int, default=151936, help="logits per row (default: 151936, Qwen2's)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, the best kept (default: 3)")
    ap.add_argument("--calls", type=int, default=30, help="calls timed per round (default: 30)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"vocabulary {args.vocab:,}")
    print("| rows | what | before us | now us | now / before speed | same tokens |")
    print("|---|---|---|---|---|---|")
    rows = []
    # one untimed pass over every size first: the C allocator's thresholds move with the sizes a
    # process has freed, and a fresh process paid page faults at its first size (1 row: 1.1-1.4 ms
    # a draw before any larger batch, 0.17-0.41 ms after), as an engine that has run a while does not
    for B in args.batches:
        x = torch.randn(B, args.vocab)
        for _ in range(3):
            sample_rows_before(x, [1.0] * B, [None] * B), next_tokens(x, [1.0] * B, [0] * B, [1.0] * B, [1.0] * B,
                                                                      None, [None] * B)
    for B in args.batches:
        logits = torch.randn(B, args.vocab, generator=torch.Generator().manual_seed(B)) * 4
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(B)]  # noqa: E731
        pairs = {"greedy": (lambda: logits.argmax(-1), lambda: greedy_tokens(logits))}
        g_old, g_new = gens(), gens()
        plain = ([1.0] * B, [0] * B, [1.0] * B, [1.0] * B, None)  # temperature 1, nothing else
        pairs["sampled"] = (lambda: next_tokens_before(logits, *plain, g_old), lambda: next_tokens(logits, *plain, g_new))
        # top-p 0.8 alone, and after top-k 20 (Qwen2.5's generation_config): the logits as top-k leaves them
        pairs["top-p"] = (lambda: top_p_drop_before(logits, [0.8] * B), lambda: top_p_drop(logits, [0.8] * B))
        top20 = process_rows(logits, [1.0] * B, [20] * B, [1.0] * B, [1.0] * B, None)
        pairs["top-k, top-p"] = (lambda: top_p_drop_before(top20, [0.8] * B), lambda: top_p_drop(top20, [0.8] * B))
        # the engine's whole choice with Qwen2.5's defaults: temperature 0.7, top-k 20, top-p 0.8,
        # repetition penalty 1.05 over 200 seen tokens a row
        seen = torch.zeros(B, args.vocab, dtype=torch.bool)
        seen[:, torch.randperm(args.vocab, generator=torch.Generator().manual_seed(0))[:200]] = True
        qwen = ([0.7] * B, [20] * B, [0.8] * B, [1.05] * B, seen)
        q_old, q_new = gens(), gens()
        pairs["Qwen's defaults"] = (lambda: next_tokens_before(logits, *qwen, q_old),
                                    lambda: next_tokens(logits, *qwen, q_new))
        # each token's log-prob, as PPO and GRPO rollouts ask for it (temperature 0.7)
        toks = greedy_tokens(logits)
        pairs["log-probs"] = (lambda: torch.log_softmax(logits / 0.7, -1).gather(-1, toks[:, None]).squeeze(-1),
                              lambda: token_logprobs(logits, [0.7] * B, toks)[0])
        for what, (before, now) in pairs.items():
            same = all(torch.equal(a, b) for a, b in ((before(), now()) for _ in range(5)))
            before(), now()  # warm
            t_b, t_n = [], []
            for _ in range(args.rounds):
                t_b.append(best_us(before, args.calls))
                t_n.append(best_us(now, args.calls))
            row = dict(rows=B, what=what, before_us=min(t_b), now_us=min(t_n), same_tokens=same)
            rows.append(row)
            print(f"| {B} | {what} | {row['before_us']:.0f} | {row['now_us']:.0f} | "
                  f"{row['before_us'] / row['now_us']:.2f}x | {'yes' if same else 'NO'} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
