"""winrate.py: the length-controlled win rate against verdicts simulated from a known logistic model
(candidate effect θ, length slope β), the refusals when the lengths cannot support it, ties counted
half, and the rates out of all items with the unjudged ones included."""

import numpy as np
import pytest

from nanohuatuo.winrate import (MIN_LC_ITEMS, MIN_MINORITY_SHARE, fit_length_controlled, lc_text, length_control,
                                length_shift, tables, wtl_stats)


def simulate(n, theta, beta, shift, seed, spread=100.0):
    """Outcomes (1 / 0) from p = σ(θ + β·tanh(d / spread)), d = len_a - len_b ~ N(shift, spread)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(shift, spread, n)
    p = 1 / (1 + np.exp(-(theta + beta * np.tanh(d / spread))))
    return (rng.random(n) < p).astype(float), d


def outcomes(y):
    return ["win" if v == 1 else "tie" if v == 0.5 else "loss" for v in y]


def test_recovers_the_known_win_rate_at_equal_length_and_the_slope():
    theta, beta = 0.4, 2.0  # truth: 59.9% at equal length; A is longer in ~73% of pairs and the judge likes length
    y, d = simulate(600, theta, beta, shift=60, seed=0)
    s = wtl_stats(outcomes(y), list(d), boots=400, seed=0)
    lc, truth = s["length_control"], 100 / (1 + np.exp(-theta))
    assert s["winrate"] - truth > 10  # the raw rate is inflated by length...
    assert lc["winrate"] == pytest.approx(truth, abs=5)  # ...the length-controlled one is not
    assert lc["winrate_ci"][0] <= truth <= lc["winrate_ci"][1]
    assert lc["slope"] == pytest.approx(beta, abs=0.6) and lc["slope_ci"][0] <= beta <= lc["slope_ci"][1]
    assert lc["reason"] is None and lc["a_longer"] + lc["b_longer"] + lc["equal"] == 600


def test_bootstrap_interval_covers_the_truth_at_about_its_level():
    theta, beta, covered = -0.3, 1.5, 0
    truth = 100 / (1 + np.exp(-theta))
    for seed in range(40):
        y, d = simulate(200, theta, beta, shift=30, seed=seed)
        lo, hi = length_control(y, d, np.random.default_rng(seed).integers(0, 200, (200, 200)))["winrate_ci"]
        covered += lo <= truth <= hi
    assert covered >= 34  # 95% nominal: 38 of 40 expected, 34 is far in the tail of Binomial(40, 0.95)


def test_no_length_effect_gives_the_raw_win_rate():
    y, d = simulate(800, 0.85, 0.0, shift=0, seed=1)
    s = wtl_stats(outcomes(y), list(d), boots=300, seed=1)
    lc = s["length_control"]
    assert lc["winrate"] == pytest.approx(s["winrate"], abs=2)
    assert lc["slope_ci"][0] <= 0 <= lc["slope_ci"][1]


def test_one_sided_lengths_are_not_identifiable():
    # the demo's case: the PPO answers shrank, so A is the shorter in every pair; a judge that likes short answers
    # gives 49 / 0 / 1, and "at equal length" would be read far outside the data
    rng = np.random.default_rng(2)
    d = -rng.uniform(20, 200, 50)
    y = np.ones(50)
    y[7] = 0
    s = wtl_stats(outcomes(y), list(d), boots=200)
    lc = s["length_control"]
    assert lc["winrate"] is None and lc["winrate_ci"] is None and lc["slope"] is None and lc["slope_ci"] is None
    assert "B's answer is the longer in 50 of 50" in lc["reason"] and "extrapolation" in lc["reason"]
    assert lc_text(lc) == f"not identifiable ({lc['reason']})"
    assert s["winrate"] == 98.0  # the raw rate is still reported


def test_minority_share_threshold():
    n = 100
    k = int(MIN_MINORITY_SHARE * n)  # pairs where B is the longer
    y, _ = simulate(n, 0.5, 1.0, 0, seed=3)
    d = np.r_[np.full(n - k, 50.0), np.full(k, -50.0)]
    assert length_control(y, d)["winrate"] is not None  # exactly the threshold: fitted
    d[n - k] = 50.0  # one fewer on the minority side
    assert length_control(y, d)["winrate"] is None
    d[n - k] = 0.0  # equal lengths sit at the point of interest: they count on both sides
    assert length_control(y, d)["winrate"] is not None


def test_too_few_items_are_not_identifiable():
    y, d = simulate(MIN_LC_ITEMS, 0.5, 1.0, 0, seed=4)
    assert length_control(y[:-1], d[:-1])["reason"] == (f"{MIN_LC_ITEMS - 1} judged pairs, fewer than {MIN_LC_ITEMS}: "
                                                       "too few to fit a length slope")
    assert length_control(y, d)["winrate"] is not None
    lc = length_control(np.ones(30), np.zeros(30))
    assert lc["winrate"] is None and "same length in every judged pair" in lc["reason"]


def test_ties_count_half_and_newton_matches_a_general_optimiser():
    y, d = simulate(300, 0.3, 1.0, 0, seed=5)
    assert length_control(np.full(300, 0.5), d)["winrate"] == pytest.approx(50.0, abs=1e-6)
    soft = np.where(np.random.default_rng(5).random(300) < 0.2, 0.5, y)
    x = np.tanh(d / d.std(ddof=1))  # AlpacaEval's standardisation: not centred, sample standard deviation
    opt = pytest.importorskip("scipy.optimize")

    def loss(w):
        z = w[0] + w[1] * x
        return np.sum(np.logaddexp(0, z) - soft * z) + 0.5e-2 * (w @ w)

    w = opt.minimize(loss, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    lc, slope = fit_length_controlled(soft, d)
    assert lc[0] == pytest.approx(1 / (1 + np.exp(-w[0])), abs=1e-6) and slope[0] == pytest.approx(w[1], abs=1e-4)


def test_rates_of_all_items_include_the_unjudged():
    items = [{"group": "g1" if i < 6 else "g2", "len_a": 10, "len_b": 10} for i in range(10)]
    verdicts = [("win", None)] * 5 + [(None, "no verdict")] + [("tie", None)] * 2 + [("loss", None)] + [(None, "x")]
    t = tables(items, verdicts, boots=100, seed=0)
    o = t["overall"]
    assert (o["n"], o["unjudged"], o["items"]) == (8, 2, 10)
    assert o["win_pct"] == 62.5 and o["tie_pct"] == 25.0 and o["loss_pct"] == 12.5  # of the judged
    assert (o["win_pct_all"], o["tie_pct_all"], o["loss_pct_all"], o["unjudged_pct_all"]) == (50.0, 20.0, 10.0, 20.0)
    assert o["winrate"] == 75.0 and o["winrate_ci"][0] <= 75.0 <= o["winrate_ci"][1]
    assert "not identifiable (8 judged pairs" in lc_text(o["length_control"])
    g2 = t["groups"]["g2"]
    assert (g2["win_pct_all"], g2["unjudged_pct_all"]) == (0.0, 25.0) and "length_control" not in g2
    empty = wtl_stats([], [], unjudged=3)
    assert empty["unjudged_pct_all"] == 100.0 and empty["win_pct_all"] == 0.0 and "winrate" not in empty


def test_length_shift_is_flagged_in_words_beyond_the_ratio():
    even = length_shift([50, 52, 48], [51, 49, 50], ("PPO", "SFT"))
    assert even["warning"] is None and even["mean_a"] == 50 and even["mean_b"] == 50
    # PPO's answers shrank from ~51 to ~18 characters: flagged, whichever side is shorter
    short = length_shift([18, 20, 16, 60], [51, 50, 52, 51], ("PPO", "SFT"))
    assert short["warning"].startswith("length shift: PPO's answers are 44% shorter than SFT's (mean 28 vs 51 "
                                       "characters; shorter in 3 of 4 items)")
    long_ = length_shift([51, 50], [18, 20], ("PPO", "SFT"))
    assert long_["warning"].startswith("length shift: SFT's answers are 62% shorter than PPO's")
    assert length_shift([125], [100])["warning"] is None and length_shift([126], [100])["warning"]  # the edge
    assert length_shift([], [])["warning"] is None


def test_paired_diff_counts_and_interval():
    from nanohuatuo.winrate import paired_diff
    r = paired_diff([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 1.0, 1.0], boots=200, seed=0)
    assert r["n"] == 4 and r["higher"] == 2 and r["lower"] == 1
    assert abs(r["diff"] - (1 + 0 + 2 - 0.5) / 4) < 1e-12 and abs(r["mean_a"] - 1.625) < 1e-12
    lo, hi = r["diff_ci"]
    assert -0.5 <= lo <= r["diff"] <= hi <= 2.0  # a bootstrap mean lies between the smallest and largest diff
    assert paired_diff([1.0], [0.0])["diff_ci"] is None  # one item: no interval


def test_a_missing_answer_is_not_a_short_one():
    """The length shift compares items both candidates answered: an endpoint's refusal or a consultation
    broken off has no length, and counting it as 0 characters flagged B as "34% shorter"."""
    items = [{"group": "g", "answer_a": "a" * 15, "answer_b": "b" * 16, "len_a": 15, "len_b": 16} for _ in range(7)]
    items += [{"group": "g", "answer_a": "a" * 15, "answer_b": None, "len_a": 15, "len_b": 0} for _ in range(3)]
    shift = tables(items, [("tie", None)] * 7 + [(None, "no answer")] * 3, boots=10, seed=0)["length_shift"]
    assert (shift["mean_a"], shift["mean_b"], shift["warning"]) == (15.0, 16.0, None)
