"""Win / tie / loss statistics of a pairwise comparison: pure numpy, no model, no judge.

    outcome = combine("A", "tie")                    # two order-swapped verdicts -> "win" / "tie" / "loss"
    s = wtl_stats(outcomes, len_a_minus_len_b)       # counts, %, win rate, length-controlled win rate, CIs
    t = tables(items, [(outcome | None, why), ...], boots=1000, seed=0)   # overall and per group
    cohen_kappa(human, judge)                        # agreement of two raters' labels
    fleiss_kappa([[3, 0, 0], [1, 1, 1]])             # agreement of n raters: per item, votes per category
    majority(["win", "win", "tie"])                  # an item's outcome by vote ("no majority" on a tie)

Win rate = win + tie / 2 (OUTCOME_SCORE). Confidence intervals: 95% percentile bootstrap over
questions (or cases). Length control (AlpacaEval 2): a logistic fit of the outcome on
tanh(length difference / its standard deviation), lengths in characters without whitespace; the
length-controlled win rate is the fitted probability at zero length difference.
"""

from collections import Counter

import numpy as np


def combine(first: str, second: str, rule: str = "sum") -> str:
    """A's outcome from two verdicts ("A", "B", "tie"): sum (HuatuoGPT: +1/0/-1 summed) or strict."""
    if rule == "strict":
        return {"A": "win", "B": "loss", "tie": "tie"}[first] if first == second else "tie"
    if rule != "sum":
        raise ValueError(f"--combine {rule!r}: use sum or strict")
    score = sum({"A": 1, "B": -1, "tie": 0}[v] for v in (first, second))
    return "win" if score > 0 else "loss" if score < 0 else "tie"


OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def fit_length_controlled(y, diff, l2: float = 1e-2):
    """Win rate at equal length and slope: logistic fit of outcome y (1 / 0.5 / 0) on tanh(diff / std).

    y and diff are (n,) for one fit or (B, n) for B fits at once (the bootstrap). Newton's method on
    the soft-label cross-entropy, the 2x2 system solved in closed form per row; the small L2 term
    keeps a clean sweep finite."""
    y, d = np.atleast_2d(np.asarray(y, float)), np.atleast_2d(np.asarray(diff, float))  # (B, n)
    if y.shape[1] == 0:
        return np.full(len(y), np.nan), np.full(len(y), np.nan)
    sd = d.std(axis=1, keepdims=True)
    x = np.tanh(d / np.where(sd > 0, sd, 1.0))  # all zeros where every difference is the same
    w0, w1 = np.zeros(len(y)), np.zeros(len(y))
    for _ in range(100):
        p = 1 / (1 + np.exp(-(w0[:, None] + w1[:, None] * x)))
        r, h = p - y, p * (1 - p)
        g0, g1 = r.sum(1) + l2 * w0, (r * x).sum(1) + l2 * w1  # gradient
        a, b, c = h.sum(1) + l2, (h * x).sum(1), (h * x * x).sum(1) + l2  # Hessian [[a, b], [b, c]]
        det = a * c - b * b
        s0, s1 = (c * g0 - b * g1) / det, (a * g1 - b * g0) / det
        w0, w1 = w0 - s0, w1 - s1
        if max(np.abs(s0).max(), np.abs(s1).max()) < 1e-10:
            break
    return 1 / (1 + np.exp(-w0)), w1


def wtl_stats(outcomes: list[str], diffs: list[float], boots: int = 1000, seed: int = 0,
              length_control: bool = True) -> dict:
    """Counts, rates (%), win rate (win + tie/2, %), length-controlled win rate, bootstrap 95% CIs."""
    n = len(outcomes)
    counts = {k: outcomes.count(k) for k in ("win", "tie", "loss")}
    out = {"n": n, **counts}
    if n == 0:
        return out
    y = np.array([OUTCOME_SCORE[o] for o in outcomes])
    d = np.array(diffs, dtype=float)
    codes = np.array([("win", "tie", "loss").index(o) for o in outcomes])
    for name in ("win", "tie", "loss"):
        out[f"{name}_pct"] = 100 * counts[name] / n
    out["winrate"] = 100 * float(y.mean())
    if length_control:
        lc, slope = fit_length_controlled(y, d)
        out["lc_winrate"], out["length_slope"] = 100 * float(lc[0]), float(slope[0])
    if boots:
        idx = np.random.default_rng(seed).integers(0, n, (boots, n))  # resampled questions, (B, n)
        samples = {f"{name}_pct": 100 * (codes[idx] == k).mean(1) for k, name in enumerate(("win", "tie", "loss"))}
        samples["winrate"] = 100 * y[idx].mean(1)
        if length_control:
            samples["lc_winrate"] = 100 * fit_length_controlled(y[idx], d[idx])[0]
        for k, v in samples.items():
            out[f"{k}_ci"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    return out


def length(text: str | None) -> int:
    """Characters without whitespace: the unit of the length-controlled fit."""
    return len("".join((text or "").split()))


def tables(items: list[dict], outcomes: list, boots: int, seed: int) -> dict:
    """Overall and per-group statistics from (outcome, why-unjudged) per item."""
    def stats(sel, length_control):
        judged = [(it, o) for it, (o, _) in sel if o is not None]
        s = wtl_stats([o for _, o in judged], [it["len_a"] - it["len_b"] for it, _ in judged], boots, seed,
                      length_control)
        s["unjudged"] = len(sel) - len(judged)
        return s

    pairs = list(zip(items, outcomes))
    groups = dict.fromkeys(it["group"] for it in items)  # in order of first appearance
    # per group: counts and CIs only, a length fit on ten questions would be noise
    return {"overall": stats(pairs, True),
            "groups": {g: stats([(it, o) for it, o in pairs if it["group"] == g], False) for g in groups}}


def cohen_kappa(x: list[str], y: list[str], labels=("win", "tie", "loss")) -> float | None:
    """Cohen's kappa of two raters' labels; None when chance agreement is 1 (both used one label)."""
    n = len(x)
    if n == 0:
        return None
    po = sum(a == b for a, b in zip(x, y)) / n
    pe = sum((x.count(k) / n) * (y.count(k) / n) for k in labels)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def fleiss_kappa(counts) -> float | None:
    """Fleiss' kappa: counts[i][j] raters put item i in category j, every item rated by the same
    n >= 2 raters. None without items, or when chance agreement is 1 (every rating one category)."""
    c = np.asarray(counts, dtype=float)  # (N items, k categories)
    if c.size == 0:
        return None
    if c.ndim != 2:
        raise ValueError(f"Fleiss' kappa needs a table of counts, one row per item, got shape {c.shape}")
    n = c.sum(1)
    if (n != n[0]).any() or n[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings for every item, "
                         f"got {sorted({int(x) for x in n})}")
    n = n[0]
    agree = ((c * c).sum(1) - n) / (n * (n - 1))  # (N,) share of rater pairs that agree on the item
    share = c.sum(0) / c.sum()  # (k,) share of all ratings in each category
    pe = float((share * share).sum())
    return None if pe >= 1 else (float(agree.mean()) - pe) / (1 - pe)


NO_MAJORITY = "no majority"


def majority(votes: list[str]) -> str | None:
    """The outcome most votes gave (a plurality), NO_MAJORITY when two outcomes share the most
    votes, None without votes."""
    top = Counter(votes).most_common(2)
    if not top:
        return None
    return NO_MAJORITY if len(top) == 2 and top[0][1] == top[1][1] else top[0][0]
