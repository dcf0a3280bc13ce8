"""Reference-based text metrics at character level, as HuatuoGPT's QA tables report them.

    scores = score_corpus(answers, references)   # {"bleu-1": 27.4, ..., "distinct-2": 0.93}

What counts as a character (`chars`): the text is NFKC-normalised (full-width letters, digits and
punctuation become their ASCII forms), Latin letters are lower-cased, and whitespace is dropped;
every other code point is one token: a CJK character, a letter, a digit and a punctuation mark
alike (`keep_punct=False` drops punctuation and symbols, Unicode categories P* and S*).
So "Ｂ超 正常。" is the four tokens b, 超, 正, 常, 。 minus nothing: ['b', '超', '正', '常', '。'].

An answer may have several references (Huatuo-26M and cMedQA2 questions answered by several
doctors): each answer's reference is a string or a list of strings, and every metric uses all of
them as nltk and rouge-score do with several references, never one string joined from them (that
would set the brevity penalty by the joined length and halve ROUGE recall).

The variants, chosen to match what `nltk` and `rouge-score` compute on space-joined characters
(the tests check both):
- BLEU-n (n = 1..4): cumulative BLEU with uniform weights 1/n over the 1..n-gram precisions and the
  brevity penalty. An n-gram's matches are clipped by its largest count in any one reference,
  and the brevity penalty takes for each answer the reference length closest to the answer's
  (the shorter on a tie). Corpus level (default, `nltk.translate.bleu_score.corpus_bleu`): clipped
  n-gram matches and hypothesis n-gram counts are summed over all answers before dividing, each
  answer adding max(1, its n-gram count) to the denominator as nltk does; no smoothing, so a
  corpus without a single matching n-gram of some order scores 0. Sentence level
  (`level="sentence"`): `sentence_bleu` with nltk's smoothing method 1 (epsilon 0.1 for a zero
  count), averaged over answers.
- GLEU: Google-BLEU over 1..4-grams (`nltk` corpus_gleu): matches / max(answer n-grams, reference
  n-grams) of the reference giving the answer its best GLEU, summed over the corpus (sentence
  level: averaged per answer).
- ROUGE-1/2/L: F1 (beta 1) per answer, the best over its references for each of the three
  (`rouge-score`'s score_multi), averaged over answers (rouge1, rouge2, rougeL on the same
  tokens). ROUGE-L is the sentence-level LCS, not rougeLsum.
- Distinct-1/2: distinct n-grams / n-grams of each answer, averaged over answers (per-answer
  distinct is what gives the ~0.7-0.9 values of the published table; corpus-level distinct over
  thousands of answers would be far lower). An answer with no n-gram of that order scores 0.
BLEU, GLEU and ROUGE are reported x100 and Distinct as a fraction, as in the published table.

Also here: `lcs_length` (bit-parallel, fast on long answers); `rouge_l` of two texts without
punctuation and `RougeIndex`, which finds among thousands of kept texts the one nearest a new text
(distillation's near-duplicate filter) with an LCS only for the few whose bound can reach the
threshold; and `similarity_score`, the deterministic answer-vs-reference score the offline judges
use.
"""

from __future__ import annotations

import math
import unicodedata
from array import array
from collections import Counter

import numpy as np

METRICS = ("bleu-1", "bleu-2", "bleu-3", "bleu-4", "gleu", "rouge-1", "rouge-2", "rouge-l",
           "distinct-1", "distinct-2")


# ---------------------------------------------------------------- characters

def chars(text: str, keep_punct: bool = True) -> str:
    """The tokens of `text` as one string, one character per token (rule in the module doc)."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    if keep_punct:
        return "".join(text.split())
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c)[0] not in "PS")


def ngrams(tokens: str, n: int) -> Counter:
    """Counts of the n-grams of a token string (each n-gram is an n-character slice)."""
    return Counter(tokens[i:i + n] for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------- BLEU and GLEU

def _bleu(matches: list[float], totals: list[float], hyp_len: int, ref_len: int, n: int) -> float:
    """Cumulative BLEU-n from summed clipped matches and totals per order (index 0 = unigrams)."""
    if matches[0] == 0:
        return 0.0
    if hyp_len > ref_len:
        bp = 1.0
    else:
        bp = math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0
    if any(m == 0 for m in matches[:n]):
        return 0.0  # no smoothing: one empty order makes the geometric mean zero
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(matches[:n], totals[:n])) / n)


def reference_lists(references: list) -> list[list]:
    """Each answer's references as a list: a string is one reference, a list is kept as it is."""
    out = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, refs in enumerate(out):
        if not refs:
            raise ValueError(f"answer {i} has an empty list of references; give it at least one")
    return out


def _counts(hyp: str, refs: list[str], max_n: int = 4):
    """Per order 1..max_n: clipped matches (an n-gram counts at most as often as in the reference
    holding it most) and max(1, hypothesis n-grams); then GLEU's matches and total for the reference
    giving the best GLEU (the first on a tie, as nltk)."""
    hyp_grams = [ngrams(hyp, n) for n in range(1, max_n + 1)]
    ref_grams = [[ngrams(ref, n) for n in range(1, max_n + 1)] for ref in refs]
    matches, totals = [], []
    for n, h in enumerate(hyp_grams):
        most = Counter()
        for grams in ref_grams:
            most |= grams[n]  # | keeps the larger count of each n-gram
        matches.append(sum((h & most).values()))
        totals.append(max(1, sum(h.values())))  # nltk's max(1, .): an answer shorter than n adds 1
    n_hyp = sum(sum(h.values()) for h in hyp_grams)
    gleu_match, gleu_all = 0, 0
    for grams in ref_grams:
        match = sum(sum((h & r).values()) for h, r in zip(hyp_grams, grams))
        n_all = max(n_hyp, sum(sum(r.values()) for r in grams))
        if n_all and (not gleu_all or match * gleu_all > gleu_match * n_all):
            gleu_match, gleu_all = match, n_all
    return matches, totals, gleu_match, gleu_all


def closest_length(refs: list[str], hyp_len: int) -> int:
    """The reference length nearest the answer's, the shorter on a tie (nltk's closest_ref_length)."""
    return min((len(r) for r in refs), key=lambda n: (abs(n - hyp_len), n))


def bleu_gleu(hyps: list[str], refs: list, level: str = "corpus") -> dict:
    """BLEU-1..4 and GLEU (fractions in [0, 1]) of token strings against their references (a token
    string or a list of them per answer)."""
    if level not in ("corpus", "sentence"):
        raise ValueError(f"BLEU level {level!r}: use 'corpus' or 'sentence'")
    out = {f"bleu-{n}": 0.0 for n in range(1, 5)} | {"gleu": 0.0}
    if not hyps:
        return out
    matches, totals, g_match, g_all, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0, 0, 0
    for hyp, ref in zip(hyps, reference_lists(refs)):
        m, t, gm, ga = _counts(hyp, ref)
        closest = closest_length(ref, len(hyp))
        if level == "sentence":
            # nltk's smoothing method 1: a zero count becomes epsilon = 0.1 (unigrams excepted)
            smoothed = [x if x or i == 0 else 0.1 for i, x in enumerate(m)]
            for n in range(1, 5):
                out[f"bleu-{n}"] += _bleu(smoothed, t, len(hyp), closest, n) / len(hyps)
            out["gleu"] += (gm / ga if ga else 0.0) / len(hyps)
            continue
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
        g_match, g_all = g_match + gm, g_all + ga
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + closest
    if level == "corpus":
        for n in range(1, 5):
            out[f"bleu-{n}"] = _bleu(matches, totals, hyp_len, ref_len, n)
        out["gleu"] = g_match / g_all if g_all else 0.0
    return out


# ---------------------------------------------------------------- ROUGE

def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings.

    Bit-parallel (Allison & Dix 1986, Hyyrö 2004): bit i of v is 1 while a[i] is not yet matched;
    each character of b updates all of a at once with one add and a few bit operations on a
    Python integer, so a 1,000 x 1,000 pair costs 1,000 big-integer steps instead of 10^6 cells.
    """
    if not a or not b:
        return 0
    where = {}
    for i, c in enumerate(a):
        where[c] = where.get(c, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for c in b:
        u = v & where.get(c, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def _f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    if not overlap:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge(hyp: str, ref: str | list[str]) -> dict:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 (fractions) of one token string against its reference, or
    against several: each of the three is its best over them (rouge-score's score_multi)."""
    out = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for ref in reference_lists([ref])[0]:
        for n in (1, 2):
            h, r = ngrams(hyp, n), ngrams(ref, n)
            out[f"rouge-{n}"] = max(out[f"rouge-{n}"], _f1(sum((h & r).values()), sum(h.values()), sum(r.values())))
        out["rouge-l"] = max(out["rouge-l"], _f1(lcs_length(hyp, ref), len(hyp), len(ref)))
    return out


# ---------------------------------------------------------------- near-duplicates: indexed ROUGE-L

def rouge_text(text: str) -> str:
    """The characters rouge_l compares: chars without punctuation (NFKC-normalised, lower case, no
    whitespace, punctuation or symbols), so ？ and ? or a trailing 。 change nothing and a character
    means here what it means in the evaluation's ROUGE-L."""
    return chars(text, keep_punct=False)


def rouge_l(a: str, b: str) -> float:
    """Character-level ROUGE-L F1 of two texts: 2 * LCS / (len(a) + len(b)) over rouge_text
    (the bit-parallel lcs_length)."""
    a, b = rouge_text(a), rouge_text(b)
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class RougeIndex:
    """Kept texts, and for a new one the kept text of highest ROUGE-L with it if that exceeds the
    threshold: exactly what comparing with every kept text gives, without an LCS for each.
    Above, not at: Self-Instruct (bootstrap_instructions.py) drops an instruction when its highest
    ROUGE-L is > 0.7, so one at exactly 0.7 is kept, and so it is here.

    Why it is exact: ROUGE-L F1 = 2L/(m+n) and the LCS L is at most the multiset overlap U of the
    two texts' characters, so 2U/(m+n) bounds the score from above. Each text is a set of tokens
    (character, occurrence number: 的 twice gives (的,1), (的,2)), so U is the number of shared
    tokens. An inverted index maps each token to the kept texts holding it (C int arrays); one
    bincount over the new text's posting lists gives U against every kept text at once, in C, and
    only texts whose bound exceeds the threshold get the exact (bit-parallel) LCS. With thousands of
    kept texts a query costs the length of its posting lists, not one LCS per kept text.
    """

    def __init__(self, threshold: float = 0.7):
        if not 0 <= threshold < 1:
            raise ValueError(f"ROUGE-L threshold must be in [0, 1) (a score above it matches), got {threshold}")
        self.threshold = threshold
        self.texts: list[str] = []  # as rouge_text gives them
        self.lengths = array("i")
        self.postings: dict[tuple, array] = {}  # token -> indices of the kept texts holding it
        self.checked = 0  # kept texts whose bound exceeded the threshold: exact LCS computed

    def __len__(self) -> int:
        return len(self.texts)

    @staticmethod
    def _tokens(norm: str) -> list[tuple]:
        return [(c, k) for c, count in Counter(norm).items() for k in range(1, count + 1)]

    def match(self, text: str) -> tuple[int, float] | None:
        """(index, score) of the kept text with the highest ROUGE-L > threshold (lowest index
        among ties), or None when every kept text scores at most the threshold."""
        norm = rouge_text(text)
        m = len(norm)
        postings = self.postings
        hits = b"".join([postings[tok] for tok in self._tokens(norm) if tok in postings])  # one copy, in C
        if not hits:
            return None
        overlap = np.bincount(np.frombuffer(hits, dtype=np.intc), minlength=len(self.texts))  # U per kept text
        lengths = np.frombuffer(self.lengths, dtype=np.intc)
        # the bound in float64 as the score is computed below, and >= it, so no text scoring > t is skipped
        candidates = np.flatnonzero(2 * overlap / (lengths + m) > self.threshold)
        self.checked += len(candidates)
        best = None
        for j in candidates.tolist():
            score = 2 * lcs_length(norm, self.texts[j]) / (m + len(self.texts[j]))
            if score > self.threshold and (best is None or score > best[1]):
                best = (j, score)
        return best

    def add(self, text: str) -> int:
        """Keep a text; returns its index. A text without letters or digits matches nothing."""
        norm = rouge_text(text)
        i = len(self.texts)
        self.texts.append(norm)
        self.lengths.append(len(norm))
        for tok in self._tokens(norm):
            self.postings.setdefault(tok, array("i")).append(i)
        return i


# ---------------------------------------------------------------- Distinct

def distinct(tokens: str, n: int) -> float:
    """Distinct n-grams / n-grams of one answer; 0 when it has no n-gram of that order."""
    grams = ngrams(tokens, n)
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


# ---------------------------------------------------------------- the table

def score_corpus(answers: list[str], references: list, level: str = "corpus",
                 keep_punct: bool = True) -> dict:
    """Every metric of METRICS for answers against references (per answer a string, or a list of
    strings when it has several references).

    BLEU/GLEU/ROUGE x100, Distinct as a fraction; an empty list scores all zeros.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references; pass one reference "
                         "(or one list of references) per answer")
    hyps = [chars(a, keep_punct) for a in answers]
    refs = [[chars(r, keep_punct) for r in rs] for rs in reference_lists(references)]
    out = {k: 100 * v for k, v in bleu_gleu(hyps, refs, level).items()}
    sums = Counter()
    for h, r in zip(hyps, refs):
        sums.update(rouge(h, r))
        sums["distinct-1"] += distinct(h, 1)
        sums["distinct-2"] += distinct(h, 2)
    n = max(len(hyps), 1)
    for k in ("rouge-1", "rouge-2", "rouge-l"):
        out[k] = 100 * sums[k] / n
    for k in ("distinct-1", "distinct-2"):
        out[k] = sums[k] / n
    return {k: out[k] for k in METRICS}


def score_one(answer: str, reference: str | list[str], keep_punct: bool = True) -> dict:
    """Per-answer scores (sentence-level BLEU with smoothing, ROUGE, Distinct), for sample tables."""
    return score_corpus([answer], [reference], level="sentence", keep_punct=keep_punct)


# ---------------------------------------------------------------- offline judging

REPETITION_WEIGHT = 0.5  # 1 - distinct/total bigrams is ~0.1 for normal text, ~1 for loops
LENGTH_WEIGHT = 0.1      # times |len(answer) - len(reference)| / len(reference), capped at 1


def similarity_score(answer: str, reference: str) -> float:
    """Character-bigram F1 against the reference, minus repetition and length penalties.

    score = F1 - REPETITION_WEIGHT * (1 - distinct bigrams / bigrams)
               - LENGTH_WEIGHT * min(1, |len(answer) - len(reference)| / len(reference))
    Characters are NFKC-normalised with whitespace dropped, case kept. The same formula as the
    RLAIF offline judge, so the offline evaluation prefers what offline feedback trained for.
    """
    a_chars = "".join(unicodedata.normalize("NFKC", answer or "").split())
    r_chars = "".join(unicodedata.normalize("NFKC", reference or "").split())
    a, r = ngrams(a_chars, 2), ngrams(r_chars, 2)
    a_total, r_total = sum(a.values()), sum(r.values())
    overlap = sum((a & r).values())
    f1 = 2 * overlap / (a_total + r_total) if overlap else 0.0
    repetition = 1 - len(a) / a_total if a_total else 0.0
    length_gap = min(1.0, abs(len(a_chars) - len(r_chars)) / max(len(r_chars), 1))
    return f1 - REPETITION_WEIGHT * repetition - LENGTH_WEIGHT * length_gap
