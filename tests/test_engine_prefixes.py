"""Engine(keep_prefixes=True): a finished request's keys stay in its free row, and the next request
whose prompt begins with them (its conversation's next turn) prefills only the rest; chat keeps
one such engine for a session."""

import pytest
import torch

import nanohuatuo.engine as engine_mod
from nanohuatuo.engine import PREFIX_MIN, Engine, SamplingParams
from nanohuatuo.generate import stream
from test_engine import CONFIGS, tiny

P1 = [(7 * i + 3) % 101 for i in range(20)]
EXTRA = [11, 22, 33, 44, 55, 66, 77, 88]


def prefills(monkeypatch):
    """The token count of every forward the engine's prefills run."""
    seen, real = [], engine_mod.forward
    monkeypatch.setattr(engine_mod, "forward", lambda model, ids, *a: seen.append(ids.shape[1]) or real(model, ids, *a))
    return seen


def fresh(m, prompt, n):
    return Engine(m, slots=1, max_len=128).generate([prompt], SamplingParams(max_new_tokens=n, logprobs=True))[0]


def plain_logprobs(m, prompt, tokens):
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1], -1)
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_next_turn_prefills_only_its_new_tokens(monkeypatch, kind):
    """Turn 2's prompt is turn 1's prompt and answer plus a question: only the question's tokens
    (past what the row holds) go through a prefill, and the answer is the one a fresh engine gives,
    its log-probs those of a plain forward pass (RoPE with and without a sliding window, ALiBi)."""
    m = tiny(kind)
    eng = Engine(m, slots=1, max_len=128, keep_prefixes=True)
    first = eng.generate([P1], SamplingParams(max_new_tokens=10))[0]
    p2 = P1 + first.tokens + EXTRA
    seen = prefills(monkeypatch)
    out = eng.generate([p2], SamplingParams(max_new_tokens=10, logprobs=True))[0]
    # the row held P1 and the answer but its last token (never fed): the prefill starts there
    assert seen == [len(p2) - 1 - (len(P1) + 9)] == [len(EXTRA)]
    assert out.cached_tokens == len(P1) + 9 and first.cached_tokens == 0  # what the output reports
    want = fresh(m, p2, 10)
    assert out.tokens == want.tokens
    torch.testing.assert_close(torch.tensor(out.logprobs), plain_logprobs(m, p2, out.tokens), atol=5e-5, rtol=0)
    # the same prompt again: every key but the last token's is held, no prefill at all
    seen.clear()
    assert eng.generate([p2], SamplingParams(max_new_tokens=10))[0].tokens == want.tokens and seen == []


def test_what_is_not_reused(monkeypatch):
    """Without keep_prefixes (the default), under PREFIX_MIN shared tokens, with prompt log-probs
    asked for, or after another request took the row, the prompt is prefilled whole, and the
    answers are a fresh engine's."""
    m = tiny()
    short, p2 = P1[:PREFIX_MIN - 1], P1 + EXTRA
    want_short, want = fresh(m, short + EXTRA, 6).tokens, fresh(m, p2, 6).tokens
    seen = prefills(monkeypatch)
    plain = Engine(m, slots=1, max_len=128)
    plain.generate([P1], SamplingParams(max_new_tokens=4))
    seen.clear()
    plain.generate([p2], SamplingParams(max_new_tokens=4))
    assert seen == [len(p2) - 1]

    eng = Engine(m, slots=1, max_len=128, keep_prefixes=True)
    eng.generate([short + [5]], SamplingParams(max_new_tokens=1))  # holds PREFIX_MIN - 1 tokens
    seen.clear()
    assert eng.generate([short + EXTRA], SamplingParams(max_new_tokens=6))[0].tokens == want_short
    assert seen == [len(short + EXTRA) - 1]

    eng.generate([P1], SamplingParams(max_new_tokens=4))
    seen.clear()
    out = eng.generate([p2], SamplingParams(max_new_tokens=6, prompt_logprobs=True))[0]
    assert seen == [len(p2) - 1] and out.tokens == want

    other = [(5 * i + 1) % 101 for i in range(30)]
    eng.generate([other], SamplingParams(max_new_tokens=4))  # the row now holds `other`
    seen.clear()
    assert eng.generate([p2], SamplingParams(max_new_tokens=6))[0].tokens == want
    assert seen == [len(p2) - 1]


def test_a_stopped_answer_keeps_its_keys_and_a_running_neighbour_keeps_its_row(monkeypatch):
    """An answer stopped early (its stream closed: chat's Ctrl-C or stop string) is cancelled and its
    row kept with the tokens fed so far. With two slots, a request retiring from the first row while
    the second runs: that one moves into the first row, and the retired one's keys into the second,
    for the next request, which takes that row."""
    m = tiny()
    eng = Engine(m, slots=1, max_len=128, keep_prefixes=True)
    gen = stream(m, P1, 10, engine=eng)
    got = [next(gen) for _ in range(3)]
    gen.close()
    assert eng.running and eng.running[0].rid in eng.cancelled
    p2 = P1 + got + EXTRA
    want = fresh(m, p2, 6).tokens
    seen = prefills(monkeypatch)
    assert list(stream(m, p2, 6, engine=eng)) == want
    # the row held P1 and got[:2]: got[2] and EXTRA but its last token (the first decode step's) remain
    assert seen == [len(EXTRA)] and not eng.has_work()

    two = Engine(m, slots=2, max_len=128, keep_prefixes=True)
    long_prompt = [(3 * i + 2) % 101 for i in range(25)]
    a = two.add(long_prompt, SamplingParams(max_new_tokens=12))
    b = two.add(P1, SamplingParams(max_new_tokens=5))
    outs = {}
    while b not in outs or outs[b][-1] is None or len(outs[b]) < 5:
        for ev in two.step():
            outs.setdefault(ev.rid, []).append(ev.token)
    assert len(two.running) == 1 and two.running[0].rid == a and two.held[1][0] == (P1 + outs[b])[:len(P1) + 4]
    p2 = P1 + outs[b] + EXTRA
    want, want_a = fresh(m, p2, 6).tokens, fresh(m, long_prompt, 12).tokens
    seen.clear()
    c = two.add(p2, SamplingParams(max_new_tokens=6))
    while two.has_work():
        for ev in two.step():
            outs.setdefault(ev.rid, []).append(ev.token)
    assert seen == [len(EXTRA)]
    assert outs[c] == want and outs[a] == want_a


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_conversations_continued_together_each_find_their_row(monkeypatch, kind):
    """Two conversations answered side by side in two slots, then both continued in one step: each
    next turn takes the free row holding its conversation (whichever it is after the rows moved),
    and the two are prefilled in one forward, each from where its kept keys stop (27 and 28 tokens
    in), as wide as the longer rest; the answers are a fresh engine's (RoPE, sliding window, ALiBi)."""
    m = tiny(kind)
    q1, q2 = P1, [(5 * i + 4) % 101 for i in range(24)]
    eng = Engine(m, slots=2, max_len=128, keep_prefixes=True)
    a1, a2 = eng.generate([q1, q2], [SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=4)])
    p1, p2 = q1 + a1.tokens + EXTRA, q2 + a2.tokens + EXTRA[:5]
    want = [fresh(m, p, 6).tokens for p in (p1, p2)]
    seen = prefills(monkeypatch)
    outs = eng.generate([p2, p1], SamplingParams(max_new_tokens=6))
    assert [o.tokens for o in outs] == want[::-1]
    assert seen == [8]


def test_a_batch_of_turns_padded_past_the_end_of_a_row(monkeypatch):
    """Two turns prefilled together from different starts, one of them ending at the last position of
    its cache row: its padding positions past the row's end are written at its last position (the
    row's own last token overwrites it), and both answers are a fresh engine's."""
    m = tiny()
    qa, qb = [(3 * i + 2) % 101 for i in range(40)], P1
    eng = Engine(m, slots=2, max_len=48, keep_prefixes=True)
    a1, b1 = eng.generate([qa, qb], [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=4)])
    pa, pb = qa + a1.tokens + EXTRA[:3], qb + b1.tokens + EXTRA[:5]  # 48 tokens from 44 kept; 29 from 23
    want = [fresh(m, pa, 1).tokens, fresh(m, pb, 6).tokens]
    seen = prefills(monkeypatch)
    outs = eng.generate([pa, pb], [SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=6)])
    assert seen == [5]  # 3 and 5 tokens in one forward: row a's positions 44..48, the last one kept at 47
    assert [o.tokens for o in outs] == want


def test_a_turn_finds_its_row_past_rows_that_share_only_the_system_prompt(monkeypatch):
    """Two conversations under one system prompt (more than PREFIX_MIN tokens), answered side by side;
    only the one whose keys are not in the next free row goes on. It takes its own row (moved to the
    next free one), not the row that shares the system prompt with it, and prefills its new tokens
    only; the row it passed over keeps the other conversation for that one's next turn."""
    m = tiny()
    system = [(3 * i + 1) % 101 for i in range(PREFIX_MIN + 4)]
    q1, q2 = system + [5, 6, 7], system + [8, 9, 10, 11]
    eng = Engine(m, slots=2, max_len=128, keep_prefixes=True)
    a1, a2 = eng.generate([q1, q2], [SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=4)])
    (row0, _), (row1, _) = eng.held[0], eng.held[1]
    first, second = ((q1, a1), (q2, a2)) if row1[:len(q1)] == q1 else ((q2, a2), (q1, a1))
    assert row1[:len(first[0])] == first[0] and row0[:len(second[0])] == second[0]
    p1, p2 = first[0] + first[1].tokens + EXTRA, second[0] + second[1].tokens + EXTRA[:3]
    want1, want2 = fresh(m, p1, 6).tokens, fresh(m, p2, 6).tokens
    seen = prefills(monkeypatch)
    assert eng.generate([p1], SamplingParams(max_new_tokens=6))[0].tokens == want1
    assert seen == [len(EXTRA)]
    seen.clear()
    assert eng.generate([p2], SamplingParams(max_new_tokens=6))[0].tokens == want2
    assert seen == [3]


def test_grow_keeps_running_and_kept_rows(monkeypatch):
    """grow() lengthens every row between steps: a request running across it and a kept conversation's
    next turn (now longer than the old rows) give a fresh engine's tokens, the turn from its kept keys.
    The other request, prefilled afresh while the conversation's keys sat in the next free row, moved
    them to the free row that kept nothing instead of overwriting them."""
    m = tiny()
    eng = Engine(m, slots=2, max_len=40, keep_prefixes=True)
    first = eng.generate([P1], SamplingParams(max_new_tokens=8))[0]
    assert list(eng.held) == [0]
    other = [(5 * i + 2) % 101 for i in range(12)]
    rid = eng.add(other, SamplingParams(max_new_tokens=30))
    got = [ev.token for _ in range(3) for ev in eng.step()]
    assert list(eng.held) == [1] and eng.held[1][0] == (P1 + first.tokens)[:len(P1) + 7]
    eng.grow(96)
    eng.grow(50)  # never shorter
    assert eng.max_len == 96 and eng.k[0].shape[2] == 96
    p2 = P1 + first.tokens + EXTRA * 3  # 52 tokens: more than the old rows held
    seen = prefills(monkeypatch)
    turn = eng.add(p2, SamplingParams(max_new_tokens=10))
    outs = {}
    while eng.has_work():
        for ev in eng.step():
            outs.setdefault(ev.rid, []).append(ev.token)
    assert seen == [len(p2) - 1 - (len(P1) + 7)]  # from the 27 kept keys on
    assert got + outs[rid] == fresh(m, other, 30).tokens
    assert outs[turn] == fresh(m, p2, 10).tokens


def test_common_prefix():
    assert [engine_mod.common_prefix(a, b) for a, b in
            [([], [1]), ([1, 2, 3], [1, 2, 3, 4]), ([1, 2, 3], [1, 2, 4]), ([2], [1]), (list(range(100)),
             list(range(37)) + [0] * 10), ([1, 2], [1, 2])]] == [0, 3, 2, 0, 37, 2]
