"""Tests for nanohuatuo.feedback: the ranking parser, OpenAIJudge against a scripted local
OpenAI-compatible server (real openai client), the offline judge, preference records and the CLI."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanohuatuo.feedback import (
    JudgeError,
    OfflineJudge,
    OpenAIJudge,
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


class ScriptedServer:
    """Local /v1/chat/completions; `script(body, count)` returns (status, headers, reply text)."""

    def __init__(self, script):
        self.script = script
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    count = len(outer.requests)
                status, headers, text = outer.script(body, count)
                if status == 200:
                    payload = {"id": f"chatcmpl-{count}", "object": "chat.completion", "created": 0,
                               "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}
                else:
                    payload = {"error": {"message": text, "type": "error", "code": status}}
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


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
    kw = {"cache_path": tmp_path / "cache.sqlite", "base_delay": 0.001, "progress_every": 0, **kw}
    return OpenAIJudge(base_url=server.base_url, model="judge-test", api_key="EMPTY", **kw)


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
    ("", 3, None),
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
    assert judge.stats["prompt_tokens"] == 400 and judge.stats["completion_tokens"] == 40
    # the shuffle really happened: some item did not see the answers in their original order
    assert any(shown_order(body, ANSWERS) != [0, 1, 2] for body in server.requests)
    assert all(body["temperature"] == 0.0 and body["model"] == "judge-test" for body in server.requests)


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
    assert server.requests[0]["messages"][1]["content"].count(REFERENCE) == 1
    [record] = rankings_to_preferences(make_items(1), [result])
    assert record["answers"] == [REFERENCE, ANSWERS[1], ANSWERS[2], ANSWERS[0]]


def test_garbled_reply_is_retried_then_unusable(serve, tmp_path):
    server = serve(lambda body, count: (200, {}, "我觉得都不错。"))
    with judge_for(server, tmp_path, parse_attempts=3) as judge:
        [result] = judge.rank(make_items(1))
    assert result["ranking"] is None and result["raw"] == "我觉得都不错。"
    assert len(server.requests) == 3
    # each retry nudges, so the request differs (and would not be a cache hit)
    assert [len(body["messages"]) for body in server.requests] == [2, 4, 6]
    assert judge.stats["unusable"] == 1
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
    assert len(server.requests) == 3 and judge.stats["retries"] == 2


def test_timeout_is_retried(serve, tmp_path):
    good = ranks([2, 1, 0])

    def script(body, count):
        if count == 1:
            time.sleep(1.0)  # longer than the client's timeout
        return good(body, count)

    server = serve(script)
    with judge_for(server, tmp_path, timeout=0.3) as judge:
        [result] = judge.rank(make_items(1))
    assert result["ranking"] == [2, 1, 0] and len(server.requests) == 2


def test_bad_request_is_not_retried_and_auth_error_raises(serve, tmp_path):
    server = serve(lambda body, count: (400, {}, "context too long"))
    with judge_for(server, tmp_path) as judge:
        [result] = judge.rank(make_items(1))
    assert result["ranking"] is None and "400" in result["error"]
    assert len(server.requests) == 1

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
    sent = len(server.requests)
    assert sent == 2 + 3
    with judge_for(server, tmp_path) as judge:
        second = judge.rank(items)
    assert len(server.requests) == sent  # zero new requests
    assert [r["ranking"] for r in second] == [r["ranking"] for r in first] == [[1, 2, 0], None, [1, 2, 0]]
    assert all(r["cached"] for r in second)
    assert judge.stats["requests"] == 0 and judge.stats["cache_hits"] == 5


def test_offline_judge_prefers_reference_like_and_sinks_repetition():
    [result] = OfflineJudge().rank(make_items(1))
    assert result["ranking"][0] == 1 and result["ranking"][-1] == 0
    [mixed] = OfflineJudge().rank(make_items(1), mixed=True)
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
    assert main(["rank", "--in", str(src), "--out", str(out), "--judge", "offline"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["q0", "q1"]
    assert records[1]["prompt"] == items[1]["question"] and records[1]["answers"][0] == ANSWERS[1]
    assert "咳嗽" in out.read_text(encoding="utf-8")  # written without \u escapes
