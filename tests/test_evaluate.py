"""evaluate.py: pairwise and multi-turn judging with the real openai client against a scripted
server on 127.0.0.1 (order swap, inconsistent and garbled verdicts, resume, per-group tables),
our own tiny model as a candidate, the QA readers, the sheet/tally round trip, and the CLI."""

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import tiny_base, write_jsonl
from fake_openai import ScriptedServer, completion
from nanohuatuo import answers as ans
from nanohuatuo import consult
from nanohuatuo import evaluate as ev
from nanohuatuo.data import DataError
from nanohuatuo.evalsets import load_cases, load_qa
from nanohuatuo.llm import LLMError
from nanohuatuo.textmetrics import score_corpus
from nanohuatuo.winrate import cohen_kappa, combine, fleiss_kappa, majority

INTENTS = ["病因分析", "治疗方案", "注意事项"]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not see loopback calls


def questions(tmp_path, n=6, name="questions.json"):
    rows = [{"id": f"s{i}", "label": INTENTS[i % 3], "query": f"第{i}个问题：头痛发热怎么办"} for i in range(n)]
    path = tmp_path / name
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path), rows


def answers(tmp_path, name, rows, text):
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"id": r["id"], "answer": text(r)} for r in rows])


def shown(request):
    """The two texts the judge was shown, from the first user message of the request."""
    body = request["messages"][1]["content"]
    return [re.search(rf"\[The Start of Assistant {k}'s \w+\]\n(.*?)\n\[The End", body, re.S).group(1) for k in (1, 2)]


def judge_requests(srv):
    return [body for _, body in srv.requests if body.get("model") == "judge"]


def pairwise_cfg(tmp_path, srv, data, a, b, **kw):
    base = dict(data=data, out=str(tmp_path / "out"), a_answers=a, b_answers=b, judge="endpoint",
                judge_base_url=srv.base_url, judge_model_name="judge", judge_api_key="k", bootstrap=200)
    return ev.PairwiseConfig(**{**base, **kw})


def good_judge(request, path):
    """Prefers the shown answer that says 好; explains first, verdict last."""
    one, two = shown(request)
    verdict = "better than" if "好" in one else "worse than" if "好" in two else "equal to"
    return f"Assistant 1 covers the symptoms; assistant 2 less so.\n\n**Assistant 1 is {verdict} Assistant 2**"


def add_up(stats):
    """The per-group tables sum to the overall one."""
    o = stats["overall"]
    for key in ("n", "win", "tie", "loss", "unjudged"):
        assert sum(g.get(key, 0) for g in stats["groups"].values()) == o.get(key, 0), key


def test_order_swap_two_requests_per_pair_with_answers_exchanged(tmp_path):
    data, rows = questions(tmp_path, name="KUAKE-QIC_100.json")  # named as the paper's set
    a = answers(tmp_path, "a", rows, lambda r: f"好的回答：{r['id']}，多喝水")
    b = answers(tmp_path, "b", rows, lambda r: f"差的回答：{r['id']}")
    with ScriptedServer(good_judge) as srv:
        summary = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b, a_name="huatuo", b_name="base"))
        reqs = judge_requests(srv)
    assert len(reqs) == 2 * len(rows)
    by_question = {}
    for r in reqs:
        one, two = shown(r)
        by_question.setdefault(re.search(r"s\d+", one).group(0), []).append((one, two))
    for q, pair in by_question.items():
        assert len(pair) == 2 and pair[0] == pair[1][::-1]  # the same two answers, exchanged
        assert {pair[0][0], pair[1][0]} == {f"好的回答：{q}，多喝水", f"差的回答：{q}"}
        assert reqs[0]["messages"][1]["content"].startswith("[Question]\n")
    o = summary["stats"]["overall"]
    assert (o["win"], o["tie"], o["loss"], o["unjudged"]) == (6, 0, 0, 0)
    assert o["winrate"] == 100.0 and o["win_pct_ci"] == [100.0, 100.0]
    assert set(summary["stats"]["groups"]) == set(INTENTS)
    add_up(summary["stats"])
    out = tmp_path / "out"
    judgements = [json.loads(x) for x in (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(judgements) == 12 and all(j["verdict"] == "A" and "covers the symptoms" in j["reasoning"]
                                         for j in judgements)
    assert {(j["order"], j["assistant_1"]) for j in judgements} == {("AB", "huatuo"), ("BA", "base")}
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| **overall** | 6 | 6 / 0 / 0 |" in report and "length-controlled" in report
    # six pairs are too few for a length slope: said in words, never a number
    assert o["length_control"]["winrate"] is None and "not identifiable (6 judged pairs, fewer than 20" in report
    assert "| vs ChatGPT | 47 | 21 | 32 |" in report  # the published numbers beside ours
    # A writes 11 characters to B's 7: the win may be length, and the report says so in words
    assert "**Warning, length shift: base's answers are 36% shorter than huatuo's (mean 7 vs 11 characters; " \
        "shorter in 6 of 6 items)" in report
    assert (out / "winrate.png").stat().st_size > 1000
    assert any("judge: 12 requests (0 cached)" in u for u in summary["usage"])


def test_endpoint_judge_sees_the_reference_answer_when_the_question_has_one(tmp_path):
    data, rows = questions(tmp_path)
    with_ref = {"s0": "医生回答：先查血常规再决定", "s3": "医生回答：多饮水，体温超过38.5度服退烧药"}
    for r in rows:
        if r["id"] in with_ref:
            r["reference"] = with_ref[r["id"]]
    (tmp_path / "questions.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    a = answers(tmp_path, "a", rows, lambda r: f"好的回答：{r['id']}")
    b = answers(tmp_path, "b", rows, lambda r: f"差的回答：{r['id']}")
    with ScriptedServer(good_judge) as srv:
        summary = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b))
        reqs = judge_requests(srv)
    assert len(reqs) == 12
    for r in reqs:
        body = r["messages"][1]["content"]
        qid = re.search(r"s\d+", shown(r)[0]).group(0)
        if qid in with_ref:
            assert f"[Reference Answer]\n{with_ref[qid]}\n" in body and "reference answer" in body
        else:
            assert "[Reference Answer]" not in body and "医生回答" not in body
    assert summary["judge_saw_reference"] == 2
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "The judge saw the reference answer for 2 of 6 questions." in report


def test_inconsistent_verdicts_are_ties(tmp_path):
    data, rows = questions(tmp_path)
    a = answers(tmp_path, "a", rows, lambda r: "A的回答" + r["id"])
    b = answers(tmp_path, "b", rows, lambda r: "B的回答" + r["id"])
    with ScriptedServer(lambda req, path: "Position one reads better.\nAssistant 1 is better than Assistant 2") as srv:
        o = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b))["stats"]["overall"]
    assert (o["win"], o["tie"], o["loss"]) == (0, 6, 0)  # each side won once, in first position

    def a_first_equal(req, path):  # A shown first: equal; B shown first: A (in second place) better
        one, _ = shown(req)
        return "Assistant 1 is equal to Assistant 2" if one.startswith("A") else "Assistant 2 is better than Assistant 1"

    with ScriptedServer(a_first_equal) as srv:
        summed = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b, out=str(tmp_path / "sum")))
        strict = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b, out=str(tmp_path / "strict"),
                                              combine="strict"))
    assert summed["stats"]["overall"]["win"] == 6      # tie + win sums to +1
    assert strict["stats"]["overall"]["tie"] == 6      # strict: the verdicts disagree


def test_garbled_verdicts_are_retried_then_unjudged(tmp_path):
    data, rows = questions(tmp_path)
    a = answers(tmp_path, "a", rows, lambda r: f"好的回答{r['id']}")
    b = answers(tmp_path, "b", rows, lambda r: f"差的回答{r['id']}")

    def handler(req, path):
        one, _ = shown(req)
        if "s1" in one:
            return "Both answers have merits."            # never a verdict
        if "s2" in one and len(req["messages"]) == 2:
            return "Assistant 1 is better than Assistant 1"  # garbled on the first ask only
        return good_judge(req, path)

    with ScriptedServer(handler) as srv:
        summary = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b))
        reqs = judge_requests(srv)
    s1 = [r for r in reqs if "s1" in shown(r)[0]]
    assert len(s1) == 6  # three asks in each order
    assert "valid verdict" in s1[-1]["messages"][-1]["content"]  # the re-ask nudges towards the line
    o = summary["stats"]["overall"]
    assert (o["win"], o["tie"], o["loss"], o["unjudged"]) == (5, 0, 0, 1)  # never counted as a win
    add_up(summary["stats"])
    assert any("unusable (no verdict line)" in u for u in summary["usage"])
    out = tmp_path / "out"
    pairs = {p["id"]: p for p in map(json.loads, (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines())}
    assert pairs["s1"]["outcome"] is None and pairs["s1"]["unjudged"] == "judge gave no usable verdict"
    assert pairs["s2"]["outcome"] == "win"
    rows1 = [j for j in map(json.loads, (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines())
             if j["id"] == "s1"]
    assert [j["ok"] for j in rows1] == [False, False] and rows1[0]["error"] == "no verdict line"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Unjudged (1, never counted as a win): s1" in report
    # rates of all six items, the unjudged one included: 5 / 0 / 0 / 1 of 6
    assert o["win_pct"] == 100.0 and o["win_pct_all"] == pytest.approx(500 / 6)
    assert o["unjudged_pct_all"] == pytest.approx(100 / 6)
    assert "| 1 | 83.3 / 0.0 / 0.0 / 16.7 |" in report


def test_interrupted_run_resumes_from_the_cache(tmp_path):
    data, rows = questions(tmp_path, 8)
    a = answers(tmp_path, "a", rows, lambda r: f"好的回答{r['id']}")
    b = answers(tmp_path, "b", rows, lambda r: f"差的回答{r['id']}")
    served = []

    def dies_after_five(req, path):
        if len(served) >= 5:
            return 401, {"error": {"message": "server gone", "type": "auth"}}
        served.append(1)
        return good_judge(req, path)

    with ScriptedServer(dies_after_five) as srv:
        with pytest.raises(LLMError):
            ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b, concurrency=1))
    with ScriptedServer(good_judge) as srv:
        first = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b, concurrency=1, resume=True))
        assert len(judge_requests(srv)) == 2 * 8 - 5  # only what the first run did not receive
    with ScriptedServer(good_judge) as srv:
        again = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b, resume=True))
        assert srv.requests == []  # a finished run reruns from the cache alone
        with pytest.raises(ev.UserError, match="already holds a run"):  # without --resume
            ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, b))
    assert first["stats"] == again["stats"] and again["stats"]["overall"]["win"] == 8


def test_endpoint_candidate_answers_once_across_comparisons(tmp_path):
    data, rows = questions(tmp_path)
    a = answers(tmp_path, "a", rows, lambda r: f"好的回答{r['id']}")

    def handler(req, path):
        if req["model"] == "cand-b":
            return f"差的回答{req['messages'][-1]['content'][1]}"
        return good_judge(req, path)

    shared = str(tmp_path / "answers")
    with ScriptedServer(handler) as srv:
        for out in ("one", "two"):
            ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, "", b_base_url=srv.base_url,
                                         b_model_name="cand-b", b_api_key="k", out=str(tmp_path / out),
                                         answers_dir=shared, max_new_tokens=64))
        cand = [body for _, body in srv.requests if body.get("model") == "cand-b"]
    assert len(cand) == len(rows)  # generated by the first comparison, read back by the second
    assert sorted(json.dumps(c["messages"], ensure_ascii=False) for c in cand) == sorted(
        json.dumps([{"role": "user", "content": r["query"]}], ensure_ascii=False) for r in rows)
    assert cand[0]["max_tokens"] == 64 and cand[0]["temperature"] == 0.0
    [store] = list((tmp_path / "answers").glob("cand-b-*.jsonl"))
    assert len(store.read_text(encoding="utf-8").splitlines()) == len(rows)


def test_answers_cut_before_their_end_are_reported(tmp_path):
    """A judge marks an unfinished answer down: the report says how many of a candidate's answers were cut."""
    data, rows = questions(tmp_path)
    a = answers(tmp_path, "a", rows, lambda r: f"好的回答{r['id']}")

    def handler(req, path):
        if req["model"] == "cand-b":
            i = int(req["messages"][-1]["content"][1])
            return completion(f"差的回答{i}", req, finish_reason="length" if i < 2 else "stop")
        return good_judge(req, path)

    with ScriptedServer(handler) as srv:
        summary = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, "", b_base_url=srv.base_url,
                                               b_model_name="cand-b", b_api_key="k", max_new_tokens=64))
    said = "cand-b: 2 of 6 answers cut before their end (2 at the length limit, --max-new-tokens 64)"
    assert said in summary["usage"] and said in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_an_endpoint_refusing_every_question_is_said_plainly(tmp_path, capsys):
    data, rows = questions(tmp_path, 3)
    a = answers(tmp_path, "a", rows, lambda r: f"好的回答{r['id']}")

    def handler(req, path):
        if req["model"] == "cand-b":
            return 400, {"error": {"message": "prompt + max_tokens exceed the context"}}, None
        return good_judge(req, path)

    with ScriptedServer(handler) as srv:
        summary = ev.run_pairwise(pairwise_cfg(tmp_path, srv, data, a, "", b_base_url=srv.base_url,
                                               b_model_name="cand-b", b_api_key="k"))
    assert summary["stats"]["overall"]["unjudged"] == 3
    assert "warning: cand-b gave no usable answer to any of the 3 items" in capsys.readouterr().err


def test_two_endpoints_serving_one_model_name_keep_their_own_answers(tmp_path):
    """serve.py on two ports, each with its own adapter merged, can advertise the same name: each side
    is named after it ("NAME (A)", "NAME (B)"), so B is asked, not answered from A's cached replies."""
    data, rows = questions(tmp_path, n=4)
    with ScriptedServer(lambda req, path: "好的回答：多休息") as ppo, \
            ScriptedServer(lambda req, path: "差的回答：去医院") as sft, ScriptedServer(good_judge) as judge:
        summary = ev.run_pairwise(pairwise_cfg(tmp_path, judge, data, "", "", a_base_url=ppo.base_url,
                                               a_model_name="Qwen2.5-0.5B", a_api_key="k", b_base_url=sft.base_url,
                                               b_model_name="Qwen2.5-0.5B", b_api_key="k"))
        assert len(sft.requests) == len(ppo.requests) == 4
    assert (summary["a"], summary["b"]) == ("Qwen2.5-0.5B (A)", "Qwen2.5-0.5B (B)")
    o = summary["stats"]["overall"]
    assert (o["win"], o["tie"], o["loss"]) == (4, 0, 0)


# ---------------------------------------------------------------- dialogue

CASES = [
    {"id": 1, "medical_case": "疾病：\n偏头痛\n病情描述：\n右侧太阳穴跳痛两年。熬夜后加重。\n希望获得的帮助：\n怎么办？\n"
                              "过敏史：\n无", "doctor_diagnosis": "病情摘要及初步印象：\n偏头痛\n总结建议：\n规律作息",
     "Department": "神经内科"},
    {"id": 2, "medical_case": "疾病：\n湿疹\n病情描述：\n手上起小水疱很痒。洗碗后加重。\n希望获得的帮助：\n用什么药？",
     "doctor_diagnosis": "病情摘要及初步印象：\n手部湿疹\n总结建议：\n戴手套，保湿", "Department": "皮肤科"},
    {"id": 3, "medical_case": "疾病：\n荨麻疹\n病情描述：\n身上起风团。一天内消退。\n希望获得的帮助：\n严重吗？",
     "doctor_diagnosis": "病情摘要及初步印象：\n荨麻疹\n总结建议：\n抗组胺药", "Department": "皮肤科"},
]
DIAGNOSIS = "考虑偏头痛，建议规律作息，必要时服用布洛芬。"


def cases_file(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(CASES, ensure_ascii=False), encoding="utf-8")
    return str(path)


def dialogue_handler(req, path):
    model, messages = req["model"], req["messages"]
    if model == "patient":
        return f"患者：我还是不舒服（第{len(messages) // 2}次说）。"
    if model == "doc-ask":
        return "请问还有别的症状吗？"
    if model == "doc-dx":  # one question first, then a diagnosis with advice
        return DIAGNOSIS if sum(m["role"] == "user" for m in messages) >= 2 else "请问多久了？"
    one, two = shown(req)
    verdict = "better than" if "考虑" in one and "考虑" not in two else \
        "worse than" if "考虑" in two and "考虑" not in one else "equal to"
    return f"Assistant 1 matches the real diagnosis.\nAssistant 1 is {verdict} Assistant 2"


def dialogue_cfg(tmp_path, srv, **kw):
    base = dict(data=cases_file(tmp_path), out=str(tmp_path / "dlg"), a_base_url=srv.base_url, a_model_name="doc-dx",
                a_api_key="k", b_base_url=srv.base_url, b_model_name="doc-ask", b_api_key="k", patient="endpoint",
                patient_base_url=srv.base_url, patient_model_name="patient", patient_api_key="k", judge="endpoint",
                judge_base_url=srv.base_url, judge_model_name="judge", judge_api_key="k", max_turns=3, bootstrap=100)
    return ev.DialogueConfig(**{**base, **kw})


def test_dialogue_stops_at_the_rule_and_at_the_turn_limit(tmp_path):
    with ScriptedServer(dialogue_handler) as srv:
        summary = ev.run_dialogue(dialogue_cfg(tmp_path, srv))
        reqs = srv.requests
    out = tmp_path / "dlg"
    transcripts = [json.loads(x) for x in (out / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(transcripts) == 6
    for t in transcripts:
        roles = [turn["role"] for turn in t["transcript"]]
        assert roles[::2] == ["patient"] * len(roles[::2]) and roles[1::2] == ["doctor"] * len(roles[1::2])
        assert "患者：" not in t["transcript"][0]["content"]  # the patient's own label is stripped
        if t["candidate"] == "doc-dx":
            assert (t["stopped"], t["doctor_turns"]) == ("diagnosis and advice", 2)
            assert t["transcript"][-1]["content"] == DIAGNOSIS
        else:
            assert (t["stopped"], t["doctor_turns"]) == ("turn limit", 3)
    patient = [b for _, b in reqs if b["model"] == "patient"]
    assert len(patient) == 3 * 2 + 3 * 3 - 3  # the openings (the case alone) are asked once, then cached
    assert all(b["messages"][0]["content"].count("病情描述") == 1 for b in patient)  # the patient sees its case
    doctors = [b for _, b in reqs if b["model"] in ("doc-dx", "doc-ask")]
    assert all("右侧太阳穴跳痛两年" not in json.dumps(b, ensure_ascii=False) for b in doctors)  # not revealed
    judges = judge_requests(srv)
    assert len(judges) == 6 and all("[Real Doctor's Diagnosis and Advice]" in j["messages"][1]["content"]
                                    for j in judges)
    stats = summary["stats"]
    assert (stats["overall"]["win"], stats["overall"]["n"]) == (3, 3)
    assert stats["groups"]["皮肤科"]["n"] == 2 and stats["groups"]["神经内科"]["n"] == 1
    add_up(stats)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| department |" in report and "diagnosis and advice: 3" in report and "turn limit: 3" in report
    assert "The judge saw the real doctor's diagnosis for 3 of 3 cases." in report

    with ScriptedServer(dialogue_handler) as srv:  # the "turns" rule runs every consultation to the limit
        ev.run_dialogue(dialogue_cfg(tmp_path, srv, out=str(tmp_path / "turns"), stop_rule="turns", max_turns=2))
    turns = [json.loads(x) for x in (tmp_path / "turns" / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {(t["stopped"], t["doctor_turns"]) for t in turns} == {("turn limit", 2)}


def test_doctor_turns_cut_before_their_end_are_reported(tmp_path):
    def handler(req, path):
        if req["model"] == "doc-cut":  # asks, and is cut at max_tokens every time
            return completion("请问还有别的症状", req, finish_reason="length")
        return dialogue_handler(req, path)

    with ScriptedServer(handler) as srv:
        summary = ev.run_dialogue(dialogue_cfg(tmp_path, srv, b_model_name="doc-cut", max_new_tokens=64))
    n = summary["items"]
    assert f"doc-cut: {n} of {n} consultations with a doctor turn cut before its end ({3 * n} turns, " \
           f"at --max-new-tokens 64 or a filter)" in summary["usage"]
    assert not any(u.startswith("doc-dx:") and "cut" in u for u in summary["usage"])


def test_patient_that_writes_both_sides_keeps_its_own_lines(tmp_path):
    def handler(req, path):
        if req["model"] == "patient":  # plays the whole consultation, the doctor's lines included
            return "病人：我头痛三天了。\n医生：你好，考虑偏头痛，建议休息。\n病人：好的谢谢。"
        return dialogue_handler(req, path)

    with ScriptedServer(handler) as srv:
        ev.run_dialogue(dialogue_cfg(tmp_path, srv, max_turns=2))
        doctors = [b for _, b in srv.requests if b["model"] in ("doc-dx", "doc-ask")]
    transcripts = [json.loads(x) for x in (tmp_path / "dlg" / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    said = {turn["content"] for t in transcripts for turn in t["transcript"] if turn["role"] == "patient"}
    assert said == {"我头痛三天了。"}
    assert doctors and all(m["content"] == "我头痛三天了。" for b in doctors for m in b["messages"] if m["role"] == "user")


def test_dialogue_resumes_without_requests(tmp_path):
    with ScriptedServer(dialogue_handler) as srv:
        first = ev.run_dialogue(dialogue_cfg(tmp_path, srv))
    with ScriptedServer(dialogue_handler) as srv:
        again = ev.run_dialogue(dialogue_cfg(tmp_path, srv, resume=True))
        assert srv.requests == []
    assert first["stats"] == again["stats"]


def test_stop_rule_and_offline_patient():
    assert consult.gives_diagnosis_and_advice("考虑湿疹，建议外用药膏。")
    assert not consult.gives_diagnosis_and_advice("考虑湿疹，建议外用药膏。还痒吗？")  # still asking
    assert not consult.gives_diagnosis_and_advice("建议多喝水。")                       # no diagnosis
    assert not consult.gives_diagnosis_and_advice("为了明确诊断，建议先做血常规检查，然后把结果告诉我。")  # asks
    assert consult.gives_diagnosis_and_advice("考虑胃肠炎，建议清淡饮食。还有其他问题吗？祝您早日康复！")  # courtesy
    assert consult.gives_diagnosis_and_advice("我简单说一下：考虑胃炎，建议清淡饮食，加重请随时告诉我。")
    assert not consult.gives_diagnosis_and_advice("考虑感冒，建议多喝水。有没有其他症状需要告诉我？")
    assert not consult.gives_diagnosis_and_advice("可能是湿疹。")                       # no advice
    patient = consult.OfflinePatient()
    case = {"medical_case": CASES[0]["medical_case"]}
    t, said = [], []
    for _ in range(5):
        [line] = patient.speak([case], [t])
        said.append(line)
        t += [{"role": "patient", "content": line}, {"role": "doctor", "content": "请问呢？"}]
    assert said[0] == "医生您好，右侧太阳穴跳痛两年。怎么办？"  # not the whole case at once
    assert said[1:3] == ["熬夜后加重。", "过敏史：无"]
    assert said[3] == said[4] == "没有别的情况了，请问我该怎么办？"


# ---------------------------------------------------------------- our own model as a candidate

TEXTS = ["头痛发热怎么办", "多喝水，注意休息", "建议及时就医", "手上起小水疱很痒", "考虑湿疹，建议外用药膏"] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("tiny"), TEXTS, vocab_size=300, max_seq_len=256).dir


def test_local_model_answers_are_generated_once(tmp_path, tiny, monkeypatch):
    data, rows = questions(tmp_path, 4)
    shared = str(tmp_path / "answers")
    cfg = dict(data=data, a_model=tiny, a_name="tiny", b_answers=answers(tmp_path, "b", rows, lambda r: "多喝水"),
             judge="offline", answers_dir=shared, max_new_tokens=8, device="cpu", bootstrap=50)
    first = ev.run_pairwise(ev.PairwiseConfig(out=str(tmp_path / "one"), **cfg))
    [store] = list((tmp_path / "answers").glob("tiny-*.jsonl"))
    made = [json.loads(x) for x in store.read_text(encoding="utf-8").splitlines()]
    assert [m["id"] for m in made] == [r["id"] for r in rows]
    assert all(m["finish_reason"] in ("stop", "length") for m in made)
    assert first["stats"]["overall"]["n"] == 4 and "offline" in first["judge"]

    def no_loading(*a, **k):
        raise AssertionError("the answers are in the store; the model must not be loaded again")

    monkeypatch.setattr(ans, "LocalModel", no_loading)
    again = ev.run_pairwise(ev.PairwiseConfig(out=str(tmp_path / "two"), **cfg))
    assert again["stats"] == first["stats"]
    report = (tmp_path / "two" / "report.md").read_text(encoding="utf-8")
    assert "deterministic similarity stand-in" in report
    # against a model of the same name: labelled by side in the report, the stored answers still its own (reused)
    both = {**cfg, "b_answers": "", "b_model": tiny, "b_name": "tiny"}
    twin = ev.run_pairwise(ev.PairwiseConfig(out=str(tmp_path / "three"), **both))
    assert (twin["a"], twin["b"]) == ("tiny (A)", "tiny (B)") and len(list((tmp_path / "answers").glob("*"))) == 1


def test_local_model_fits_prompts_to_the_context(tiny):
    import torch
    from nanohuatuo.templates import fit_prompt, render_prompt
    q = {"role": "user", "content": "头痛发热怎么办"}
    history = [q, {"role": "assistant", "content": "多喝水，注意休息" * 3}] * 3 + [q]
    cand = ans.Candidate(model=tiny, template="plain")
    probe = ans.LocalModel(cand, ans.GenerationSettings(max_new_tokens=8), torch.device("cpu"), torch.float32)
    budget = len(render_prompt([q], probe.tok, probe.template)) + 2  # the question fits, its history does not
    m = ans.LocalModel(cand, ans.GenerationSettings(max_new_tokens=256 - budget), torch.device("cpu"), torch.float32)
    assert m.budget == budget and m._prompt(history) == render_prompt([q], m.tok, m.template)
    assert m._prompt(history) == fit_prompt(history, m.tok, m.template, budget) and m.truncated == 0
    # a question longer than the budget keeps its tail, so the answer still has its room; it is counted
    long = [{"role": "user", "content": "手上起小水疱很痒" * 10}]
    assert m._prompt(long) == render_prompt(long, m.tok, m.template)[-budget:] and m.truncated == 1
    assert "1 prompts cut to fit the context" in m.summary()
    with pytest.raises(ValueError, match="--max-new-tokens 256 leaves no room for a prompt in a 256-token context"):
        ans.LocalModel(cand, ans.GenerationSettings(max_new_tokens=256), torch.device("cpu"), torch.float32)


def test_judge_and_patient_endpoints_need_their_flags(tmp_path):
    from nanohuatuo.cli import UserError
    cfg = ev.DialogueConfig(judge_base_url="http://127.0.0.1:9/v1", cache=str(tmp_path))
    with pytest.raises(UserError, match=r"the judge needs --judge-base-url URL and --judge-model-name NAME "
                                        r"\(or --judge offline"):
        ev.open_judge(cfg)
    with pytest.raises(UserError, match=r"the patient needs --patient-base-url URL and --patient-model-name NAME"):
        ev.open_patient(cfg)
    assert isinstance(ev.open_judge(ev.DialogueConfig(judge="offline")), ev.OfflineJudge)
    # a candidate's endpoint or model directory is checked before anything runs, naming its side's flags
    data, _ = questions(tmp_path)
    with pytest.raises(UserError, match=r"candidate a: an endpoint needs --a-base-url URL and --a-model-name NAME"):
        ev.run_pairwise(ev.PairwiseConfig(data=data, out=str(tmp_path / "o"), a_base_url="http://127.0.0.1:9/v1",
                                          b_answers="b.jsonl", judge="offline"))
    with pytest.raises(UserError, match=r"--b-model /nowhere: no such directory"):
        ev.run_pairwise(ev.PairwiseConfig(data=data, out=str(tmp_path / "o"), a_answers="a.jsonl", b_model="/nowhere",
                                          judge="offline"))


def test_adapter_candidate(tmp_path, tiny):
    import torch
    from nanohuatuo.lora import apply_lora, lora_modules, save_adapter
    from nanohuatuo.model import Transformer
    model = Transformer.from_pretrained(tiny)
    apply_lora(model, r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)  # a trained-looking adapter: its answers differ from the base's
    save_adapter(model, tmp_path / "adapter")
    data, rows = questions(tmp_path, 3)
    summary = ev.run_pairwise(ev.PairwiseConfig(
        data=data, a_model=tiny, a_adapter=str(tmp_path / "adapter"), b_model=tiny, b_name="base", judge="offline",
        out=str(tmp_path / "out"), max_new_tokens=6, device="cpu", bootstrap=20))
    assert summary["a"] == "adapter" and summary["stats"]["overall"]["n"] == 3
    pairs = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(p["answer_a"] != p["answer_b"] for p in pairs)


def test_a_quantised_candidate(tmp_path):
    """--a-quant int8: the candidate is our model loaded as chat and serve load it with --quant int8
    (its greedy answers are that model's), named and stored apart from the full-precision one;
    --a-quant on an endpoint, or an unknown value, is a one-line error."""
    import torch
    from nanohuatuo.cli import UserError
    from nanohuatuo.engine import Engine, SamplingParams
    from nanohuatuo.generate import load_for_inference
    from nanohuatuo.templates import render_prompt, stop_token_ids
    data, rows = questions(tmp_path, 3)
    tiny = tiny_base(tmp_path / "roomy", TEXTS, vocab_size=300, max_seq_len=1024).dir  # no prompt cut to fit
    summary = ev.run_pairwise(ev.PairwiseConfig(
        data=data, a_model=tiny, a_quant="int8", b_model=tiny, judge="offline", out=str(tmp_path / "out"),
        max_new_tokens=6, device="cpu", bootstrap=20))
    name = f"{Path(tiny).name}-int8"
    assert summary["a"] == name and summary["b"] == Path(tiny).name
    stores = sorted(p.name for p in (tmp_path / "out" / "answers").glob("*.jsonl"))
    assert len(stores) == 2 and stores[1].startswith(name + "-")
    model, tok, template = load_for_inference(tiny, None, torch.float32, "cpu", "int8", what="evaluation")
    prompts = [render_prompt([{"role": "user", "content": r["query"]}], tok, template) for r in rows]
    want = Engine(model, tokenizer=tok, slots=4).generate(
        prompts, SamplingParams(max_new_tokens=6, stop_ids=tuple(stop_token_ids(tok, template))))
    pairs = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["answer_a"] for p in pairs] == [tok.decode(o.tokens).strip() for o in want]
    from nanohuatuo.quant import Int8Linear
    loaded = ans.LocalModel(ans.Candidate(model=tiny, quant="int8"), ans.GenerationSettings(max_new_tokens=4),
                            torch.device("cpu"), torch.float32)
    assert any(isinstance(m, Int8Linear) for m in loaded.model.modules())  # (the tiny model's int8 answers are
    # float32's here, so the answers alone would not tell)
    with pytest.raises(UserError, match="--a-quant int8: only our model"):
        ev.side(ev.PairwiseConfig(a_base_url="http://127.0.0.1:9/v1", a_model_name="m", a_quant="int8"), "a")
    cand = ans.Candidate(model=tiny, quant="int4")
    with pytest.raises(ValueError, match="--quant int4: use one of none, int8, nf4"):  # load_for_inference's check
        ans.LocalModel(cand, ans.GenerationSettings(max_new_tokens=4), torch.device("cpu"), torch.float32)


def test_offline_dialogue_with_our_model(tmp_path, tiny):
    cfg = ev.DialogueConfig(data=cases_file(tmp_path), out=str(tmp_path / "dlg"), a_model=tiny, a_name="tiny",
                            b_model=tiny, b_name="tiny-again", judge="offline", patient="offline", max_turns=2,
                            max_new_tokens=6, device="cpu", bootstrap=50)
    summary = ev.run_dialogue(cfg)
    o = summary["stats"]["overall"]
    assert (o["n"], o["tie"]) == (3, 3)  # the same greedy model on both sides: identical transcripts
    transcripts = [json.loads(x) for x in (tmp_path / "dlg" / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(t["patient"].startswith("offline patient stand-in") for t in transcripts)
    assert all(1 <= t["doctor_turns"] <= 2 for t in transcripts)
    assert "offline patient stand-in" in (tmp_path / "dlg" / "report.md").read_text(encoding="utf-8")


def keeping(model, keep):
    """An opened candidate set to keep finished answers' keys (its default) or, as before, not."""
    model.keep_prefixes = keep
    return model


def test_consultations_keep_their_keys_between_turns(tmp_path, monkeypatch):
    """Our model consults batch_size cases at a time through all their turns, in one engine that keeps
    each conversation's keys: every turn after the first prefills only what the conversation added
    (the patient's words, the answer's retokenised tail), fewer tokens in all than a new engine per
    turn (before), with the same transcripts, stored batch by batch."""
    import nanohuatuo.engine as engine_mod
    counted, real, computed, prefill = [], engine_mod.forward, [], engine_mod.Engine._prefill
    monkeypatch.setattr(engine_mod, "forward",
                        lambda model, ids, *a: counted.append(ids.numel()) or real(model, ids, *a))
    # the prompt tokens each prefill computes, its padding left out
    monkeypatch.setattr(engine_mod.Engine, "_prefill", lambda self, items: computed.extend(
        len(g[0].prompt) - 1 - start for g, start in items) or prefill(self, items))
    # a context the consultations fit in (the tiny tokenizer spells Chinese in bytes), so none is cut from the front
    roomy = tiny_base(tmp_path / "roomy", TEXTS, vocab_size=300, max_seq_len=1024).dir
    cand, s = ans.Candidate(model=roomy, name="tiny"), ans.GenerationSettings(max_new_tokens=10)
    opened = consult.open_candidate

    def run(keep):
        counted.clear(), computed.clear()
        monkeypatch.setattr(consult, "open_candidate", lambda c, s, cfg: keeping(opened(c, s, cfg), keep))
        cfg = ev.DialogueConfig(answers_dir=str(tmp_path / f"keep{keep}"), max_turns=3, stop_rule="turns", batch_size=2,
                                device="cpu")
        summaries = []
        got = consult.consult(cand, s, CASES, consult.OfflinePatient(), cfg, summaries)
        return [g["transcript"] for g in got], sum(counted), summaries[0], sum(computed)

    (kept, kept_tokens, kept_says, kept_computed), (fresh, fresh_tokens, fresh_says, _) = run(True), run(False)
    assert kept == fresh and all(len(t) == 6 for t in kept)
    assert kept_tokens < fresh_tokens / 2
    # the summary counts the prompt tokens the kept keys saved: all but those the prefills computed and
    # each prompt's last token (the first decode step feeds it)
    said = re.search(r"([\d,]+) of ([\d,]+) prompt tokens from kept keys", kept_says)
    cached, prompts = (int(x.replace(",", "")) for x in said.groups())
    assert prompts - cached - 3 * len(CASES) == kept_computed and "kept keys" not in fresh_says
    [store] = (tmp_path / "keepTrue").glob("dialogue-*.jsonl")
    assert [json.loads(x)["id"] for x in store.read_text(encoding="utf-8").splitlines()] == [1, 2, 3]


def test_questions_reuse_the_system_prompts_keys(tmp_path, monkeypatch):
    """Single-turn answers from our model: one engine for the run keeps finished answers' keys, so a
    question admitted to a freed row prefills only what follows the system prompt, fewer tokens in
    all than engines that keep nothing, with the same answers; the summary counts the tokens saved."""
    import nanohuatuo.engine as engine_mod
    counted, real = [], engine_mod.forward
    monkeypatch.setattr(engine_mod, "forward",
                        lambda model, ids, *a: counted.append(ids.numel()) or real(model, ids, *a))
    roomy = tiny_base(tmp_path / "roomy", TEXTS, vocab_size=300, max_seq_len=1024).dir
    cand = ans.Candidate(model=roomy, name="tiny")
    s = ans.GenerationSettings(max_new_tokens=6, system="你是一名经验丰富的全科医生，请简明地回答患者的问题。")
    items = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"第{i}个问题：头痛发热怎么办"}]} for i in range(9)]
    opened, asked = ans.open_candidate, []

    def run(keep):  # keep: whether the engine keeps keys (what get_answers opened recorded in `asked`)
        counted.clear()

        def opening(c, s, cfg):
            model = opened(c, s, cfg)
            asked.append(model.keep_prefixes)
            return keeping(model, keep)
        monkeypatch.setattr(ans, "open_candidate", opening)
        cfg = ev.PairwiseConfig(answers_dir=str(tmp_path / f"keep{keep}"), batch_size=2, device="cpu")
        summaries = []
        got = ans.get_answers(cand, s, items, cfg, summaries)
        return got, sum(counted), summaries[0]

    (kept, kept_tokens, kept_says), (fresh, fresh_tokens, fresh_says) = run(True), run(False)
    assert asked == [True, True] and kept == fresh and all(kept)
    assert kept_tokens < fresh_tokens * 0.7, (kept_tokens, fresh_tokens)
    assert re.search(r"[\d,]+ of [\d,]+ prompt tokens from kept keys", kept_says) and "kept" not in fresh_says


def test_consult_bench_runs_both_ways(tmp_path, monkeypatch, capsys):
    """bench/consult.py on a tiny model, consultations and then questions: both runs' figures, the
    same transcripts (answers), the JSON written."""
    import sys
    from conftest import bench_module
    bench = bench_module("consult")
    roomy = tiny_base(tmp_path / "roomy", TEXTS, vocab_size=300, max_seq_len=1024).dir
    monkeypatch.setattr(sys, "argv", ["consult.py", "--model", roomy, "--data", cases_file(tmp_path), "--cases", "3",
                                      "--turns", "2", "--max-new-tokens", "6", "--batch-size", "2",
                                      "--out", str(tmp_path / "c.json")])
    bench.main()
    got = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    before, after = got["runs"]
    assert got["same_transcripts"] == 3 and before["transcripts"] == after["transcripts"]
    assert after["prefill_tokens"] < before["prefill_tokens"] and before["generated_tokens"] == after["generated_tokens"]
    assert "identical transcripts 3/3" in capsys.readouterr().out
    # --questions: single-turn answers under a system prompt, the same both ways
    data, _ = questions(tmp_path, 5)
    monkeypatch.setattr(sys, "argv", ["consult.py", "--model", roomy, "--questions", data, "--cases", "5",
                                      "--max-new-tokens", "6", "--batch-size", "2", "--out", str(tmp_path / "q.json")])
    bench.main()
    got = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))
    before, after = got["runs"]
    assert got["same_transcripts"] == 5 and before["transcripts"] == after["transcripts"] and all(after["transcripts"])
    assert before["cached_tokens"] == 0 < after["cached_tokens"] and after["prefill_tokens"] < before["prefill_tokens"]
    assert "identical answers 5/5" in capsys.readouterr().out


def test_metrics_run_scores_the_answers(tmp_path):
    qa = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": ref}],
           "source": "real_doctor_instructions"} for i, ref in enumerate(["多喝水，注意休息", "建议及时就医检查", "外用药膏"])]
    data = write_jsonl(tmp_path / "qa.jsonl", qa)
    given = ["多喝水休息", "建议就医", ""]
    ans = write_jsonl(tmp_path / "ans.jsonl", [{"id": f"r{i}", "answer": a} for i, a in enumerate(given)])
    summary = ev.run_metrics(ev.MetricsConfig(data=[data], answers=ans, out=str(tmp_path / "m")))
    expected = score_corpus(given, [q["messages"][1]["content"] for q in qa])
    assert summary["scores"] == pytest.approx(expected)
    assert summary["published"] is None
    report = (tmp_path / "m" / "report.md").read_text(encoding="utf-8")
    assert "| B1 | B2 | B3 | B4 | GLEU | R1 | R2 | RL | D1 | D2 |" in report


def test_metrics_score_against_every_reference(tmp_path):
    # Huatuo-26M: two doctors answered q0; cMedQA2 format keeps every answer of a question as well
    rows = [{"questions": ["头痛怎么办"], "answers": ["多喝水", "注意休息，多喝水"]},
            {"questions": ["发热怎么办"], "answers": ["及时就医"]}]
    data = write_jsonl(tmp_path / "h.jsonl", rows)
    ans = write_jsonl(tmp_path / "ans.jsonl", [{"id": "h-1", "answer": "多喝水"}, {"id": "h-2", "answer": "就医"}])
    summary = ev.run_metrics(ev.MetricsConfig(data=[data], answers=ans, out=str(tmp_path / "m")))
    expected = score_corpus(["多喝水", "就医"], [["多喝水", "注意休息，多喝水"], "及时就医"])
    assert summary["scores"] == pytest.approx(expected)
    assert summary["scores"]["rouge-l"] != pytest.approx(score_corpus(["多喝水", "就医"], ["多喝水\n\n注意休息，多喝水",
                                                                                       "及时就医"])["rouge-l"])
    assert summary["several_references"] == 1
    assert "1 answered items have several references" in (tmp_path / "m" / "report.md").read_text(encoding="utf-8")
    saved = [json.loads(x) for x in (tmp_path / "m" / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert saved[0]["references"] == ["多喝水", "注意休息，多喝水"] and saved[1]["references"] == ["及时就医"]


def test_metrics_with_our_model_and_the_published_table(tmp_path, tiny):
    rows = [{"questions": [f"头痛{i}怎么办"], "answers": ["多喝水，注意休息"]} for i in range(3)]
    data = write_jsonl(tmp_path / "huatuo26m_test.jsonl", rows)
    summary = ev.run_metrics(ev.MetricsConfig(data=[data], model=tiny, out=str(tmp_path / "m"), max_new_tokens=6,
                                              device="cpu"))
    assert summary["scored"] == 3 and summary["published"] == "huatuo26m-test"
    assert "HuatuoGPT (published) | 27.42 | 14.84" in (tmp_path / "m" / "report.md").read_text(encoding="utf-8")


def test_metrics_with_a_compiled_decode_step_gives_the_eager_answers(tmp_path, tiny, monkeypatch):
    """--compile reaches the engine that answers for our model (compiled on CPU: fused element-wise
    ops), and the greedy answers are the eager ones."""
    import nanohuatuo.engine as engine_mod
    built, real = [], engine_mod.Engine

    def engine(*a, **k):
        built.append(k["compile"])
        return real(*a, **k)

    monkeypatch.setattr(engine_mod, "Engine", engine)
    rows = [{"questions": [f"头痛{i}怎么办"], "answers": ["多喝水，注意休息"]} for i in range(3)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    answers = {}
    for compile in (False, True):
        out = tmp_path / f"compile{compile}"
        ev.run_metrics(ev.MetricsConfig(data=[data], model=tiny, out=str(out), max_new_tokens=6, device="cpu",
                                        batch_size=2, compile=compile))
        [store] = (out / "answers").glob("*.jsonl")
        answers[compile] = [json.loads(x)["answer"] for x in store.read_text(encoding="utf-8").splitlines()]
    assert built == [False, True]  # one engine per run, 3 answers over 2 slots
    assert answers[True] == answers[False] and len(answers[True]) == 3


def test_qa_readers_reuse_the_data_converters(tmp_path):
    h = write_jsonl(tmp_path / "h.jsonl", [{"questions": [["头痛怎么办", "头疼咋办"]], "answers": ["多休息"]}])
    [item] = load_qa([h])
    assert item["messages"] == [{"role": "user", "content": "头痛怎么办"}] and item["reference"] == "多休息"
    (tmp_path / "questions.csv").write_text("question_id,content\n1,头痛怎么办\n2,发热怎么办\n", encoding="utf-8")
    (tmp_path / "answers.csv").write_text("ans_id,question_id,content\n7,1,多休息\n8,2,多喝水\n", encoding="utf-8")
    items = load_qa([str(tmp_path / "questions.csv"), str(tmp_path / "answers.csv")])
    assert [i["reference"] for i in items] == ["多休息", "多喝水"]
    assert [i["references"] for i in items] == [["多休息"], ["多喝水"]]
    # several doctors' answers: every one is a reference (Huatuo-26M row, cMedQA2 question)
    h2 = write_jsonl(tmp_path / "h2.jsonl", [{"questions": ["头痛怎么办"], "answers": ["多休息", "必要时吃止痛药"]}])
    assert load_qa([h2])[0]["references"] == ["多休息", "必要时吃止痛药"]
    (tmp_path / "answers.csv").write_text("ans_id,question_id,content\n7,1,多休息\n8,2,多喝水\n9,1,查血压\n",
                                          encoding="utf-8")
    items = load_qa([str(tmp_path / "questions.csv"), str(tmp_path / "answers.csv")])
    assert [i["reference"] for i in items] == ["多休息", "多喝水"]
    assert [i["references"] for i in items] == [["多休息", "查血压"], ["多喝水"]]
    (tmp_path / "cmd.csv").write_text("department,title,ask,answer\n内科,头痛,无,多休息\n", encoding="utf-8")
    [item] = load_qa([str(tmp_path / "cmd.csv")])
    assert item["messages"][0]["content"] == "头痛" and item["department"] == "内科"
    with pytest.raises(DataError, match="pass both files"):
        load_qa([str(tmp_path / "questions.csv")])



def test_one_case_reader_for_evaluate_and_distill(tmp_path):
    # evaluate.py dialogue (strict): ids given and unique, a diagnosis to judge against
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES, ensure_ascii=False), encoding="utf-8")
    got = load_cases(str(cases))
    assert [(c["id"], c["group"]) for c in got] == [("1", "神经内科"), ("2", "皮肤科"),
                                                    ("3", "皮肤科")]
    assert got[1]["medical_case"] == CASES[1]["medical_case"] and got[1]["doctor_diagnosis"] == CASES[1]["doctor_diagnosis"]
    assert load_cases(str(cases), limit=2) == got[:2]
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"medical_case": "头痛", "Department": " 内科 "}])
    with pytest.raises(DataError, match=r"bare\.jsonl:1: case needs an 'id'"):
        load_cases(bare)
    twice = write_jsonl(tmp_path / "twice.jsonl", [CASES[0], CASES[0]])
    with pytest.raises(DataError, match="appears twice"):
        load_cases(twice)
    # distill.py conversations (lenient): ids from the file's name, no diagnosis needed, schema rows too
    row = {"id": "r1", "messages": [{"role": "user", "content": "咳嗽"}, {"role": "assistant", "content": "多喝水"}],
           "source": "other", "department": "内科"}
    schema = write_jsonl(tmp_path / "rows.jsonl", [row])
    [a, b] = load_cases([bare, schema], strict=False)
    assert (a["id"], a["department"], a["doctor_diagnosis"]) == ("bare-1", " 内科 ", "")
    assert (b["id"], b["medical_case"], b["doctor_diagnosis"], b["group"]) == ("r1", "咳嗽", "多喝水", "内科")


# ---------------------------------------------------------------- sheet and tally

def test_sheet_tally_round_trip_reproduces_marks_and_kappa(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    judge = ["win", "tie", "tie", "loss", "win", "win"]
    human = ["win", "win", "tie", "loss", "loss", "win"]
    pairs = [{"id": f"s{i}", "group": "g", "prompt": f"问题{i}", "reference": "", "answer_a": f"甲答{i}",
              "answer_b": f"乙答{i}", "outcome": o} for i, o in enumerate(judge)]
    write_jsonl(src / "pairs.jsonl", pairs)
    (src / "summary.json").write_text(json.dumps({"mode": "pairwise", "a": "model-a", "b": "model-b",
                                                  "judge": "judge-x"}), encoding="utf-8")
    ev.make_sheet(ev.SheetConfig(source=str(src), out=str(tmp_path / "sheet"), seed=3))
    sheet = tmp_path / "sheet"
    page = (sheet / "sheet.html").read_text(encoding="utf-8")
    assert "model-a" not in page and "model-b" not in page  # blind
    assert all(f"甲答{i}" in page and f"乙答{i}" in page for i in range(6))
    key = json.loads((sheet / "sheet_key.json").read_text(encoding="utf-8"))["items"]
    assert sorted(k["id"] for k in key) == [p["id"] for p in pairs]
    assert [k["id"] for k in key] != [p["id"] for p in pairs] or len({k["left"] for k in key}) == 2  # shuffled
    with open(sheet / "sheet.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    truth = dict(zip((p["id"] for p in pairs), human))
    for row, k in zip(rows, key):
        want = truth[k["id"]]
        left_wins = (want == "win") == (k["left"] == "A")
        assert (row["answer_1"].startswith("甲")) == (k["left"] == "A")
        row["mark"] = "=" if want == "tie" else ("1" if left_wins else "2")
    with open(tmp_path / "marks.csv", "w", encoding="utf-8-sig", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "rater2.csv").write_text("item,mark\n1,left\n2,\n", encoding="utf-8")  # the page's download format
    result = ev.run_tally(ev.TallyConfig(sheet=str(sheet), marks=[str(tmp_path / "marks.csv"), str(tmp_path / "rater2.csv")]))
    r = result["raters"][0]
    assert (r["win"], r["tie"], r["loss"], r["marked"], r["unmarked"]) == (3, 1, 2, 6, 0)
    assert r["agreement"] == pytest.approx(100 * 4 / 6)
    assert r["kappa"] == pytest.approx(11 / 23)  # po = 4/6, pe = 13/36, by hand
    assert result["raters"][1]["marked"] == 1 and result["raters"][1]["unmarked"] == 5
    assert "| marks.csv | 6 | 3 / 1 / 2 | 6 | 66.7 | 0.478 |" in (sheet / "tally.md").read_text(encoding="utf-8")
    (tmp_path / "bad.csv").write_text("item,mark\n1,maybe\n", encoding="utf-8")
    with pytest.raises(ev.UserError, match="bad.csv:2"):
        ev.run_tally(ev.TallyConfig(sheet=str(sheet), marks=[str(tmp_path / "bad.csv")]))
    # each sheet has its id, in the page's storage key and in its CSV rows: another sheet's marks are refused
    sheet_id = json.loads((sheet / "sheet_key.json").read_text(encoding="utf-8"))["sheet_id"]
    assert f"const SHEET='{sheet_id}'" in page and {row["sheet"] for row in rows} == {sheet_id}
    ev.make_sheet(ev.SheetConfig(source=str(src), out=str(tmp_path / "again"), seed=4))
    other = json.loads((tmp_path / "again" / "sheet_key.json").read_text(encoding="utf-8"))["sheet_id"]
    assert other != sheet_id
    with pytest.raises(ev.UserError, match=f"marks.csv:2: marks of sheet {sheet_id}, not of this one \\({other}\\)"):
        ev.run_tally(ev.TallyConfig(sheet=str(tmp_path / "again"), marks=[str(tmp_path / "marks.csv")]))


def test_answers_only_run_makes_a_sheet(tmp_path):
    data, rows = questions(tmp_path, 3)
    a = answers(tmp_path, "a", rows, lambda r: "甲" + r["id"])
    b = answers(tmp_path, "b", rows, lambda r: "乙" + r["id"])
    summary = ev.run_pairwise(ev.PairwiseConfig(data=data, a_answers=a, b_answers=b, judge="none",
                                                out=str(tmp_path / "run")))
    assert summary["judge"] is None and not (tmp_path / "run" / "judgements.jsonl").exists()
    ev.make_sheet(ev.SheetConfig(source=str(tmp_path / "run"), out=str(tmp_path / "sheet")))
    (tmp_path / "m.csv").write_text("item,mark\n1,1\n2,=\n3,2\n", encoding="utf-8")
    result = ev.run_tally(ev.TallyConfig(sheet=str(tmp_path / "sheet"), marks=[str(tmp_path / "m.csv")]))
    r = result["raters"][0]
    assert (r["win"] + r["loss"], r["tie"], r["compared"], r["agreement"]) == (2, 1, 0, None)


def test_cohen_kappa_edges():
    assert cohen_kappa(["win", "loss"], ["win", "loss"]) == pytest.approx(1.0)
    assert cohen_kappa(["win", "win"], ["win", "win"]) is None  # chance agreement 1: undefined
    assert cohen_kappa([], []) is None


def test_fleiss_kappa_textbook_case():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories; P = 0.378, Pe = 0.213
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    p = sum((sum(c * c for c in row) - 14) / (14 * 13) for row in counts) / 10
    pe = sum((sum(col) / 140) ** 2 for col in zip(*counts))
    assert (round(p, 3), round(pe, 3)) == (0.378, 0.213)
    assert fleiss_kappa(counts) == pytest.approx((p - pe) / (1 - pe)) and round(fleiss_kappa(counts), 3) == 0.210
    assert fleiss_kappa([[2, 0, 0], [0, 0, 2]]) == pytest.approx(1.0)
    assert fleiss_kappa([[3, 0, 0], [3, 0, 0]]) is None and fleiss_kappa([]) is None  # chance agreement 1; no items
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[2, 0, 0], [1, 0, 0]])


def test_majority_reports_a_tie_in_the_vote():
    assert majority(["win", "win", "tie"]) == "win"
    assert majority(["tie", "loss", "loss", "win"]) == "loss"  # the most votes, not more than half
    assert majority(["win", "loss"]) == "no majority" and majority(["win", "tie", "loss"]) == "no majority"
    assert majority([]) is None


def test_tally_of_three_raters_gives_fleiss_kappa_and_outcome_by_vote(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    pairs = [{"id": f"s{i}", "group": "g", "prompt": f"问题{i}", "reference": "", "answer_a": f"甲{i}",
              "answer_b": f"乙{i}", "outcome": "win"} for i in range(4)]
    write_jsonl(src / "pairs.jsonl", pairs)
    (src / "summary.json").write_text(json.dumps({"mode": "pairwise", "a": "A", "b": "B", "judge": "j"}),
                                      encoding="utf-8")
    ev.make_sheet(ev.SheetConfig(source=str(src), out=str(tmp_path / "sheet"), seed=1))
    key = json.loads((tmp_path / "sheet" / "sheet_key.json").read_text(encoding="utf-8"))["items"]
    wanted = {"s0": ["win", "win", "win"], "s1": ["win", "tie", "loss"], "s2": ["loss", "loss", "tie"],
              "s3": ["tie", "tie", None]}  # the third rater left s3 blank
    files = []
    for r in range(3):
        lines = ["item,mark"]
        for k in key:
            o = wanted[k["id"]][r]
            mark = "" if o is None else "=" if o == "tie" else "1" if (o == "win") == (k["left"] == "A") else "2"
            lines.append(f"{k['item']},{mark}")
        files.append(tmp_path / f"rater{r}.csv")
        files[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = ev.run_tally(ev.TallyConfig(sheet=str(tmp_path / "sheet"), marks=[str(f) for f in files]))
    # by hand over s0-s2, votes W/T/L 3/0/0, 1/1/1, 0/1/2: P = (1 + 0 + 1/3) / 3 = 4/9, Pe = (16 + 4 + 9) / 81
    b = result["between"]
    assert (b["raters"], b["items"]) == (3, 3) and b["fleiss_kappa"] == pytest.approx(7 / 52)
    assert b["majority"] == {"win": 1, "tie": 1, "loss": 1, "no majority": 1}
    by_id = {it["id"]: it for it in result["items"]}
    assert {i: it["majority"] for i, it in by_id.items()} == {"s0": "win", "s1": "no majority", "s2": "loss",
                                                              "s3": "tie"}
    assert (by_id["s3"]["win"], by_id["s3"]["tie"], by_id["s3"]["loss"]) == (0, 2, 0)
    md = (tmp_path / "sheet" / "tally.md").read_text(encoding="utf-8")
    assert "Fleiss' kappa 0.135 over the 3 items all of them marked" in md
    assert "1 win / 1 tie / 1 loss / 1 no majority" in md
    item = next(k["item"] for k in key if k["id"] == "s1")
    assert f"| {item} | s1 | 1 / 1 / 1 | no majority | win |" in md
    assert json.loads((tmp_path / "sheet" / "tally.json").read_text(encoding="utf-8"))["between"] == b
    one = ev.run_tally(ev.TallyConfig(sheet=str(tmp_path / "sheet"), marks=[str(files[0])]))
    assert one["between"] is None and "Fleiss" not in (tmp_path / "sheet" / "tally.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- pieces

def test_parse_verdict():
    assert ev.parse_verdict("reasons...\n**Assistant 2 is better than Assistant 1**") == "2"
    assert ev.parse_verdict("assistant 1 is worse than assistant 2") == "2"
    assert ev.parse_verdict("Ａｓｓｉｓｔａｎｔ 1 is equal to Assistant 2") == "tie"  # full-width
    assert ev.parse_verdict("Assistant 1 is better than Assistant 2 in tone, but\nAssistant 1 is worse than "
                            "Assistant 2") == "2"  # the last one counts
    assert ev.parse_verdict("reasons\n**Assistant 1 is worse than Assistant 2.**\n\n---\n") == "2"  # a rule after it
    assert ev.parse_verdict("So, overall, Assistant 2 is better than Assistant 1.") == "2"  # a lead-in is fine
    for fine in ("Overall, with no major errors in either answer, Assistant 1 is better than Assistant 2.",
                 "In summary, Assistant 1 is better than Assistant 2 because it does not recommend antibiotics.",
                 "Verdict (no ties allowed): Assistant 1 is better than Assistant 2 (but both are safe).",
                 "**Final Verdict:** ✅ Assistant 1 is better than Assistant 2",
                 "综上所述，不论是准确性还是安全性，Assistant 1 is better than Assistant 2"):
        assert ev.parse_verdict(fine) == "1", fine
    for bad in ("I prefer the first.", "Assistant 1 is better than Assistant 1", "",
                # the last line is not one of the three sentences: a verdict-like phrase above it is reasoning
                "Assistant 2 is better than Assistant 1 at listing the symptoms.\n"
                "Final verdict: Assistant 1 is slightly better than Assistant 2",
                "The options are 'Assistant 1 is better than Assistant 2' or 'Assistant 1 is worse than "
                "Assistant 2'.\nI cannot decide.",
                "Assistant 1 is better than Assistant 2 in safety; overall Assistant 1 is worse than Assistant 2",
                # options ticked, or a sentence the line qualifies: the sentence is not what the line says
                "- [ ] Assistant 1 is better than Assistant 2\n- [x] Assistant 1 is worse than Assistant 2\n"
                "- [ ] Assistant 1 is equal to Assistant 2",
                "I cannot say Assistant 1 is better than Assistant 2; they are equally good.",
                "While Assistant 1 is better than Assistant 2 in detail, it gives an unsafe dose, so Assistant 2 "
                "wins."):
        with pytest.raises(ValueError):
            ev.parse_verdict(bad)


def test_combine_rules():
    assert combine("A", "A") == "win" and combine("B", "tie") == "loss" and combine("A", "B") == "tie"
    assert combine("A", "tie", "strict") == "tie" and combine("B", "B", "strict") == "loss"


def test_offline_judge_is_symmetric():
    j = ev.OfflineJudge()
    req = lambda x, y: {"shown": (x, y), "reference": "头痛发热，多喝水", "reference_name": "question"}
    v1, v2 = j.judge([req("头痛发热要多喝水", "天气很好"), req("天气很好", "头痛发热要多喝水")])
    assert (v1.value, v2.value) == ("1", "2") and "stand-in" in v1.text


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert ev.main(["bogus"]) == 2
    assert ev.main(["pairwise", "--data", str(tmp_path / "none.json"), "--a-answers", "x", "--b-answers", "y",
                    "--judge", "offline", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bogus'" in err and "none.json: no such file" in err and "Traceback" not in err
    assert ev.main(["pairwise", "--a-model", "m", "--a-base-url", "http://x/v1", "--b-answers", "y",
                    "--judge", "offline", "--out", str(tmp_path / "o")]) == 2
    assert "got model and endpoint" in capsys.readouterr().err
    data, _ = questions(tmp_path)
    assert ev.main(["pairwise", "--data", data, "--a-answers", "x", "--b-answers", "y", "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert ev.main(["--help"]) == 0 and "pairwise" in capsys.readouterr().out


def test_answer_store_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "1", "hash": "h", "answer": "x"}\n{"id": "2", "ha', encoding="utf-8")  # killed mid-write
    store = ans.AnswerStore(path)
    assert list(store.rows) == [("1", "h")]
    store.add([{"id": "2", "hash": "h", "answer": "y"}])
    assert [k for k in ans.AnswerStore(path).rows] == [("1", "h"), ("2", "h")]


def test_answer_store_reads_back_an_answer_holding_a_line_separator(tmp_path):
    """JSON keeps U+2028 raw in a line; reading the store with splitlines() cut such a row in two and
    made every later --resume fail. Rows are split at newlines only."""
    from nanohuatuo.answers import AnswerStore
    store = AnswerStore(tmp_path / "a.jsonl")
    store.add([{"id": "q1", "hash": "h", "answer": "多休息\u2028多喝水"},
               {"id": "q2", "hash": "h", "answer": "好"}])
    again = AnswerStore(tmp_path / "a.jsonl")
    assert again.get("q1", "h")["answer"] == "多休息\u2028多喝水" and again.get("q2", "h")["answer"] == "好"
