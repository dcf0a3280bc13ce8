"""Tests for nanohuatuo.feedback: the ranking parser, EndpointRanker against a scripted local
OpenAI-compatible server (real openai client), the offline judge, preference records and the CLI."""

import json
import threading
import time

import pytest

from fake_openai import ScriptedServer, completion

from nanohuatuo.feedback import (
    EndpointRanker,
    JudgeError,
    judged_answers,
    OfflineRanker,
    main,
    parse_ranking,
    rankings_to_preferences,
)

REFERENCE = "您好，咳嗽两周伴低热，建议先做血常规和胸片检查，排除肺部感染，期间多喝水、注意休息。"
ANSWERS = [
    "多喝水。" * 30,  # degenerate loop
    "咳嗽两周伴低热，建议做血常规和胸片检查，排除肺部感染，注意休息、多喝水。",  # close to the doctor
    "可能是感冒，吃点药就好了。",  # short and vague
]


def make_items(n=3):
    return [{"id": f"q{i}", "question": f"医生您好，我咳嗽两周了，还有点低热，怎么办？（{i}）",
             "reference": REFERENCE, "answers": list(ANSWERS)} for i in range(n)]


@pytest.fixture
def serve(monkeypatch):
    """start(script) -> a scripted server; script(body, count) returns (status, headers, reply text)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    servers = []

    def start(script):
        lock, count = threading.Lock(), [0]

        def handler(body, path):
            with lock:
                count[0] += 1
                n = count[0]
            status, headers, text = script(body, n)
            if status == 200:
                return completion(text, body, prompt_tokens=100, completion_tokens=10)
            return status, {"error": {"message": text, "type": "error", "code": status}}, headers

        server = ScriptedServer(handler).start()
        server.bodies = lambda: [body for _, body in server.requests]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def shown_order(body, texts):
    """Which text the judge saw as candidate 1, 2, ...: order of first appearance in the prompt."""
    prompt = body["messages"][1]["content"]
    return sorted(range(len(texts)), key=lambda i: prompt.index(texts[i].strip()))


def ranks(best_first):
    """Server script: reply with the ranking of `best_first` (indices into ANSWERS) in shown numbers."""
    def script(body, count):
        order = shown_order(body, ANSWERS)
        numbers = [order.index(i) + 1 for i in best_first]
        return 200, {}, "理由：回答较完整。\n排名：" + " ＞ ".join(map(str, numbers))
    return script


def judge_for(server, tmp_path, **kw):
    kw = {"cache_path": tmp_path / "cache.sqlite", "progress_every": 0, **kw}
    return EndpointRanker(base_url=server.base_url, model="judge-test", api_key="EMPTY", **kw)


@pytest.mark.parametrize("text, n, expected", [
    ("排名：3 > 1 > 2", 3, [2, 0, 1]),
    ("分析……\n\n排名：２＞３＞１", 3, [1, 2, 0]),                           # full-width digits and ＞
    ("**排名**： 回答2 > 回答1", 2, [1, 0]),                                 # markdown, labels
    ("先比较。排名：[3] > [1] > [2]（3最全面）", 3, [2, 0, 1]),              # trailing remark
    ("排名：3，1，2", 3, [2, 0, 1]),                                         # full-width commas
    ("```json\n{\"ranking\": [2, 3, 1]}\n```", 3, [1, 2, 0]),                # fenced JSON
    ("初步排名：1 > 2 > 3\n复核后，最终排名：3 > 2 > 1", 3, [2, 1, 0]),    # last one wins
    ("Ranking: 1 > 2\n说明：以上排名：基于准确性", 2, [0, 1]),              # prose label ignored
    ("排名：3 > 1", 3, None),                                                # missing candidate
    ("排名：3 > 1 > 3", 3, None),                                            # duplicate
    ("排名：1 > 2 > 3 > 4", 3, None),                                        # out of range
    ("排名：1 = 2 > 3", 3, None),                                            # ties unsupported
    ("排名：1 > 2, 3", 3, None),                                             # mixed separators
    ("最终排名：1 > 2 > 3\n排名：1 > 2", 3, None),                           # invalid last, no fallback
    ('{"ranking": [1, true]}', 2, None),
    ("我觉得都不错。", 3, None),
    ("排名为：2 > 1", 2, [1, 0]),                                            # label variants
    ("综合以上分析，最终排名如下：\n\n候选回答2 > 候选回答3 > 候选回答1", 3, [1, 2, 0]),
    ("最终排名如下：3＞1＞2", 3, [2, 0, 1]),
    ("排序结果是：1 > 3 > 2", 3, [0, 2, 1]),
    ("**最终排名**：\n2、1", 2, [1, 0]),
    ("Final ranking is: 2 > 1", 2, [1, 0]),
    ("关于排名\n我认为都不错", 2, None),                                    # a label with no ranking below
    ("", 3, None),
    ("初步排名：1 > 2 > 3，但考虑准确性后调整。\n最终：2 > 1 > 3", 3, None),   # a later order: re-asked
    ("排名：2 > 1 > 3\n理由：收缩压 140 > 90，1 > 2 只在细节上", 3, [1, 0, 2]),  # numbers in the reasons
    ("排名：\n1、回答2\n2、回答1", 2, None),                                  # a numbered list, not 1 > 2
    ("排名：1、候选回答2；2、候选回答1", 2, None),
    ("排名：2 > 1 > 3\n（即回答2 > 回答1 > 回答3）", 3, [1, 0, 2]),                # the same order restated
    ("排名：候选回答 2 > 3 > 1", 3, [1, 2, 0]),                                  # the label written once
])
def test_parse_ranking(text, n, expected):
    assert parse_ranking(text, n) == expected


def test_ranking_is_mapped_back_through_the_shuffle(serve, tmp_path):
    server = serve(ranks([1, 2, 0]))
    items = make_items(4)
    with judge_for(server, tmp_path) as judge:
        results = judge.rank(items)
    assert [r["ranking"] for r in results] == [[1, 2, 0]] * 4
    assert [r["id"] for r in results] == ["q0", "q1", "q2", "q3"]
    assert not any(r["cached"] for r in results)
    assert judge.usage.prompt_tokens == 400 and judge.usage.completion_tokens == 40
    # the shuffle really happened: some item did not see the answers in their original order
    assert any(shown_order(body, ANSWERS) != [0, 1, 2] for body in server.bodies())
    assert all(body["temperature"] == 0.0 and body["model"] == "judge-test" for body in server.bodies())


def test_mixed_ranks_the_hidden_doctor_reply(serve, tmp_path):
    texts = ANSWERS + [REFERENCE]

    def script(body, count):
        order = shown_order(body, texts)
        return 200, {}, "排名：" + " > ".join(str(order.index(i) + 1) for i in [3, 1, 2, 0])

    server = serve(script)
    with judge_for(server, tmp_path) as judge:
        [result] = judge.rank(make_items(1), mixed=True)
    assert result["ranking"] == [3, 1, 2, 0] and result["reference_rank"] == 0
    # the doctor's reply appears once, as a candidate, not also as a labelled reference
    assert server.bodies()[0]["messages"][1]["content"].count(REFERENCE) == 1
    [record] = rankings_to_preferences(make_items(1), [result])
    assert record["answers"] == [REFERENCE, ANSWERS[1], ANSWERS[2], ANSWERS[0]]


def test_garbled_reply_is_retried_then_unusable(serve, tmp_path):
    server = serve(lambda body, count: (200, {}, "我觉得都不错。"))
    with judge_for(server, tmp_path, parse_attempts=3) as judge:
        [result] = judge.rank(make_items(1))
    assert result["ranking"] is None and result["raw"] == "我觉得都不错。"
    assert len(server.bodies()) == 3
    # each retry nudges, so the request differs (and would not be a cache hit)
    assert [len(body["messages"]) for body in server.bodies()] == [2, 4, 6]
    assert judge.usage.unusable == {"no ranking line": 1}
    assert rankings_to_preferences(make_items(1), [result]) == []


def test_429_and_503_are_retried(serve, tmp_path):
    good = ranks([1, 0, 2])

    def script(body, count):
        if count == 1:
            return 429, {"Retry-After": "0"}, "rate limited"
        if count == 2:
            return 503, {}, "overloaded"
        return good(body, count)

    server = serve(script)
    with judge_for(server, tmp_path) as judge:
        [result] = judge.rank(make_items(1))
    assert result["ranking"] == [1, 0, 2]
    assert len(server.bodies()) == 3 and judge.usage.retried == 2


def test_timeout_is_retried(serve, tmp_path):
    good = ranks([2, 1, 0])

    def script(body, count):
        if count == 1:
            time.sleep(1.0)  # longer than the client's timeout
        return good(body, count)

    server = serve(script)
    with judge_for(server, tmp_path, timeout=0.3) as judge:
        [result] = judge.rank(make_items(1))
    assert result["ranking"] == [2, 1, 0] and len(server.bodies()) == 2


def test_bad_request_is_not_retried_and_auth_error_raises(serve, tmp_path):
    server = serve(lambda body, count: (400, {}, "context too long"))
    with judge_for(server, tmp_path) as judge:
        [result] = judge.rank(make_items(1))
    assert result["ranking"] is None and "400" in result["error"]
    assert len(server.bodies()) == 1

    server = serve(lambda body, count: (401, {}, "invalid api key"))
    with judge_for(server, tmp_path) as judge, pytest.raises(JudgeError, match="API key"):
        judge.rank(make_items(2))


def test_rerun_is_served_from_cache(serve, tmp_path):
    good = ranks([1, 2, 0])
    # q1 always gets a garbled reply, so its parse retries must replay from the cache too
    server = serve(lambda body, count: (200, {}, "无法判断") if "（1）" in body["messages"][1]["content"]
                   else good(body, count))
    items = make_items(3)
    with judge_for(server, tmp_path, concurrency=2) as judge:
        first = judge.rank(items)
    sent = len(server.bodies())
    assert sent == 2 + 3
    with judge_for(server, tmp_path) as judge:
        second = judge.rank(items)
    assert len(server.bodies()) == sent  # zero new requests
    assert [r["ranking"] for r in second] == [r["ranking"] for r in first] == [[1, 2, 0], None, [1, 2, 0]]
    assert all(r["cached"] for r in second)
    assert judge.usage.requests == judge.usage.cached == 5


def test_offline_judge_prefers_reference_like_and_sinks_repetition():
    [result] = OfflineRanker().rank(make_items(1))
    assert result["ranking"][0] == 1 and result["ranking"][-1] == 0
    [mixed] = OfflineRanker().rank(make_items(1), mixed=True)
    assert mixed["ranking"][0] == 3 and mixed["reference_rank"] == 0


def test_rankings_to_preferences_drops_unusable():
    items = make_items(2)
    results = [{"id": "q0", "ranking": [1, 2, 0], "raw": "", "cached": False},
               {"id": "q1", "ranking": None, "raw": "?", "cached": False}]
    assert rankings_to_preferences(items, results) == [
        {"id": "q0", "prompt": items[0]["question"], "reference": REFERENCE,
         "answers": [ANSWERS[1], ANSWERS[2], ANSWERS[0]]}]
    with pytest.raises(ValueError, match="order"):
        rankings_to_preferences(items, results[::-1])


def test_cli_offline(tmp_path):
    items = make_items(2)
    items[1]["question"] = [{"role": "user", "content": "咳嗽两周"}, {"role": "assistant", "content": "发烧吗？"},
                            {"role": "user", "content": "有点低热"}]
    src, out = tmp_path / "samples.jsonl", tmp_path / "out" / "prefs.jsonl"
    src.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    assert main(["rank", "--data", str(src), "--out", str(out), "--judge", "offline"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["q0", "q1"]
    assert records[1]["prompt"] == items[1]["question"] and records[1]["answers"][0] == ANSWERS[1]
    assert "咳嗽" in out.read_text(encoding="utf-8")  # written without \u escapes


def test_repeats_and_truncated_answers_are_left_out(serve, tmp_path, capsys):
    item = make_items(1)[0]
    item["answers"] = [ANSWERS[1], " " + ANSWERS[1], ANSWERS[2], ANSWERS[0], ANSWERS[2]]
    item["finished"] = [True, True, True, False, True]  # the loop was cut by max_new_tokens
    assert judged_answers(item) == ([0, 2], {"duplicate": 2, "truncated": 1})
    seen = []

    def script(body, count):
        seen.append(body["messages"][1]["content"])
        order = shown_order(body, [ANSWERS[1], ANSWERS[2]])
        return 200, {}, "排名：" + " > ".join(str(order.index(i) + 1) for i in [1, 0])

    server = serve(script)
    with judge_for(server, tmp_path) as judge:
        [result] = judge.rank([item])
    assert result["ranking"] == [2, 0] and result["dropped"] == {"truncated": 1, "duplicate": 2}
    assert "2个候选回答" in seen[0] and ANSWERS[0] not in seen[0]  # only the two distinct complete ones
    assert "left out 2 repeated answers and 1 answers cut by max_new_tokens" in capsys.readouterr().err
    [record] = rankings_to_preferences([item], [result])
    assert record["answers"] == [ANSWERS[2], ANSWERS[1]] and "reference_index" not in record

    # fewer than two candidates left: skipped (no request), counted, the run goes on
    lone = dict(item, id="lone", answers=[ANSWERS[1], ANSWERS[1]], finished=[True, True])
    with judge_for(server, tmp_path) as judge:
        results = judge.rank([lone, item])
    assert results[0]["ranking"] is None and results[0]["error"].startswith("skipped")
    assert results[1]["ranking"] == [2, 0] and len(server.bodies()) == 1  # the other one came from the cache
    [offline] = OfflineRanker().rank([lone])
    assert offline["ranking"] is None


def test_truncated_last_ranks_cut_answers_below_finished_ones():
    item = make_items(1)[0]
    item["finished"] = [True, False, True]  # the best-scoring answer was cut
    [dropped] = OfflineRanker().rank([item])
    assert dropped["ranking"] == [2, 0]
    [last] = OfflineRanker(truncated="last").rank([item])
    assert last["ranking"] == [2, 0, 1] and last["dropped"] == {"truncated": 0, "duplicate": 0}
    [mixed] = OfflineRanker(truncated="last").rank([item], mixed=True)
    assert mixed["ranking"] == [3, 2, 0, 1]


def test_mixed_record_marks_the_doctor_reply():
    item = make_items(1)[0]
    item["answers"] = ANSWERS + [REFERENCE]  # a sampled answer equal to the doctor's reply is judged once
    [result] = OfflineRanker().rank([item], mixed=True)
    assert result["dropped"]["duplicate"] == 1 and sorted(result["ranking"]) == [0, 1, 2, 4]
    [record] = rankings_to_preferences([item], [result])
    assert record["answers"][record["reference_index"]] == REFERENCE
    assert record["reference_index"] == result["reference_rank"] == 0


def test_a_failing_item_is_counted_and_the_rest_is_judged(serve, tmp_path):
    good = ranks([1, 2, 0])
    server = serve(lambda body, count: (200, {}, "都挺好") if "（0）" in body["messages"][1]["content"]
                   else (200, {}, "") if "（1）" in body["messages"][1]["content"] else good(body, count))
    with judge_for(server, tmp_path, parse_attempts=2) as judge:
        results = judge.rank(make_items(3))
    assert [r["ranking"] for r in results] == [None, None, [1, 2, 0]]
    assert results[0]["error"] == "no ranking line" and judge.usage.unusable == {"no ranking line": 2}
    assert "2 unusable (no ranking line)" in judge.summary()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    out = str(tmp_path / "prefs.jsonl")
    cases = {"latin1.jsonl": json.dumps(make_items(1)[0], ensure_ascii=False).encode("gb18030"),
             "empty.jsonl": b"", "blank.jsonl": b"\n\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert main(["rank", "--data", str(tmp_path / name), "--out", out, "--judge", "offline"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and name in err and "\n" not in err, err
    assert main(["rank", "--data", str(tmp_path / "missing.jsonl"), "--out", out, "--judge", "offline"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q", "reference": "r", "answers": "a"}) + "\n")
    assert main(["rank", "--data", str(bad), "--out", out, "--judge", "offline"]) == 2
    assert "bad.jsonl:1: item 'x': 'answers' must be a list" in capsys.readouterr().err
    assert not (tmp_path / "prefs.jsonl").exists()
    assert main(["judge"]) == 2


def test_cli_openai_judge_and_old_flag_names(serve, tmp_path, capsys):
    server = serve(ranks([1, 2, 0]))
    src, out = tmp_path / "samples.jsonl", tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in make_items(2)), encoding="utf-8")
    args = ["rank", "--in", str(src), "--out", str(out), "--base-url", server.base_url, "--model", "judge-test",
            "--cache", str(tmp_path / "c.sqlite")]
    assert main(args) == 0
    assert [json.loads(line)["answers"][0] for line in out.read_text(encoding="utf-8").splitlines()] == [ANSWERS[1]] * 2
    err = capsys.readouterr().err
    assert "judge: 2 requests (0 cached)" in err
    assert ("warning: --in is deprecated and will be removed in the next release; use --data\n" in err
            and "warning: --model is deprecated and will be removed in the next release; use --judge-model-name" in err)
    args = ["rank", "--data", str(src), "--out", str(out), "--judge-base-url", server.base_url, "--judge-model-name",
            "judge-test", "--cache", str(tmp_path / "c.sqlite")]
    assert main(args) == 0 and len(server.bodies()) == 2  # the rerun is served from the cache
    assert "judge: 2 requests (2 cached)" in capsys.readouterr().err

    auth = serve(lambda body, count: (401, {}, "invalid api key"))
    args = ["rank", "--data", str(src), "--out", str(out), "--judge-base-url", auth.base_url, "--judge-model-name",
            "m", "--cache", ""]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "rejected the API key (401" in err and "Traceback" not in err
