"""Character-level reference metrics (nanohuatuo/textmetrics.py): hand-computed examples, and the
same numbers as nltk (BLEU, GLEU) and rouge-score (ROUGE) on space-joined characters."""

import random

import pytest

from nanohuatuo.textmetrics import (bleu_gleu, chars, distinct, lcs_length, rouge, score_corpus, score_one,
                                    similarity_score)


def test_characters_rule():
    assert chars("Ｂ超 正常。\n") == "b超正常。"          # NFKC, lower-case, whitespace dropped
    assert chars("Ｂ超 正常。", keep_punct=False) == "b超正常"
    assert chars("HbA1c 7.2%") == "hba1c7.2%"             # letters and digits are one token each
    assert chars("") == "" and chars(None) == ""


def test_chinese_by_hand():
    s = score_corpus(["头痛发热"], ["头痛咳嗽"])
    # unigrams 头 痛 match (2/4); bigrams 头痛 (1/3); no trigram; equal lengths, so no brevity penalty
    assert s["bleu-1"] == pytest.approx(50.0)
    assert s["bleu-2"] == pytest.approx(100 * (0.5 * 1 / 3) ** 0.5)
    assert s["bleu-3"] == 0.0 and s["bleu-4"] == 0.0       # corpus level, no smoothing
    assert s["gleu"] == pytest.approx(30.0)                # (2 + 1) matches / max(10, 10) 1..4-grams
    assert s["rouge-1"] == pytest.approx(50.0)
    assert s["rouge-2"] == pytest.approx(100 / 3)
    assert s["rouge-l"] == pytest.approx(50.0)             # LCS 头痛
    assert s["distinct-1"] == 1.0 and s["distinct-2"] == 1.0


def test_identical_empty_and_single_character():
    same = score_corpus(["多喝水多休息"], ["多喝水多休息"])
    assert all(same[k] == pytest.approx(100.0) for k in ("bleu-1", "bleu-2", "bleu-3", "bleu-4", "gleu",
                                                          "rouge-1", "rouge-2", "rouge-l"))
    assert same["distinct-1"] == pytest.approx(5 / 6) and same["distinct-2"] == 1.0  # 多 twice

    empty = score_corpus([""], ["头痛"])
    assert all(v == 0.0 for v in empty.values())
    assert all(v == 0.0 for v in score_corpus([], []).values())

    one = score_corpus(["痛"], ["头痛"])
    assert one["bleu-1"] == pytest.approx(100 * 2.718281828459045 ** (1 - 2))  # p1 = 1, brevity exp(1 - 2/1)
    assert one["bleu-2"] == 0.0                       # no bigram: nltk counts max(1, 0) = 1 in the denominator
    assert one["gleu"] == pytest.approx(100 / 3)      # 1 match / max(1, 3)
    assert one["rouge-1"] == pytest.approx(200 / 3) and one["rouge-l"] == pytest.approx(200 / 3)
    assert one["rouge-2"] == 0.0
    assert one["distinct-1"] == 1.0 and one["distinct-2"] == 0.0  # no bigram scores 0


def test_corpus_sums_before_dividing_and_sentence_level_averages():
    hyps, refs = ["头痛", "发热咳嗽"], ["头痛", "咳嗽"]
    corpus = score_corpus(hyps, refs)
    # unigrams: 2/2 + 2/4 -> 4/6; hypothesis length 6 > reference 4: no brevity penalty
    assert corpus["bleu-1"] == pytest.approx(100 * 4 / 6)
    sentence = score_corpus(hyps, refs, level="sentence")
    assert sentence["bleu-1"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert score_one("头痛", "头痛")["bleu-1"] == pytest.approx(100.0)


def test_lcs_bit_parallel_matches_dynamic_programming():
    rng = random.Random(0)

    def dp(a, b):
        row = [0] * (len(b) + 1)
        for x in a:
            prev = 0
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
        return row[-1]

    for _ in range(300):
        a = "".join(rng.choice("头痛发热咳") for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice("头痛发热咳") for _ in range(rng.randint(0, 30)))
        assert lcs_length(a, b) == dp(a, b)
    assert lcs_length("a" * 2000, "a" * 1500) == 1500  # long answers stay fast


def random_pairs(seed, n):
    rng = random.Random(seed)
    alphabet = "头痛发热咳嗽建议多喝水可能是感冒。，AB12"
    text = lambda lo: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, 40)))
    return [text(0) for _ in range(n)], [text(1) for _ in range(n)]


@pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")  # nltk, unsmoothed BLEU
def test_bleu_gleu_match_nltk():
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    gleu = pytest.importorskip("nltk.translate.gleu_score")
    for seed in range(40):
        hyps, refs = random_pairs(seed, 1 + seed % 6)
        same_as_nltk(bleu, gleu, hyps, [chars(r) for r in refs], [[list(chars(r))] for r in refs])


def same_as_nltk(bleu, gleu, hyps, tokens, R):
    """Corpus and sentence BLEU-1..4 and GLEU of ours against nltk's, references R in nltk's shape."""
    H = [list(chars(h)) for h in hyps]
    ours = bleu_gleu([chars(h) for h in hyps], tokens)
    sent = bleu_gleu([chars(h) for h in hyps], tokens, level="sentence")
    smooth = bleu.SmoothingFunction().method1
    for n in range(1, 5):
        w = (1 / n,) * n
        assert ours[f"bleu-{n}"] == pytest.approx(bleu.corpus_bleu(R, H, weights=w), abs=1e-12)
        expected = sum(bleu.sentence_bleu(r, h, weights=w, smoothing_function=smooth) for r, h in zip(R, H)) / len(H)
        assert sent[f"bleu-{n}"] == pytest.approx(expected, abs=1e-12)
    assert ours["gleu"] == pytest.approx(gleu.corpus_gleu(R, H), abs=1e-12)
    expected = sum(gleu.sentence_gleu(r, h) for r, h in zip(R, H)) / len(H)
    assert sent["gleu"] == pytest.approx(expected, abs=1e-12)


def test_rouge_matches_rouge_score_on_space_joined_characters():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    class Spaces:  # rouge-score's default tokenizer keeps only [a-z0-9] and would drop every Chinese character
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Spaces())
    for seed in range(40):
        hyps, refs = random_pairs(100 + seed, 5)
        for h, r in zip(hyps, refs):
            h, r = chars(h), chars(r)
            ref = scorer.score(" ".join(r), " ".join(h))
            ours = rouge(h, r)
            for k, name in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")):
                assert ours[k] == pytest.approx(ref[name].fmeasure, abs=1e-12)


def test_several_references_by_hand():
    # two doctors answered: the answer repeats the first one exactly
    s = score_corpus(["多喝水"], [["多喝水", "注意休息，多喝水"]])
    assert all(s[k] == pytest.approx(100.0) for k in ("bleu-1", "bleu-3", "gleu", "rouge-1", "rouge-2", "rouge-l"))
    # one string joined from both would set the brevity penalty by 11 characters and halve ROUGE recall
    joined = score_corpus(["多喝水"], ["多喝水\n\n注意休息，多喝水"])
    assert joined["bleu-1"] == pytest.approx(100 * 2.718281828459045 ** (1 - 11 / 3))
    assert joined["rouge-l"] == pytest.approx(100 * 2 * 3 / (3 + 11))
    # counts clipped by the reference holding an n-gram most often; the closest reference length (2) is shorter
    clipped = score_corpus(["哈哈哈"], [["哈", "哈哈"]])
    assert clipped["bleu-1"] == pytest.approx(100 * 2 / 3)
    assert clipped["bleu-2"] == pytest.approx(100 * (2 / 3 * 1 / 2) ** 0.5)
    assert score_one("头痛", ["头痛"]) == score_one("头痛", "头痛")  # a one-item list is the string
    with pytest.raises(ValueError, match="empty list of references"):
        score_corpus(["头痛"], [[]])


def random_multi(seed, n):
    """n answers, each with one to three references."""
    rng = random.Random(seed)
    hyps, _ = random_pairs(seed, n)
    refs = [random_pairs(seed * 10 + i, rng.randint(1, 3))[1] for i in range(n)]
    return hyps, refs


@pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")
def test_several_references_bleu_gleu_match_nltk():
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    gleu = pytest.importorskip("nltk.translate.gleu_score")
    for seed in range(40):
        hyps, refs = random_multi(seed, 1 + seed % 6)
        same_as_nltk(bleu, gleu, hyps, [[chars(r) for r in rs] for rs in refs],
                     [[list(chars(r)) for r in rs] for rs in refs])


def test_several_references_rouge_matches_rouge_score_multi():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    class Spaces:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Spaces())
    for seed in range(40):
        hyps, refs = random_multi(200 + seed, 5)
        for h, rs in zip(hyps, refs):
            h, rs = chars(h), [chars(r) for r in rs]
            ref = scorer.score_multi([" ".join(r) for r in rs], " ".join(h))
            ours = rouge(h, rs)
            for k, name in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")):
                assert ours[k] == pytest.approx(ref[name].fmeasure, abs=1e-12)


def test_distinct_per_answer():
    assert distinct("哈哈哈哈", 1) == 0.25 and distinct("哈哈哈哈", 2) == pytest.approx(1 / 3)
    assert score_corpus(["哈哈哈哈", "头痛"], ["x", "y"])["distinct-1"] == pytest.approx((0.25 + 1) / 2)


def test_similarity_score_is_the_rlaif_offline_judges_score():
    from nanohuatuo.feedback import OfflineRanker
    hyps, refs = random_pairs(7, 30)
    items = [{"id": str(i), "question": "问", "reference": r, "answers": [hyps[i], hyps[i - 1], hyps[i - 2]]}
             for i, r in enumerate(refs) if len({hyps[i], hyps[i - 1], hyps[i - 2]}) == 3]
    results = OfflineRanker().rank(items)
    assert len(items) > 20 and all(r["ranking"] is not None for r in results)
    for item, result in zip(items, results):
        scores = [similarity_score(a, item["reference"]) for a in item["answers"]]
        assert result["ranking"] == sorted(range(3), key=lambda i: (-round(scores[i], 12), i))
