"""nanohuatuo.llm with the real openai client against a scripted local server: malformed replies
retried then counted, nothing lost under concurrency, the cache, refusals, usage totals."""

import json
import sqlite3
import threading
import time

import pytest

from fake_openai import ScriptedServer, completion
from nanohuatuo.llm import LLM, LLMError

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not see loopback calls


def make(srv, tmp_path, **kw):
    kw = {"cache": tmp_path / "cache.sqlite", "api_key": "k", "max_retries": 2, "timeout": 10.0, **kw}
    return LLM(srv.base_url, "test-model", **kw)


def numbered(request):
    return int(request["messages"][0]["content"].split()[-1])


def requests_for(n):
    return [{"messages": [{"role": "user", "content": f"question {i}"}], "temperature": 0.0} for i in range(n)]


def test_chat_usage_and_params(tmp_path):
    with ScriptedServer(lambda req, path: "one two three") as srv, make(srv, tmp_path, name="judge") as llm:
        a = llm.chat(MSG, temperature=0.5, max_tokens=7, seed=None)
        assert (a.ok, a.text, a.value, a.cached, a.asks) == (True, "one two three", "one two three", False, 1)
        assert a.finish_reasons == ["stop"] and (a.prompt_tokens, a.completion_tokens) == (2, 3)
        [(path, body)] = srv.requests
        assert path == "/v1/chat/completions"
        assert body["model"] == "test-model" and body["temperature"] == 0.5 and body["max_tokens"] == 7
        assert "seed" not in body and "stream" not in body  # None-valued parameters are left out
        b = llm.chat(MSG, temperature=0.5, max_tokens=7)
        assert b.cached and b.text == a.text and len(srv.requests) == 1
        llm.chat(MSG, temperature=0.6, max_tokens=7)  # another parameter, another request
        assert len(srv.requests) == 2
        u = llm.usage
        assert (u.requests, u.cached, u.prompt_tokens, u.completion_tokens) == (3, 1, 4, 6)
        assert llm.summary() == "judge: 3 requests (1 cached), 4 prompt + 6 completion tokens"


def test_n_choices_and_finish_reasons(tmp_path):
    def handler(req, path):
        return completion(["a b", "c"], req, finish_reason=["stop", "length"])

    with ScriptedServer(handler) as srv, make(srv, tmp_path) as llm:
        a = llm.chat(MSG, n=2)
        assert a.texts == ["a b", "c"] and a.finish_reasons == ["stop", "length"] and a.text == "a b"
        assert srv.requests[0][1]["n"] == 2


@pytest.mark.parametrize("bad, reason", [
    ({"choices": []}, "empty choices"),
    (b"<html>502 Bad Gateway</html>", "non-JSON body"),
    ((200, b"{not json", {"Content-Type": "application/json"}), "non-JSON body"),
    ({"choices": [{"index": 0, "message": {"role": "assistant"}}]}, "no content"),
    ({}, "empty choices"),
])
def test_malformed_reply_is_retried_then_counted(tmp_path, bad, reason):
    with ScriptedServer(lambda req, path: bad) as srv, make(srv, tmp_path, attempts=3, name="j") as llm:
        answers = llm.map(requests_for(2))
        assert [a.ok for a in answers] == [False, False] and {a.error for a in answers} == {reason}
        assert [a.asks for a in answers] == [3, 3] and all(a.value is None for a in answers)
        assert len(srv.requests) == 6
        assert llm.usage.unusable == {reason: 2} and llm.usage.retried == 4
        assert llm.summary().endswith(f"2 unusable ({reason})")
    # replies without text (an outage answered 200) are not cached: a rerun asks again, once the server is back
    with ScriptedServer(lambda req, path: "fine") as srv, make(srv, tmp_path, attempts=3) as llm:
        assert [a.ok for a in llm.map(requests_for(2))] == [True, True]
        assert len(srv.requests) == 2 and llm.usage.cached == 0


def test_malformed_then_good_reply(tmp_path):
    count = {"n": 0}

    def handler(req, path):
        count["n"] += 1
        return {"choices": []} if count["n"] == 1 else b"oops" if count["n"] == 2 else "good"

    with ScriptedServer(handler) as srv, make(srv, tmp_path) as llm:
        a = llm.chat(MSG)
        assert a.ok and a.text == "good" and a.asks == 3 and len(srv.requests) == 3
        assert not llm.usage.unusable


def test_parse_failure_retried_with_followup_then_unusable(tmp_path):
    def parse(text):
        if not text.startswith("ANSWER:"):
            raise ValueError("no answer line")
        return text[7:].strip()

    def nudge(messages, text, reason):
        return messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "format!"}]

    replies = {"question 0": ["chatter", "ANSWER: 42"], "question 1": ["x", "y", "z"]}

    def handler(req, path):
        return replies[req["messages"][0]["content"]][(len(req["messages"]) - 1) // 2]

    with ScriptedServer(handler) as srv, make(srv, tmp_path, attempts=3) as llm:
        good, bad = llm.map(requests_for(2), parse=parse, followup=nudge)
        assert good.ok and good.value == "42" and good.text == "ANSWER: 42" and good.asks == 2
        assert not bad.ok and bad.error == "no answer line" and bad.text == "z" and bad.asks == 3
        assert sorted(len(body["messages"]) for _, body in srv.requests) == [1, 1, 3, 3, 5]
        assert llm.usage.unusable == {"no answer line": 1}
    # a fixed parser re-reads the cached replies: nothing is asked again
    with ScriptedServer(handler) as srv, make(srv, tmp_path, attempts=3) as llm:
        good, bad = llm.map(requests_for(2), parse=lambda t: t, followup=nudge)
        assert (good.value, bad.value) == ("chatter", "x") and srv.requests == []


def test_nothing_lost_with_concurrency_and_rerun_sends_nothing(tmp_path):
    """Bad replies mixed with good ones at concurrency 4: every good reply is cached, the run
    finishes, and a rerun asks only what brought no text (an outage's replies are not kept)."""
    def handler(req, path):
        i = numbered(req)
        time.sleep(0.02 * (i % 3))  # finish out of order
        if i % 4 == 1:
            return {"choices": []}
        if i % 4 == 2:
            return b"not json"
        return f"answer {i}"

    with ScriptedServer(handler) as srv, make(srv, tmp_path, concurrency=4, attempts=2) as llm:
        answers = llm.map(requests_for(16), desc="test")
        assert [a.text if a.ok else None for a in answers] == [
            f"answer {i}" if i % 4 in (0, 3) else None for i in range(16)]
        assert len(srv.requests) == 8 + 8 * 2
        assert llm.usage.unusable == {"empty choices": 4, "non-JSON body": 4}
    rows = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    assert rows == 8  # every reply with text; none of those without
    with ScriptedServer(handler) as srv, make(srv, tmp_path, concurrency=4, attempts=2) as llm:
        again = llm.map(requests_for(16))
        assert len(srv.requests) == 8 * 2 and [a.text for a in again] == [a.text for a in answers]
        assert [a.cached for a in again] == [i % 4 in (0, 3) for i in range(16)]


def test_fatal_error_keeps_what_was_received(tmp_path):
    """One item meets a 401 mid-run: the map raises, but the replies already in flight are cached."""
    gate = threading.Event()

    def handler(req, path):
        i = numbered(req)
        if i == 5:
            return 401, {"error": {"message": "invalid api key"}}, None
        if i < 4:
            gate.wait(2)  # the first four are in flight when item 5's refusal arrives
        return f"answer {i}"

    with ScriptedServer(handler) as srv, make(srv, tmp_path, concurrency=6) as llm:
        timer = threading.Timer(0.3, gate.set)
        timer.start()
        with pytest.raises(LLMError, match=r"rejected the API key \(401"):
            llm.map(requests_for(8))
        timer.cancel()
    with ScriptedServer(lambda req, path: (401, {"error": {"message": "no"}}, None)) as srv, \
            make(srv, tmp_path) as llm:
        assert [llm.chat(r["messages"], temperature=0.0).cached for r in requests_for(4)] == [True] * 4


def _ok_only(text):
    if "ok" not in text:
        raise ValueError("garbled")
    return text


def test_refresh_unusable_reasks_only_the_unusable(tmp_path):
    good = {"question 0", "question 2"}
    with ScriptedServer(lambda req, path: "ok" if req["messages"][0]["content"] in good
                        else "garbled") as srv, make(srv, tmp_path, attempts=2) as llm:
        assert [a.ok for a in llm.map(requests_for(3), parse=_ok_only)] == [True, False, True]
    with ScriptedServer(lambda req, path: "now ok") as srv:
        with make(srv, tmp_path, attempts=2) as llm:
            assert [a.ok for a in llm.map(requests_for(3), parse=_ok_only)] == [True, False, True]
            assert srv.requests == []
        with make(srv, tmp_path, attempts=2, refresh_unusable=True) as llm:
            answers = llm.map(requests_for(3), parse=_ok_only)
        assert [a.text for a in answers] == ["ok", "now ok", "ok"]
        assert [body["messages"][0]["content"] for _, body in srv.requests] == ["question 1"]
        with make(srv, tmp_path, attempts=2) as llm:  # the fresh reply replaced the bad one
            assert llm.chat(requests_for(2)[1]["messages"], parse=_ok_only, temperature=0.0).text == "now ok"
            assert len(srv.requests) == 1


def test_auth_and_not_found_raise_clear_errors(tmp_path):
    with ScriptedServer(lambda req, path: (401, {"error": {"message": "invalid api key"}}, None)) as srv:
        with make(srv, tmp_path) as llm, pytest.raises(LLMError, match=r"API key.*--api-key"):
            llm.chat(MSG)
        assert len(srv.requests) == 1  # not retried
    with ScriptedServer(lambda req, path: (404, {"error": {"message": "model not found"}}, None)) as srv:
        with make(srv, tmp_path) as llm, pytest.raises(LLMError, match=r"404 for model 'test-model'"):
            llm.map(requests_for(3))


def test_bad_request_is_one_unusable_item(tmp_path, capsys):
    def handler(req, path):
        if numbered(req) == 1:
            return 400, {"error": {"message": "context too long"}}, None
        return "fine"

    with ScriptedServer(handler) as srv, make(srv, tmp_path) as llm:
        answers = llm.map(requests_for(3))
        assert [a.ok for a in answers] == [True, False, True] and answers[1].error == "rejected (400)"
        assert len(srv.requests) == 3 and llm.usage.unusable == {"rejected (400)": 1}
    assert "rejected a request (400: context too long)" in capsys.readouterr().err


def test_429_and_503_retried_by_the_client(tmp_path):
    count = {"n": 0}

    def handler(req, path):
        count["n"] += 1
        if count["n"] == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After-Ms": "10"}
        if count["n"] == 2:
            return 503, {"error": {"message": "overloaded"}}, {"Retry-After-Ms": "10"}
        return "finally"

    with ScriptedServer(handler) as srv, make(srv, tmp_path) as llm:
        a = llm.chat(MSG)
        assert a.ok and a.text == "finally" and a.asks == 1 and len(srv.requests) == 3
        assert llm.usage.retried == 2 and llm.usage.requests == 1


def test_server_gone_after_retries_raises(tmp_path):
    with ScriptedServer(lambda req, path: (503, {"error": {"message": "down"}}, {"Retry-After-Ms": "1"})) as srv:
        with make(srv, tmp_path, max_retries=1) as llm, pytest.raises(LLMError, match="503 after 1 retries"):
            llm.chat(MSG)
        assert len(srv.requests) == 2


def test_no_cache_and_bad_cache_file(tmp_path):
    with ScriptedServer(lambda req, path: "x") as srv:
        with make(srv, tmp_path, cache=None) as llm:
            llm.chat(MSG), llm.chat(MSG)
        assert len(srv.requests) == 2
        bad = tmp_path / "bad.sqlite"
        bad.write_text("this is not a database " * 100)
        with pytest.raises(LLMError, match="bad.sqlite is not a usable SQLite file"):
            make(srv, tmp_path, cache=bad).chat(MSG)


def test_a_cut_reply_is_unusable_where_a_whole_one_is_parsed(tmp_path):
    """finish_reason "length" or "content_filter": the verdict or ranking may be what is missing, so a
    parsed ask counts it unusable at once (asking the same again would be cut again); unparsed text
    (a candidate's answer, sampling's) is kept with its finish reason."""
    def handler(req, path):
        return completion("Assistant 1 is better than", req, finish_reason="length" if numbered(req) == 0
                          else "content_filter")

    with ScriptedServer(handler) as srv, make(srv, tmp_path, attempts=3) as llm:
        cut, filtered = llm.map(requests_for(2), parse=lambda text: text)
        assert (cut.ok, cut.error, cut.asks) == (False, "cut at max_tokens", 1)
        assert (filtered.ok, filtered.error) == (False, "cut by a content filter") and len(srv.requests) == 2
        assert llm.usage.unusable == {"cut at max_tokens": 1, "cut by a content filter": 1}
        plain = llm.map(requests_for(2))  # the same replies, from the cache, unparsed
        assert all(a.ok for a in plain) and plain[0].finish_reasons == ["length"] and len(srv.requests) == 2


def test_half_an_emoji_is_cached_as_a_replacement_character(tmp_path):
    """A reply holding a lone surrogate (half of an emoji's UTF-16 pair, escaped in its JSON) could not
    be written as UTF-8: it was paid for again on every rerun. Now it is kept, with U+FFFD."""
    body = json.dumps(completion("头痛\ud83d多休息")).encode()  # ASCII JSON: the surrogate as \\ud83d
    with ScriptedServer(lambda req, path: (200, body, {"Content-Type": "application/json"})) as srv, \
            make(srv, tmp_path) as llm:
        assert llm.chat(MSG).text == "头痛\ufffd多休息"
    with ScriptedServer(lambda req, path: "never asked") as srv, make(srv, tmp_path) as llm:
        a = llm.chat(MSG)
        assert a.cached and a.text == "头痛\ufffd多休息" and srv.requests == []


def test_identical_requests_in_one_map_are_paid_once(tmp_path):
    with ScriptedServer(lambda req, path: f"answer {numbered(req)}") as srv, make(srv, tmp_path) as llm:
        asked = requests_for(3)
        answers = llm.map([asked[0], asked[1], asked[0], asked[2], asked[0]])
        assert [a.text for a in answers] == ["answer 0", "answer 1", "answer 0", "answer 2", "answer 0"]
        assert sorted(body["messages"][0]["content"] for _, body in srv.requests) == [
            "question 0", "question 1", "question 2"]


def test_a_double_ctrl_c_keeps_the_replies_in_flight(tmp_path):
    """Two SIGINTs close together (a double press, or `timeout -s INT`, which signals the process and then its
    group) stop the map once: the requests in flight are waited for and cached, those not sent are dropped."""
    import os
    import signal
    import subprocess
    import sys
    arrived, release = threading.Semaphore(0), threading.Event()

    def handler(req, path):
        arrived.release()
        release.wait(10)
        return f"answer {numbered(req)}"

    script = ("import sys\nfrom nanohuatuo.llm import LLM\n"
              "with LLM(sys.argv[1], 'test-model', api_key='k', cache=sys.argv[2], concurrency=2, max_retries=0) "
              "as llm:\n"
              "    llm.map([{'messages': [{'role': 'user', 'content': f'question {i}'}]} for i in range(6)])\n")
    with ScriptedServer(handler) as srv:
        proc = subprocess.Popen([sys.executable, "-c", script, srv.base_url, str(tmp_path / "c.sqlite")],
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_PROXY": "127.0.0.1"})
        try:
            assert arrived.acquire(timeout=30) and arrived.acquire(timeout=10)  # two requests in flight
            proc.send_signal(signal.SIGINT)
            time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            release.set()
            err = proc.communicate(timeout=30)[1]
        finally:
            release.set()
            proc.kill()
        assert len(srv.requests) == 2, err
    assert proc.returncode != 0 and "waiting for the 2 requests in flight" in err
    rows = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT texts FROM replies ORDER BY texts").fetchall()
    assert rows == [('["answer 0"]',), ('["answer 1"]',)]


def test_a_rate_limit_is_waited_out_beyond_the_clients_retries(tmp_path, capsys, monkeypatch):
    """429s that outlast the openai client's few seconds of backoff are asked again after the server's
    Retry-After, for up to rate_limit_wait seconds; past that the run stops naming the wait."""
    count = {"n": 0}

    def handler(req, path):
        count["n"] += 1
        if count["n"] <= 5:
            return 429, {"error": {"message": "tokens per minute"}}, {"Retry-After-Ms": "50"}
        return "at last"

    with ScriptedServer(handler) as srv, make(srv, tmp_path, max_retries=1) as llm:
        a = llm.chat(MSG)
        assert a.ok and a.text == "at last" and len(srv.requests) == 6 and llm.usage.retried == 5
    assert capsys.readouterr().err.count("is rate limiting (429: tokens per minute); waiting") == 1
    slept = []
    with ScriptedServer(lambda req, path: (429, {"error": {"message": "busy"}}, {"Retry-After": "100"})) as srv:
        with make(srv, tmp_path, max_retries=0, rate_limit_wait=150, cache=None) as llm, \
                pytest.raises(LLMError, match=r"429 after 0 retries and 100 s of waiting \(busy\)"):
            # the 100 s the server asks for, without waiting them
            monkeypatch.setattr(llm._stopping, "wait", lambda s: slept.append(s) or False)
            llm.chat(MSG)
        assert len(srv.requests) == 2 and slept == [100.0]
    # an exhausted quota never comes back by waiting: the run stops at once
    quota = {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}
    with ScriptedServer(lambda req, path: (429, quota, None)) as srv:
        with make(srv, tmp_path, max_retries=0, cache=None) as llm, pytest.raises(LLMError, match="current quota"):
            llm.chat(MSG)
        assert len(srv.requests) == 1


def test_a_map_that_stops_ends_the_rate_limit_waits_at_once(tmp_path):
    """One item refused (401) while the others wait out a long Retry-After: the map raises without waiting
    for them, and they are not asked again."""
    def handler(req, path):
        if numbered(req) == 3:
            time.sleep(0.5)  # after the others have met their 429
            return 401, {"error": {"message": "invalid api key"}}, None
        return 429, {"error": {"message": "busy"}}, {"Retry-After": "300"}

    with ScriptedServer(handler) as srv, make(srv, tmp_path, max_retries=0, concurrency=4) as llm:
        waits = []
        wait = llm._stopping.wait
        llm._stopping.wait = lambda s: waits.append(wait(s)) or waits[-1]
        with pytest.raises(LLMError, match="rejected the API key"):
            llm.map(requests_for(4))
        assert waits == [True, True, True] and len(srv.requests) == 4  # each wait ended by the stop, none re-sent


def test_a_reasoning_models_thinking_is_left_out_of_every_text(tmp_path):
    """DeepSeek-R1 / Qwen3 through vLLM without a reasoning parser write <think>...</think> into the content: a draft
    verdict or ranking in it must not be parsed, nor the thinking kept in an answer; a reply cut while thinking is
    asked again."""
    from nanohuatuo.llm import visible
    assert visible("<think>\n初步排名：1 > 2\n</think>\n\n排名：2 > 1") == "排名：2 > 1"
    assert visible("drafting... </think>answer") == "answer"  # the template opened the block
    assert visible("<think> still going") == "" and visible("no thinking") == "no thinking" and visible(None) is None
    replies = iter(["<think>cut while thinking", "<think>A is worse\n</think>\nB is worse"])
    with ScriptedServer(lambda req, path: next(replies)) as srv, make(srv, tmp_path) as llm:
        a = llm.chat(MSG, parse=lambda t: t.split()[0])
        assert a.ok and a.text == "B is worse" and a.value == "B" and a.asks == 2
        assert llm.usage.unusable == {}
    # without a parser (sampled answers, n > 1): a choice cut while thinking is an empty, cut answer beside the others
    body = completion(["<think>long reasoning", "answer"], finish_reason=["length", "stop"])
    with ScriptedServer(lambda req, path: body) as srv, make(srv, tmp_path, cache=None) as llm:
        a = llm.chat(MSG, n=2)
        assert a.ok and a.texts == ["", "answer"] and a.finish_reasons == ["length", "stop"] and len(srv.requests) == 1


def test_cache_file_follows_the_flag():
    from nanohuatuo.llm import cache_file
    assert cache_file("", "out.cache.sqlite") == cache_file(None, "out.cache.sqlite") == "out.cache.sqlite"
    assert cache_file("mine.sqlite", "out.cache.sqlite") == "mine.sqlite"
    assert cache_file("none", "x") is None and cache_file("None", "x") is None  # off, not a file named none
