"""Win / tie / loss statistics of a pairwise comparison: pure numpy, no model, no judge.

    outcome = combine("A", "tie")                    # two order-swapped verdicts -> "win" / "tie" / "loss"
    s = wtl_stats(outcomes, len_a_minus_len_b, unjudged=2)   # counts, %, win rate, length control, CIs
    t = tables(items, [(outcome | None, why), ...], boots=1000, seed=0)   # overall, per group, length shift
    lc_text(s["length_control"])   # "61.2% [48.0, 73.1]; length slope ..." or "not identifiable (...)"
    cohen_kappa(human, judge)                        # agreement of two raters' labels
    fleiss_kappa([[3, 0, 0], [1, 1, 1]])             # agreement of n raters: per item, votes per category
    majority(["win", "win", "tie"])                  # an item's outcome by vote ("no majority" on a tie)

Win rate = win + tie / 2 (OUTCOME_SCORE). Rates are out of the judged items, and again out of all
items with the unjudged ones included (`*_pct_all`). Confidence intervals: 95% percentile
bootstrap over questions (or cases), the same resamples for every statistic.

Length control follows AlpacaEval 2's length-controlled GLM (Dubois et al. 2024). AlpacaEval fits
a logistic regression of the judge's preference on three terms: the model's identity, tanh(len
difference / its standard deviation) (not centred, so zero still means equal length), and the
instruction's difficulty; it reports the mean predicted preference with the length term set to
0. Here, with one pair of candidates:
- the candidate term is the intercept θ (AlpacaEval's model term for the single model compared);
- the length term is β·tanh((len_a - len_b) / sd), sd the sample standard deviation (ddof 1) of
  the differences, as AlpacaEval; lengths in characters without whitespace (`length`); β > 0
  means the judge favours A when A is the longer;
- the instruction-difficulty term is dropped: AlpacaEval estimates it from many models' answers
  to the same instructions, and with one pair of systems each item is seen once, so a per-item
  term would absorb every verdict;
- AlpacaEval also fits the baseline against its own verbose and concise rewrites (weight 0.2),
  which is what pins its length slope; we have no such rows, so the slope comes from our pairs
  alone and the guard below refuses a number the pairs cannot support;
- ties count half (soft labels 1 / 0.5 / 0 in the cross-entropy), as AlpacaEval;
- a small ridge penalty (LC_L2 on θ and β) only keeps a clean sweep finite; AlpacaEval uses an
  L1 penalty chosen by cross-validation, which needs more items than an evaluation here has.
LC win rate = σ(θ), the fit at equal length (with no difficulty term, the mean over items is σ(θ)).
Its interval and the slope's are bootstrap percentiles over items (the refit includes sd), not
Wald intervals: near separation the Hessian's curvature says little about the spread.

Not identifiable (value None, the reason as a string) when fewer than MIN_LC_ITEMS pairs are
judged, or when fewer than MIN_MINORITY_SHARE of them lie on the minority side of zero length
difference (pairs of equal length count on both sides): then one answer is longer in nearly
every pair and the rate "at equal length" is an extrapolation of the fitted curve.
"""

from collections import Counter

import numpy as np

MIN_LC_ITEMS = 20  # judged pairs below which a two-parameter fit is noise
MIN_MINORITY_SHARE = 0.10  # share of pairs needed on each side of zero length difference
LC_L2 = 1e-2  # ridge penalty on (θ, β): keeps a clean sweep finite, negligible at MIN_LC_ITEMS pairs


def combine(first: str, second: str, rule: str = "sum") -> str:
    """A's outcome from two verdicts ("A", "B", "tie"): sum (HuatuoGPT: +1/0/-1 summed) or strict."""
    if rule == "strict":
        return {"A": "win", "B": "loss", "tie": "tie"}[first] if first == second else "tie"
    if rule != "sum":
        raise ValueError(f"--combine {rule!r}: use sum or strict")
    score = sum({"A": 1, "B": -1, "tie": 0}[v] for v in (first, second))
    return "win" if score > 0 else "loss" if score < 0 else "tie"


OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def fit_length_controlled(y, diff, l2: float = LC_L2):
    """Win rate at equal length σ(θ) and slope β: logistic fit of outcome y (1 / 0.5 / 0) on tanh(diff / sd).

    y and diff are (n,) for one fit or (B, n) for B fits at once (the bootstrap). Newton's method on
    the soft-label cross-entropy plus l2/2·(θ² + β²), the 2x2 system solved in closed form per row.
    No identifiability check: length_control is the function that refuses."""
    y, d = np.atleast_2d(np.asarray(y, float)), np.atleast_2d(np.asarray(diff, float))  # (B, n)
    if y.shape[1] == 0:
        return np.full(len(y), np.nan), np.full(len(y), np.nan)
    sd = d.std(axis=1, ddof=1, keepdims=True) if d.shape[1] > 1 else np.zeros((len(d), 1))
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


def not_identifiable(diff) -> str | None:
    """Why the pairs' length differences (len_a - len_b) cannot support a rate at equal length, or None."""
    d = np.asarray(diff, float)
    n, a, b = len(d), int((d > 0).sum()), int((d < 0).sum())
    if n < MIN_LC_ITEMS:
        return f"{n} judged pairs, fewer than {MIN_LC_ITEMS}: too few to fit a length slope"
    if a == b == 0:
        return "the two answers have the same length in every judged pair: no length slope to fit"
    if min(n - a, n - b) < MIN_MINORITY_SHARE * n:  # equal lengths count on both sides
        longer, k = ("A", a) if a > b else ("B", b)
        return (f"{longer}'s answer is the longer in {k} of {n} judged pairs, fewer than {MIN_MINORITY_SHARE:.0%} "
                "on the other side: the rate at equal length would be an extrapolation")
    return None


def length_control(y, diff, idx=None) -> dict:
    """The structured length-controlled result: winrate (%) and slope with their bootstrap intervals, or
    None for both and the reason. y: (n,) outcomes 1 / 0.5 / 0; diff: (n,) len_a - len_b; idx: (B, n)
    resampled item indices, or None for no intervals."""
    y, d = np.asarray(y, float), np.asarray(diff, float)
    out = {"winrate": None, "winrate_ci": None, "slope": None, "slope_ci": None,
           "reason": not_identifiable(d), "a_longer": int((d > 0).sum()), "b_longer": int((d < 0).sum()),
           "equal": int((d == 0).sum())}
    if out["reason"]:
        return out
    lc, slope = fit_length_controlled(y, d)
    out["winrate"], out["slope"] = 100 * float(lc[0]), float(slope[0])
    if idx is not None:
        lc, slope = fit_length_controlled(y[idx], d[idx])
        out["winrate_ci"] = [float(v) for v in np.percentile(100 * lc, [2.5, 97.5])]
        out["slope_ci"] = [float(v) for v in np.percentile(slope, [2.5, 97.5])]
    return out


def lc_text(lc: dict | None) -> str:
    """A report cell: "61.2% [48.0, 73.1]; length slope +0.85 [+0.10, +1.60]" or "not identifiable (reason)"."""
    if not lc:
        return "–"
    if lc["winrate"] is None:
        return f"not identifiable ({lc['reason']})"
    ci = lambda v, fmt: f" [{fmt.format(v[0])}, {fmt.format(v[1])}]" if v else ""
    return (f"{lc['winrate']:.1f}%{ci(lc['winrate_ci'], '{:.1f}')}; "
            f"length slope {lc['slope']:+.2f}{ci(lc['slope_ci'], '{:+.2f}')}")


def wtl_stats(outcomes: list[str], diffs: list[float], boots: int = 1000, seed: int = 0,
              length_controlled: bool = True, unjudged: int = 0) -> dict:
    """Counts, rates (%) of the judged and of all items (`*_pct_all`, unjudged included), win rate
    (win + tie/2, %), the length-controlled result (`length_control`), bootstrap 95% CIs."""
    n = len(outcomes)
    counts = {k: outcomes.count(k) for k in ("win", "tie", "loss")}
    out = {"n": n, **counts, "unjudged": unjudged, "items": n + unjudged}
    for name, k in (*counts.items(), ("unjudged", unjudged)):  # an unjudged pair is never a win
        out[f"{name}_pct_all"] = 100 * k / (n + unjudged) if n + unjudged else None
    if n == 0:
        return out
    y = np.array([OUTCOME_SCORE[o] for o in outcomes])
    d = np.array(diffs, dtype=float)
    codes = np.array([("win", "tie", "loss").index(o) for o in outcomes])
    for name in ("win", "tie", "loss"):
        out[f"{name}_pct"] = 100 * counts[name] / n
    out["winrate"] = 100 * float(y.mean())
    idx = np.random.default_rng(seed).integers(0, n, (boots, n)) if boots else None  # resampled questions, (B, n)
    if length_controlled:
        out["length_control"] = length_control(y, d, idx)
    if boots:
        samples = {f"{name}_pct": 100 * (codes[idx] == k).mean(1) for k, name in enumerate(("win", "tie", "loss"))}
        samples["winrate"] = 100 * y[idx].mean(1)
        for k, v in samples.items():
            out[f"{k}_ci"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    return out


def paired_diff(a: list[float], b: list[float], boots: int = 1000, seed: int = 0) -> dict:
    """Mean of a - b over the same items, its bootstrap 95% interval over items, and how many items
    went up or down: a score (e.g. a reward model's) of two systems' answers to the same questions."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    out = {"n": len(d), "mean_a": float(np.mean(a)) if len(d) else None, "mean_b": float(np.mean(b)) if len(d) else None,
           "diff": float(d.mean()) if len(d) else None, "diff_ci": None,
           "higher": int((d > 0).sum()), "lower": int((d < 0).sum())}
    if len(d) > 1 and boots:
        means = d[np.random.default_rng(seed).integers(0, len(d), (boots, len(d)))].mean(1)
        out["diff_ci"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def length(text: str | None) -> int:
    """Characters without whitespace: the unit of the length-controlled fit."""
    return len("".join((text or "").split()))


LENGTH_SHIFT = 1.25  # mean lengths further apart than this ratio are flagged in the reports


def length_shift(len_a: list[float], len_b: list[float], names=("A", "B")) -> dict:
    """Mean lengths of the two candidates over the same items, and a warning in plain words when one
    writes more than LENGTH_SHIFT times as much as the other: a win rate between answers of very
    different lengths says as much about the judge's taste in length as about quality (and PPO
    that learnt to shrink or pad its answers wins or loses on that alone)."""
    if not len_a:
        return {"mean_a": None, "mean_b": None, "ratio": None, "warning": None}
    mean_a, mean_b = float(np.mean(len_a)), float(np.mean(len_b))
    shorter, longer = min(mean_a, mean_b), max(mean_a, mean_b)
    out = {"mean_a": mean_a, "mean_b": mean_b, "ratio": mean_a / mean_b if mean_b else None, "warning": None}
    if longer > LENGTH_SHIFT * shorter:
        a_short = mean_a < mean_b
        short, long_ = (names[0], names[1]) if a_short else (names[1], names[0])
        n_short = sum((a < b) if a_short else (b < a) for a, b in zip(len_a, len_b))
        out["warning"] = (f"length shift: {short}'s answers are {100 * (1 - shorter / longer):.0f}% shorter than "
                          f"{long_}'s (mean {shorter:.0f} vs {longer:.0f} characters; "
                          f"shorter in {n_short} of {len(len_a)} items), so the win rate may reflect the judge's "
                          "taste in length rather than the quality of the answers")
    return out


def tables(items: list[dict], outcomes: list, boots: int, seed: int, names=("A", "B")) -> dict:
    """Overall and per-group statistics from (outcome, why-unjudged) per item, and the length shift
    between the candidates (`names` in its warning)."""
    def stats(sel, length_controlled):
        judged = [(it, o) for it, (o, _) in sel if o is not None]
        return wtl_stats([o for _, o in judged], [it["len_a"] - it["len_b"] for it, _ in judged], boots, seed,
                         length_controlled, unjudged=len(sel) - len(judged))

    pairs = list(zip(items, outcomes))
    groups = dict.fromkeys(it["group"] for it in items)  # in order of first appearance
    # per group: counts and CIs only, a length fit on ten questions would be noise
    # lengths where both answered: a missing answer (an endpoint's refusal, a consultation broken off) is not short
    both = [it for it in items if it.get("answer_a") is not None and it.get("answer_b") is not None]
    return {"overall": stats(pairs, True),
            "length_shift": length_shift([it["len_a"] for it in both], [it["len_b"] for it in both], names),
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
