"""distill.py against a scripted OpenAI-compatible server (the real openai client): the three
commands write schema rows train_sft.py reads; near-duplicates, bad items and malformed replies are
dropped and counted; conversations stop at the turn limit and at the stop rule; polishing keeps
the original and flags lost drug names and numbers; an interrupted run resumes from the cache
without repeating a request. Also the exact indexed ROUGE-L against brute force."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import write_jsonl
from fake_openai import ScriptedServer
import nanohuatuo.distill as D
import nanohuatuo.textcheck as TC
import nanohuatuo.textmetrics as TM
from nanohuatuo.data import SOURCES, load_conversations

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not see loopback calls


# ---------------------------------------------------------------- ROUGE-L


def lcs_dp(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_equals_dynamic_programming():
    rng = random.Random(0)
    for _ in range(1500):
        a = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 70)))
        assert TM.lcs_length(a, b) == lcs_dp(a, b), (a, b)
    assert TM.rouge_l("孩子发烧怎么办？", "孩子发烧怎么办") == 1.0  # punctuation does not count
    assert TM.rouge_l("ABC", "abd") == pytest.approx(2 / 3)


def edit(rng, text, alphabet):
    chars = list(text)
    for _ in range(rng.randint(0, 4)):
        p = rng.randrange(len(chars) + 1)
        op = rng.random()
        if op < 0.4:
            chars.insert(p, rng.choice(alphabet))
        elif chars and op < 0.8:
            del chars[min(p, len(chars) - 1)]
        elif chars:
            chars[min(p, len(chars) - 1)] = rng.choice(alphabet)
    return "".join(chars)


@pytest.mark.parametrize("threshold", [0.7, 0.5, 0.9])
def test_rouge_index_equals_brute_force(threshold):
    rng = random.Random(threshold)
    hits = 0
    for trial in range(12):
        alphabet = "的了是病痛医药吃天次孩子发烧咳嗽头疼怎么办？ ，"[: rng.randint(4, 24)]
        index, kept = TM.RougeIndex(threshold), []
        for _ in range(120):  # enough to rebuild the index (frozen character order) three times
            if kept and rng.random() < 0.5:
                text = edit(rng, rng.choice(kept), alphabet)
            else:
                text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
            scores = [TM.rouge_l(text, k) for k in kept]
            best = max(range(len(kept)), key=lambda i: (scores[i], -i), default=None)
            got = index.match(text)
            if best is not None and scores[best] > threshold:
                assert got == (best, scores[best]), (text, got)
                hits += 1
            else:
                assert got is None, (text, got)
            if rng.random() < 0.7:
                index.add(text)
                kept.append(text)
    assert hits > 100  # the comparison exercised many matches, not just misses


def test_rouge_filter_keeps_exactly_the_threshold_like_self_instruct():
    # Self-Instruct drops an instruction when max ROUGE-L > 0.7 (bootstrap_instructions.py), keeps it at 0.7
    kept = "孩子发烧三天了怎么办"
    at = "孩子发烧三天了吃啥药"  # LCS 孩子发烧三天了 = 7 of 10 and 10: F = 14 / 20
    above = "孩子发烧三天了吃药"  # LCS 7 of 10 and 9: F = 14 / 19
    assert TM.rouge_l(kept, at) == 0.7 and TM.rouge_l(kept, above) == 14 / 19
    index = TM.RougeIndex(0.7)
    index.add(kept)
    assert index.match(at) is None
    assert index.match(above) == (0, 14 / 19)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        TM.RougeIndex(1.0)  # nothing scores above 1: a filter that drops nothing


def test_rouge_index_runs_few_lcs_on_thousands():
    # Zipf-distributed characters over 2,000 like real Chinese text: common ones everywhere
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(2000)]
    weights = [1 / (r + 1) for r in range(len(chars))]
    texts = ["".join(rng.choices(chars, weights, k=rng.randint(12, 40))) for _ in range(2500)]
    texts += [edit(rng, rng.choice(texts), chars) for _ in range(500)]  # near-duplicates
    index = TM.RougeIndex(0.7)
    t0 = time.perf_counter()
    dropped = 0
    for text in texts:
        if index.match(text):
            dropped += 1
        else:
            index.add(text)
    seconds = time.perf_counter() - t0
    pairs = len(texts) * (len(texts) - 1) / 2
    print(f"{len(texts)} texts: {dropped} near-duplicates, {index.checked} exact LCS "
          f"({index.checked / pairs:.3%} of pairs), {seconds:.1f}s")
    assert dropped >= 400
    assert index.checked < 0.001 * pairs  # brute force would run an LCS for every pair
    assert seconds < 30  # about 1 s on one core


# ---------------------------------------------------------------- filters and checks


def test_instruction_filters_and_parsers():
    assert TC.instruction_problem("头痛？") == "too short"
    assert TC.instruction_problem("孩" * 201) == "too long"
    assert TC.instruction_problem("What should I do about a bad headache?") == "not Chinese"
    assert TC.instruction_problem("作为一个AI，我无法回答这个问题。") == "refusal"
    assert TC.instruction_problem("请根据这张化验单照片解释各项指标。") == "needs a picture or file"
    assert TC.instruction_problem("，孩子发烧三天了怎么办") == "starts with punctuation"
    assert TC.instruction_problem("孩子发烧三天，CT正常，需要住院吗？") is None
    reply = "好的，以下是新的指令：\n1. 孩子发烧怎么办？\n2、“湿疹能根治吗”\n（3）指令：请解释高血压的分级\n"
    assert D.parse_instructions(reply) == ["孩子发烧怎么办？", "湿疹能根治吗", "请解释高血压的分级"]
    with pytest.raises(ValueError, match="no numbered"):
        D.parse_instructions("我想不出来。")
    # a preamble that opens with a number is not an item; an item wrapped onto an indented line is whole
    reply = ("10 条新的指令如下：\n1. 我妈妈今年65岁，有高血压十年，\n   最近经常头晕，需要换药吗？\n2. 孩子发烧了\n"
             "3 小时又烧起来了，怎么办？\n\n以上指令供参考。")
    assert D.parse_instructions(reply) == ["我妈妈今年65岁，有高血压十年，最近经常头晕，需要换药吗？", "孩子发烧了"]
    assert D.parse_instructions("1. 孩子发烧39度该怎么办？\n   - 类型：症状咨询\n2. Which tests confirm\n   type 2 "
                                "diabetes?") == ["孩子发烧39度该怎么办？", "Which tests confirm type 2 diabetes?"]
    # a rewrite's own preamble and closing note are not the reply; an apology of empathy is not a refusal
    for reply in ("好的，以下是改写后的回复：\n\n您好，多休息。", "**改写后的回复：**\n您好，多休息。",
                  "您好，多休息。\n\n（改写说明：语气更温和）"):
        assert D.parse_polished(reply) == "您好，多休息。"
    for reply in ("您好，多休息。\n注：如出现高热不退，请立即就医。", "下面我说一下用药方法，每次2片：\n早晚各一次。"):
        assert D.parse_polished(reply) == reply  # the reply's own note and opening line are kept
    assert D.parse_answer("很抱歉，我理解您的焦虑。头痛三天建议测血压。").startswith("很抱歉")
    with pytest.raises(ValueError, match="refusal"):
        D.parse_answer("很抱歉，我无法提供诊断。")
    assert D.parse_patient("患者：医生，我头疼。") == ("医生，我头疼。", False)
    assert D.parse_patient("谢谢医生！" + D.END_MARK) == ("谢谢医生！", True)
    assert D.parse_patient("谢谢医生！（问诊结束）") == ("谢谢医生！", True)
    for said in ("谢谢医生（问诊结束）", "谢谢医生[问诊结束]", "谢谢医生，问诊结束。", "谢谢医生**问诊结束**"):
        assert D.parse_patient(said) == ("谢谢医生", True), said
    assert D.parse_doctor("请问您发烧吗？等问诊结束后我会给您开检查单。") == \
        ("请问您发烧吗？等问诊结束后我会给您开检查单。", False)  # a mention of it is not the mark
    # the other side's lines are cut where they start, mid-line or behind a decorated tag
    assert D.parse_patient("医生您好，我头痛三天了。医生：请问发烧吗？患者：没有。") == ("医生您好，我头痛三天了。", False)
    assert D.parse_patient("**患者**：我头痛。\n**医生**：发烧吗？") == ("我头痛。", False)
    assert D.parse_patient("患者（张女士）：我头痛。\n医生（李医生）：发烧吗？") == ("我头痛。", False)
    assert D.parse_doctor("医生：多大年纪？\n患者：三十岁。") == ("多大年纪？", False)
    assert TC.own_lines("病人 : 我头痛三天了。\n\n医生：你好。\n病人：谢谢。", "patient") == "我头痛三天了。"
    assert TC.own_lines("家属：孩子咳嗽，医生：这句是转述。", "patient") == "孩子咳嗽，医生：这句是转述。"  # not a new line
    with pytest.raises(ValueError, match="empty turn"):
        D.parse_doctor(D.END_MARK)
    with pytest.raises(ValueError, match="refusal"):
        D.parse_answer("很抱歉，我无法提供医疗建议。")


def test_fact_check_drug_names_and_numbers():
    original = "考虑手部湿疹。丁酸氢化可的松乳膏薄涂，一天两次，痒得厉害加一片氯雷他定，用7天。"
    kept = "您好，考虑是手部湿疹。\n1. 丁酸氢化可的松乳膏薄薄涂一层，每天2次；\n2. 特别痒时加服氯雷他定，连用七天。"
    assert TC.fact_check(original, kept) == {"missing": [], "added": []}  # 两次 = 2次, list markers ignored
    lost = "您好，考虑是手部湿疹，抹点药膏，每天两次，痒就吃点抗过敏药，用7天。"
    assert TC.fact_check(original, lost) == {"missing": ["氢化可的松", "氯雷他定"], "added": []}
    changed = "考虑手部湿疹。丁酸氢化可的松乳膏每天三次，加氯雷他定和西替利嗪，用7天。"
    assert TC.fact_check(original, changed) == {"missing": ["2"], "added": ["西替利嗪", "3"]}
    assert TC.drug_terms("换一种他汀，或者口服磷霉素") == {"他汀", "磷霉素"}  # names the list lacks, by ending
    assert TC.numbers("每次0.5片，半年复查，血压150/95") == {"0.5", "150", "95"}


def test_seeds_cover_departments_and_roles():
    seeds = D.load_seeds(ROOT / "data" / "distill_seeds.jsonl")
    assert 30 <= len(seeds) <= 60
    assert {s["department"] for s in seeds} == set(D.DEPARTMENTS)
    assert {s["role"] for s in seeds} == set(D.ROLES)
    for s in seeds:
        assert TC.instruction_problem(s["instruction"]) is None, s
    index = TM.RougeIndex(0.7)
    for s in seeds:  # the seeds are no near-duplicates of one another
        assert index.match(s["instruction"]) is None
        index.add(s["instruction"])


# ---------------------------------------------------------------- the scripted endpoint


def kind(request):
    first = request["messages"][0]["content"]
    if first == D.ANSWER_SYSTEM:
        return "answer"
    if first.startswith(D.PATIENT_SYSTEM[:20]):
        return "patient"
    if first.startswith(D.DOCTOR_SYSTEM[:12]):
        return "doctor"
    if first.startswith(D.INSTRUCTION_PROMPT[:20]):
        return "generate"
    if first.startswith(D.POLISH_PROMPT[:20]):
        return "polish"
    raise AssertionError(f"unexpected request {first[:40]!r}")


def question(rng):
    """A random Chinese question, no near-duplicate of another (2,000 possible characters)."""
    return "".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(14)) + "？"


BAD_ITEMS = ["头痛？", "What should I do about a bad headache after running?", "作为一个AI，我无法回答这个问题。"]


def generate_reply(request):
    """Three fresh questions, a near-copy of the first, and one more per the request's seed: a
    near-copy of a seed shown in the prompt, or a too-short, English or refusing instruction."""
    rng = random.Random(request["seed"])
    items = [question(rng) for _ in range(3)]
    items.append(items[0][:-1] + "呢？")
    shown = request["messages"][0]["content"].split("\n")[2]  # "1. <first example>"
    extra = [shown[3:].rstrip("？?。") + "呢？"] + BAD_ITEMS
    items.append(extra[request["seed"] % 4])
    return "好的，新的指令如下：\n" + "\n".join(f"{k}. {t}" for k, t in enumerate(items, 1))


def answer_reply(request):
    return f"这个问题（{request['messages'][1]['content'][:4]}）需要结合具体情况分析。一般建议先休息观察，必要时及时就医。"


def endpoint(request, path):
    k = kind(request)
    if k == "generate":
        return generate_reply(request)
    if k == "answer":
        return answer_reply(request)
    raise AssertionError(k)


def base_args(srv, tmp_path, name, **extra):
    args = ["--out", str(tmp_path / f"{name}.jsonl"), "--teacher-base-url", srv.base_url, "--teacher-model-name",
            "test-model", "--teacher-api-key", "k", "--concurrency", "2"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}"] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
    return args


def bodies(requests, kinds=None):
    return [json.dumps(body, sort_keys=True, ensure_ascii=False) for path, body in requests
            if path.endswith("/chat/completions") and (kinds is None or kind(body) in kinds)]


def test_instructions_rows_near_duplicates_and_summary(tmp_path, capsys):
    with ScriptedServer(endpoint) as srv:
        report = D.run_instructions(D.command_config("instructions", base_args(srv, tmp_path, "di", limit=10)))
        sent = srv.requests
    rows = load_conversations(tmp_path / "di.jsonl")  # what train_sft.py reads
    assert len(rows) == report["rows"] == report["kept"] == 10
    # 3 fresh questions per request, and kept stops at --n: requests 0,1 (round 1), 2 (round 2), 3 (round 3)
    assert report["generation_requests"] == 4
    assert report["dropped"] == {"near-duplicate (ROUGE-L > 0.7)": 4, "not Chinese": 1, "too short": 1}
    assert Counter(kind(b) for _, b in sent) == {"generate": 4, "answer": 10}
    assert report["requests"] == 14 and report["cached"] == 0 and report["completion_tokens"] > 0
    for row in rows:
        assert row["source"] == "distilled_instructions" == SOURCES[0]
        assert ("department" in row) != ("role" in row)
        assert row.get("department", "内科") in D.DEPARTMENTS and row.get("role", "患者") in D.ROLES
        assert row["messages"][1]["content"] == answer_reply({"messages": [{}, row["messages"][0]]})
    # each request showed --examples seeds and one sampled focus, and the focus was recorded
    gens = [b for _, b in sent if kind(b) == "generate"]
    assert all(b["messages"][0]["content"].count("\n") > 10 and b["temperature"] == 1.0 for b in gens)
    assert len({b["seed"] for b in gens}) == 4
    out = capsys.readouterr().out
    assert "instructions: 14 requests (0 cached)" in out and "kept 10" in out
    assert "dropped: near-duplicate (ROUGE-L > 0.7) 4, not Chinese 1, too short 1" in out

    # a rerun sends nothing: every request is answered from the cache, with the same rows
    with ScriptedServer(endpoint) as srv:
        again = D.run_instructions(D.command_config("instructions", base_args(srv, tmp_path, "di", limit=10)))
        assert srv.requests == []
    assert again["cached"] == again["requests"] == 14
    assert load_conversations(tmp_path / "di.jsonl") == rows


def test_malformed_replies_retried_then_skipped_and_counted(tmp_path):
    def handler(request, path):
        k = kind(request)
        if k == "generate" and request["seed"] % 3 == 1:
            return "好的，我来写几条，不过这次没有序号。"  # no numbered list, every time
        if k == "answer" and ord(request["messages"][1]["content"][0]) % 6 == 0:
            return "很抱歉，我无法提供医疗建议。"  # a refusal, every time
        if k == "answer" and ord(request["messages"][1]["content"][0]) % 6 == 1:
            return {"choices": []}  # a malformed body, every time
        return endpoint(request, path)

    with ScriptedServer(handler) as srv:
        report = D.run_instructions(D.command_config(
            "instructions", base_args(srv, tmp_path, "di", limit=12, attempts=3)))
        sent = srv.requests
    gens = [b for _, b in sent if kind(b) == "generate"]
    asks = Counter(b["seed"] for b in gens)
    assert asks == {0: 1, 1: 3, 2: 1, 3: 1, 4: 3, 5: 1}  # requests 1 and 4 (rounds of 3, 2, 1) asked 3 times
    for b in gens:  # a re-ask shows the model its reply and says what was wrong
        again = asks[b["seed"]] > 1 and len(b["messages"]) > 1
        if again:
            assert b["messages"][-2]["content"] == "好的，我来写几条，不过这次没有序号。"
            assert b["messages"][-1]["content"] == D.NUDGES["instructions"]
    assert sum(len(b["messages"]) == 5 for b in gens) == 2  # the third asks: two nudges
    refused = report["dropped"]["answer unusable (refusal)"]
    empty = report["dropped"]["answer unusable (empty choices)"]
    assert report["dropped"]["generation reply unusable (no numbered instructions)"] == 2
    assert refused > 0 and empty > 0
    assert len(load_conversations(tmp_path / "di.jsonl")) == report["rows"] == 12 - refused - empty
    assert len(bodies(sent, kinds={"answer"})) == 12 + 2 * (refused + empty)  # 3 asks per unusable answer
    assert "2 no numbered instructions" in report["llm"][0]


# ---------------------------------------------------------------- conversations

CASE_A = {"id": "rdi-1", "messages": [{"role": "user", "content": "病例A：头疼两天，吃了止痛药没好。"},
                                       {"role": "assistant", "content": "参考A：考虑紧张型头痛，注意休息。"}],
          "source": "real_doctor_instructions", "department": "神经内科"}
CASES_BC = [{"id": 7, "medical_case": "疾病：\n湿疹\n病情描述：\n病例B：手上起疹子一周。", "doctor_diagnosis": "参考B：手部湿疹",
             "Department": "皮肤科"},
            {"id": 8, "medical_case": "病情描述：\n病例C：反复胃痛半年。", "doctor_diagnosis": "参考C：慢性胃炎",
             "Department": "消化内科"}]


def case_tag(request):
    """A, B or C: which case a patient or doctor request belongs to."""
    text = json.dumps(request["messages"], ensure_ascii=False)
    return next(t for t in "ABC" if f"病例{t}" in text or f"参考{t}" in text)


def conversation_endpoint(request, path):
    k, tag = kind(request), case_tag(request)
    msgs = request["messages"]
    if k == "patient":
        assert "参考" not in json.dumps(msgs, ensure_ascii=False)  # the patient never sees the real doctor's view
        turn = sum(m["role"] == "user" for m in msgs) - 1  # doctor turns so far
        if turn == 0:
            return f"医生您好，我是病例{tag}，最近不太舒服。"
        if tag == "B" and turn == 2:
            return "明白了，谢谢医生！" + D.END_MARK
        return f"患者：第{turn}次回答医生的问题。"
    if k == "doctor":
        assert "病情描述" not in msgs[0]["content"]  # the doctor never sees the case file
        turn = sum(m["role"] == "user" for m in msgs)
        if tag == "A" and turn == 2:
            return f"考虑紧张型头痛，注意休息，必要时复诊。{D.END_MARK}"
        return f"医生：请问还有哪些症状？（第{turn}问）"
    raise AssertionError(k)


def test_conversations_stop_at_stop_rule_and_turn_limit(tmp_path):
    cases = [write_jsonl(tmp_path / "a.jsonl", [CASE_A]), str(tmp_path / "bc.json")]
    Path(cases[1]).write_text(json.dumps(CASES_BC, ensure_ascii=False), encoding="utf-8")
    with ScriptedServer(conversation_endpoint) as srv:
        report = D.run_conversations(D.command_config(
            "conversations", base_args(srv, tmp_path, "dc", data=cases, max_turns=3)))
        sent = srv.requests
    rows = {r["case_id"]: r for r in load_conversations(tmp_path / "dc.jsonl")}
    assert set(rows) == {"rdi-1", "7", "8"} and report["rows"] == 3
    a, b, c = rows["rdi-1"], rows["7"], rows["8"]
    assert (a["stop"], len(a["messages"])) == ("doctor_end", 4)  # the doctor closed after 2 turns
    assert a["messages"][-1]["content"] == "考虑紧张型头痛，注意休息，必要时复诊。"  # the mark removed
    assert (b["stop"], len(b["messages"])) == ("patient_end", 4)  # the patient's thanks is not a question
    assert (c["stop"], len(c["messages"])) == ("max_turns", 6)  # 3 doctor turns, the limit
    assert c["messages"][2]["content"] == "第1次回答医生的问题。"  # the speaker tag dropped
    assert [r["department"] for r in (a, b, c)] == ["神经内科", "皮肤科", "消化内科"]
    assert all(r["source"] == "distilled_conversations" for r in rows.values())
    assert Counter(kind(body) for _, body in sent) == {"patient": 8, "doctor": 7}
    assert (report["stop_doctor_end"], report["stop_patient_end"], report["stop_max_turns"]) == (1, 1, 1)


def test_conversations_two_endpoints(tmp_path):
    cases = write_jsonl(tmp_path / "a.jsonl", [CASE_A])

    def only(expected):
        def handler(request, path):
            assert kind(request) == expected
            return conversation_endpoint(request, path)
        return handler

    with ScriptedServer(only("patient")) as p, ScriptedServer(only("doctor")) as d:
        args = base_args(p, tmp_path, "dc", data=[cases], max_turns=3, patient_model_name="patient-model",
                         doctor_base_url=d.base_url)
        report = D.run_conversations(D.command_config("conversations", args))
        assert {b["model"] for _, b in p.requests} == {"patient-model"}
        assert {b["model"] for _, b in d.requests} == {"test-model"}
    assert len(report["llm"]) == 2 and report["llm"][0].startswith("patient: 2 requests")
    assert all((tmp_path / f"dc.jsonl.cache.{agent}.sqlite").exists() for agent in ("patient", "doctor"))
    [row] = load_conversations(tmp_path / "dc.jsonl")
    assert row["stop"] == "doctor_end"


def test_conversation_with_an_unusable_doctor_turn_is_dropped(tmp_path):
    def handler(request, path):
        if kind(request) == "doctor" and case_tag(request) == "C":
            return "   "  # empty, every time
        return conversation_endpoint(request, path)

    path = tmp_path / "bc.json"
    path.write_text(json.dumps(CASES_BC, ensure_ascii=False), encoding="utf-8")
    with ScriptedServer(handler) as srv:
        report = D.run_conversations(D.command_config(
            "conversations", base_args(srv, tmp_path, "dc", data=[str(path)], max_turns=3)))
    assert [r["case_id"] for r in load_conversations(tmp_path / "dc.jsonl")] == ["7"]
    assert report["dropped"] == {"doctor turn unusable (empty turn)": 1}


# ---------------------------------------------------------------- polish

REAL = [
    {"id": "r1", "source": "real_doctor_instructions", "department": "皮肤科",
     "messages": [{"role": "user", "content": "手上起小水疱，很痒，一周了。"},
                  {"role": "assistant", "content": "考虑手部湿疹。丁酸氢化可的松乳膏薄涂，一天两次，痒得厉害加一片氯雷他定。"}]},
    {"id": "r2", "source": "real_doctor_instructions",
     "messages": [{"role": "user", "content": "身上起风团，一阵一阵的。"},
                  {"role": "assistant", "content": "吃西替利嗪，一天一片，先吃一周。"}]},
    {"id": "r3", "source": "real_doctor_conversations", "department": "骨科",
     "messages": [{"role": "user", "content": "膝盖疼。"}, {"role": "assistant", "content": "多大年纪？疼多久了？"},
                  {"role": "user", "content": "55岁，半年了。"},
                  {"role": "assistant", "content": "考虑膝骨关节炎。布洛芬每次200毫克，疼时吃，少爬楼。"}]},
]
REWRITES = {  # original -> what the scripted model writes
    REAL[0]["messages"][1]["content"]: "您好，这种情况考虑是手部湿疹。\n1. 丁酸氢化可的松乳膏薄薄涂一层，每天2次；\n2. 特别痒时加服氯雷他定。\n祝早日康复！",
    REAL[1]["messages"][1]["content"]: "这是荨麻疹的表现，可以吃点抗过敏药，一周后看看效果。",  # the drug is gone
    REAL[2]["messages"][1]["content"]: "请问您今年多大年纪？膝盖疼了多长时间？",
    REAL[2]["messages"][3]["content"]: "考虑是膝骨关节炎。疼的时候可以吃布洛芬，每次400毫克；平时尽量少爬楼梯。",  # dose changed
}


def polish_endpoint(request, path):
    assert kind(request) == "polish"
    prompt = request["messages"][0]["content"]
    original = prompt.split("医生的原回复：\n", 1)[1]
    if original == REAL[2]["messages"][3]["content"]:  # a later turn sees the dialogue before it
        assert "对话记录：\n患者：膝盖疼。\n医生：多大年纪？疼多久了？\n患者：55岁，半年了。" in prompt
    return "改写后：" + REWRITES[original]


@pytest.mark.parametrize("on_flag", [None, "original", "keep", "drop"])
def test_polish_keeps_original_and_flags_lost_facts(tmp_path, on_flag):
    data = write_jsonl(tmp_path / "real.jsonl", REAL)
    extra = {} if on_flag is None else {"on_flag": on_flag}
    with ScriptedServer(polish_endpoint) as srv:
        report = D.run_polish(D.command_config("polish", ["--data", data] + base_args(srv, tmp_path, "p", **extra)))
        assert len(srv.requests) == 4  # every doctor turn, once
    rows = {r["id"]: r for r in load_conversations(tmp_path / "p.jsonl")}
    r1 = rows["r1"]
    assert r1["messages"][1] == {"role": "assistant", "content": REWRITES[REAL[0]["messages"][1]["content"]],
                                 "original": REAL[0]["messages"][1]["content"]}
    assert r1["source"] == "real_doctor_instructions" and r1["department"] == "皮肤科" and "flagged" not in r1
    assert (report["flagged_rows"], report["flagged_turns"]) == (2, 2)
    if on_flag == "drop":
        assert set(rows) == {"r1"}
        assert report["dropped"] == {"rewrite changed drug names or numbers": 2}
        return
    r2, r3 = rows["r2"], rows["r3"]
    assert r2["messages"][1]["flag"] == {"missing": ["西替利嗪"], "added": []}
    assert "flag" not in r3["messages"][1] and r3["messages"][3]["flag"] == {"missing": ["200"], "added": ["400"]}
    assert r3["source"] == "real_doctor_conversations" and r3["messages"][2] == REAL[2]["messages"][2]
    # by default a changed dose never reaches SFT: the doctor's reply stands, the rewrite is kept aside
    restored = on_flag in (None, "original")
    for r, real in ((r2, REAL[1]), (r3, REAL[2])):
        assert r.get("flagged", False) == (not restored)  # only a row holding a changed fact is flagged
        for msg, before in zip(r["messages"], real["messages"]):
            if msg["role"] == "assistant":
                assert msg["original"] == before["content"]
                if "flag" in msg:
                    rewrite = REWRITES[before["content"]]
                    assert msg["content"] == (before["content"] if restored else rewrite)
                    assert msg.get("rewrite") == (rewrite if restored else None)
    assert r3["messages"][3]["content"] == ("考虑膝骨关节炎。布洛芬每次200毫克，疼时吃，少爬楼。" if restored
                                            else REWRITES[REAL[2]["messages"][3]["content"]])


# ---------------------------------------------------------------- resuming


class Interrupting:
    """Answers with `handler` until `after` replies were given, then refuses the key (401), which
    stops the run at once; `answered` holds the requests that got a reply."""

    def __init__(self, handler, after):
        self.handler, self.after, self.answered = handler, after, []
        self.lock = threading.Lock()

    def __call__(self, request, path):
        with self.lock:
            if len(self.answered) >= self.after:
                return 401, {"error": {"message": "key revoked", "type": "auth", "code": 401}}
            self.answered.append(("/v1/chat/completions", request))
        return self.handler(request, path)


def command_setup(command, tmp_path):
    """(handler, extra argv) of a small run of each command."""
    if command == "instructions":
        return endpoint, ["--limit", "8"]
    if command == "conversations":
        cases = tmp_path / "bc.json"
        cases.write_text(json.dumps(CASES_BC, ensure_ascii=False), encoding="utf-8")
        return conversation_endpoint, ["--data", write_jsonl(tmp_path / "a.jsonl", [CASE_A]), str(cases),
                                       "--max-turns", "3"]
    return polish_endpoint, ["--data", write_jsonl(tmp_path / "real.jsonl", REAL)]


@pytest.mark.parametrize("command", ["instructions", "conversations", "polish"])
def test_interrupted_run_resumes_without_repeating_a_request(tmp_path, command, capsys):
    handler, extra = command_setup(command, tmp_path)
    with ScriptedServer(handler) as srv:  # an uninterrupted run, for comparison
        assert D.main([command] + base_args(srv, tmp_path / "clean", command) + extra) == 0
        everything = bodies(srv.requests)
    cut = Interrupting(handler, after=len(everything) // 2)
    with ScriptedServer(cut) as srv:
        assert D.main([command] + base_args(srv, tmp_path, command) + extra) == 2
    assert "rejected the API key" in capsys.readouterr().err
    assert not (tmp_path / f"{command}.jsonl").exists()
    with ScriptedServer(handler) as srv:
        assert D.main([command] + base_args(srv, tmp_path, command) + extra) == 0
        rest = bodies(srv.requests)
    before = bodies(cut.answered)
    assert len(before) == len(everything) // 2 and not set(before) & set(rest)
    assert sorted(before + rest) == sorted(everything)
    assert (load_conversations(tmp_path / f"{command}.jsonl")
            == load_conversations(tmp_path / "clean" / f"{command}.jsonl"))


def test_killed_process_resumes_from_the_cache(tmp_path):
    """A real interruption: the process is killed while a request hangs; the rerun repeats nothing."""
    release, answered = threading.Event(), []

    def hanging(request, path):
        if len(answered) >= 3:
            release.wait(30)
            return 503, {"error": {"message": "gone"}}
        answered.append(json.dumps(request, sort_keys=True, ensure_ascii=False))
        return endpoint(request, path)

    with ScriptedServer(hanging) as srv:
        args = base_args(srv, tmp_path, "di", limit=8, concurrency=1)
        env = {**os.environ, "NO_PROXY": "127.0.0.1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, str(ROOT / "distill.py"), "instructions"] + args, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while len(srv.requests) < 4 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert len(srv.requests) == 4, "the run did not reach its fourth request"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            release.set()
    with ScriptedServer(endpoint) as srv:
        assert D.main(["instructions"] + base_args(srv, tmp_path, "di", limit=8)) == 0
        rest = bodies(srv.requests)
    assert len(answered) == 3 and not set(answered) & set(rest)
    assert len(load_conversations(tmp_path / "di.jsonl")) == 8


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert D.main([]) == 2 and D.main(["distil"]) == 2
    assert "unknown command 'distil'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"medical_case": "病例"}\n{"question": "x"}\n', encoding="utf-8")
    argv = ["conversations", "--data", str(bad), "--out", str(tmp_path / "o.jsonl"), "--teacher-base-url",
            "http://127.0.0.1:9/v1", "--teacher-model-name", "m"]
    assert D.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}:2: expected a schema row ('messages') or a Med-dialog case ('medical_case')\n"
    assert D.main(["polish", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                   "--teacher-base-url", "http://127.0.0.1:9/v1", "--teacher-model-name", "m"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert D.main(["instructions", "--out", str(tmp_path / "o.jsonl"), "--teacher-model-name", "m"]) == 2
    assert "--teacher-base-url" in capsys.readouterr().err
