"""Tests of nanohuatuo.data: JSONL io, schema validation, the five converters,
source mixing, held-out splits, RLAIF prompts, stats and the CLI."""

import json
import os
import stat
import subprocess
import sys
from collections import Counter

import pytest

from nanohuatuo import data, prepare
from nanohuatuo.cli import parse_kv
from nanohuatuo.data import DataError


def write_lines(path, lines, encoding="utf-8"):
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def jl(obj):
    return json.dumps(obj, ensure_ascii=False)


def turn(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def conv(source, q="头痛怎么办？", a="多休息，必要时就医。", **extra):
    return {"messages": turn(q, a), "source": source, **extra}


# ---------------------------------------------------------------- JSONL io


def test_write_read_round_trip_keeps_chinese_unescaped(tmp_path):
    rows = [conv("distilled_instructions", id="a"), conv("other", department="内科")]
    out = tmp_path / "sub" / "rows.jsonl"
    assert data.write_jsonl(out, rows) == 2
    assert data.read_jsonl(out) == rows
    assert "头痛怎么办" in out.read_text(encoding="utf-8")
    assert [p.name for p in out.parent.iterdir()] == ["rows.jsonl"]  # no temp file left


def test_read_jsonl_skips_blank_lines_and_names_bad_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [jl({"a": 1}), "", "   ", jl({"b": 2})])
    assert data.read_jsonl(path) == [{"a": 1}, {"b": 2}]
    bad = write_lines(tmp_path / "bad.jsonl", [jl({"a": 1}), "", '{"a": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: bad JSON"):
        data.read_jsonl(bad)
    arr = write_lines(tmp_path / "arr.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"arr\.jsonl:1: expected a JSON object"):
        data.read_jsonl(arr)


# ---------------------------------------------------------------- validate

SYS = {"role": "system", "content": "你是医生。"}
U = {"role": "user", "content": "发烧了"}
A = {"role": "assistant", "content": "量体温"}


@pytest.mark.parametrize("row, reason", [
    ([], "must be a JSON object"),
    ({"source": "other"}, "missing 'messages'"),
    ({"messages": [], "source": "other"}, "non-empty list"),
    ({"messages": [U, {"role": "doctor", "content": "x"}], "source": "other"}, r"messages\[1\]: bad role 'doctor'"),
    ({"messages": [U, {"role": "assistant", "content": "  "}], "source": "other"}, r"messages\[1\]: empty content"),
    ({"messages": [U, {"role": "assistant", "content": 3}], "source": "other"}, "content must be a string"),
    ({"messages": [U, U, A], "source": "other"}, r"messages\[1\]: broken alternation, expected 'assistant'"),
    ({"messages": [A, U, A], "source": "other"}, r"messages\[0\]: broken alternation, expected 'user'"),
    ({"messages": [U, A, SYS, A], "source": "other"}, r"messages\[2\]: system message is only allowed first"),
    ({"messages": [SYS], "source": "other"}, "no user/assistant turns"),
    ({"messages": [U, A, U], "source": "other"}, "must end with an assistant"),
    ({"messages": [U, A]}, "missing or empty 'source'"),
    ({"messages": [U, A], "source": "other", "department": 3}, "'department' must be a string"),
    ({"messages": [U, A], "source": "other", "id": 7}, "'id' must be a string"),
    ({"messages": [U, A], "source": "other", "references": "量体温"}, "'references' must be a non-empty list"),
    ({"messages": [U, A], "source": "other", "references": ["量体温", " "]}, "'references' must be a non-empty list"),
])
def test_validate_catches_each_broken_form(row, reason):
    with pytest.raises(DataError, match=r"^data/x\.jsonl:17: .*" + reason):
        data.validate(row, "data/x.jsonl:17")


def test_validate_accepts_system_and_multi_turn():
    row = {"messages": [SYS, U, A, U, A], "source": "real_doctor_conversations", "department": "儿科", "id": "r1"}
    assert data.validate(row, "here") is row


def test_load_conversations_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [jl(conv("other")), "", jl({"messages": [U], "source": "other"})])
    with pytest.raises(DataError, match=r"c\.jsonl:3: conversation must end with an assistant"):
        data.load_conversations(path)


# ---------------------------------------------------------------- converters


def test_huatuo_sft(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        jl({"data": ["问：孩子发烧怎么办？", "答：先物理降温。"]}),
        jl({"data": ["问:我头痛", "答: 多久了？", "问：三天了", "答：建议就医。"]}),
    ])
    assert list(data.convert_huatuo_sft(path)) == [
        {"messages": turn("孩子发烧怎么办？", "先物理降温。"), "source": "distilled_instructions", "id": "sft-1"},
        {"messages": turn("我头痛", "多久了？") + turn("三天了", "建议就医。"),
         "source": "distilled_conversations", "id": "sft-2"},
    ]
    assert {r["source"] for r in data.convert_huatuo_sft(path, source="real_doctor_conversations")} == {
        "real_doctor_conversations"}


@pytest.mark.parametrize("record, reason", [
    ({"data": ["问：a", "答：b", "问：c"]}, "3 items"),
    ({"data": ["答：a", "问：b"]}, r"data\[0\] starts with '答："),
    ({"data": ["问：a", "答："]}, r"messages\[1\]: empty content"),
    ({"text": "问：a"}, "'data' must be a non-empty list"),
])
def test_huatuo_sft_malformed(tmp_path, record, reason):
    path = write_lines(tmp_path / "sft.jsonl", [jl({"data": ["问：好", "答：好"]}), jl(record)])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: .*" + reason):
        list(data.convert_huatuo_sft(path))


def test_huatuo26m_shapes(tmp_path):
    path = write_lines(tmp_path / "h26m.jsonl", [
        jl({"questions": "胃痛吃什么药？", "answers": "可用奥美拉唑。"}),
        jl({"questions": [["肝癌的症状有哪些？", "肝癌有什么症状？"]], "answers": ["乏力、消瘦。", "黄疸。"]}),
        jl({"questions": ["感冒怎么办？", "咳嗽怎么办？"], "answers": ["多喝水。", "止咳。"]}),
        jl({"question": "失眠？", "answer": "规律作息。"}),
    ])
    assert list(data.convert_huatuo26m(path)) == [
        {"messages": turn("胃痛吃什么药？", "可用奥美拉唑。"), "source": "real_doctor_instructions", "id": "h26m-1"},
        {"messages": turn("肝癌的症状有哪些？", "乏力、消瘦。\n\n黄疸。"), "source": "real_doctor_instructions",
         "id": "h26m-2", "references": ["乏力、消瘦。", "黄疸。"]},  # two doctors: each answer kept for the metrics
        {"messages": turn("感冒怎么办？", "多喝水。"), "source": "real_doctor_instructions", "id": "h26m-3-1"},
        {"messages": turn("咳嗽怎么办？", "止咳。"), "source": "real_doctor_instructions", "id": "h26m-3-2"},
        {"messages": turn("失眠？", "规律作息。"), "source": "real_doctor_instructions", "id": "h26m-4"},
    ]


@pytest.mark.parametrize("record, reason", [
    ({"questions": "a"}, "expected keys 'questions' and 'answers'"),
    ({"questions": "a", "answers": [1]}, r"answers\[0\] must be a string"),
    ({"questions": [], "answers": "b"}, "'questions' must be a string or a non-empty list"),
    ({"questions": "a", "answers": ""}, "empty content"),
])
def test_huatuo26m_malformed(tmp_path, record, reason):
    path = write_lines(tmp_path / "h.jsonl", ["", jl(record)])
    with pytest.raises(DataError, match=r"h\.jsonl:2: .*" + reason):
        list(data.convert_huatuo26m(path))


CMD_CSV = (
    "department,title,ask,answer\n"
    "内科,高血压吃什么好,\"血压150/100，\n平时吃什么好？\",少盐少油。\n"
    "儿科,宝宝腹泻怎么办,无,补液盐。\n"
)


def test_cmd_csv_gb18030(tmp_path):
    path = tmp_path / "内科.csv"
    path.write_bytes(CMD_CSV.encode("gb18030"))
    expected = [
        {"messages": turn("血压150/100，\n平时吃什么好？", "少盐少油。"), "source": "real_doctor_instructions",
         "department": "内科", "id": "内科-2"},
        {"messages": turn("宝宝腹泻怎么办", "补液盐。"), "source": "real_doctor_instructions",
         "department": "儿科", "id": "内科-4"},  # the quoted ask spans lines 2-3
    ]
    assert list(data.convert_cmd_csv(path)) == expected
    assert list(data.convert_cmd_csv(path, encoding="gb18030")) == expected
    utf8 = tmp_path / "u.csv"
    utf8.write_bytes(CMD_CSV.encode("utf-8-sig"))
    assert [r["messages"] for r in data.convert_cmd_csv(utf8)] == [r["messages"] for r in expected]


def test_cmd_csv_malformed(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes((CMD_CSV + "外科,骨折,只有三列\n").encode("gb18030"))
    with pytest.raises(DataError, match=r"bad\.csv:5: expected 4 fields, got 3"):
        list(data.convert_cmd_csv(path))
    header = tmp_path / "header.csv"
    header.write_bytes("科室,title,ask,answer\n".encode("gb18030"))
    with pytest.raises(DataError, match=r"header\.csv:1: header lacks department"):
        list(data.convert_cmd_csv(header))
    forced = tmp_path / "forced.csv"
    forced.write_bytes(CMD_CSV.encode("gb18030"))
    with pytest.raises(DataError, match=r"forced\.csv:2: cannot decode as utf-8"):
        list(data.convert_cmd_csv(forced, encoding="utf-8"))


def test_cmd_jsonl(tmp_path):
    path = write_lines(tmp_path / "cmd.jsonl", [
        jl({"department": "妇科", "title": "月经不调", "question": "周期不规律怎么办？", "answer": "查激素六项。"}),
        jl({"department": "", "title": "牙痛", "question": "无", "answer": "看牙科。"}),
    ])
    assert list(data.convert_cmd_jsonl(path, source="other")) == [
        {"messages": turn("周期不规律怎么办？", "查激素六项。"), "source": "other", "department": "妇科", "id": "cmd-1"},
        {"messages": turn("牙痛", "看牙科。"), "source": "other", "id": "cmd-2"},
    ]
    bad = write_lines(tmp_path / "bad.jsonl", [jl({"title": "牙痛", "question": "疼", "answer": ""})])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*empty content"):
        list(data.convert_cmd_jsonl(bad))


def write_cmedqa2(tmp_path, answers_extra=""):
    q = tmp_path / "questions.csv"
    a = tmp_path / "answers.csv"
    q.write_text("question_id,content\n1,糖尿病能吃水果吗？\n2,没有回答的问题\n3,孕妇能喝咖啡吗？\n", encoding="utf-8")
    a.write_text("ans_id,question_id,content\n10,1,少量低糖水果可以。\n11,3,少量可以。\n12,1,注意监测血糖。\n"
                 + answers_extra, encoding="utf-8")
    return q, a


def test_cmedqa2_first_and_all_answers(tmp_path):
    q, a = write_cmedqa2(tmp_path)
    src = "real_doctor_instructions"
    assert list(data.convert_cmedqa2(q, a)) == [
        {"messages": turn("糖尿病能吃水果吗？", "少量低糖水果可以。"), "source": src, "id": "cmedqa2-1",
         "references": ["少量低糖水果可以。", "注意监测血糖。"]},  # every answer, for the metrics
        {"messages": turn("孕妇能喝咖啡吗？", "少量可以。"), "source": src, "id": "cmedqa2-3"},
    ]
    assert list(data.convert_cmedqa2(q, a, all_answers=True)) == [
        {"messages": turn("糖尿病能吃水果吗？", "少量低糖水果可以。"), "source": src, "id": "cmedqa2-1-10"},
        {"messages": turn("糖尿病能吃水果吗？", "注意监测血糖。"), "source": src, "id": "cmedqa2-1-12"},
        {"messages": turn("孕妇能喝咖啡吗？", "少量可以。"), "source": src, "id": "cmedqa2-3-11"},
    ]


def test_cmedqa2_malformed(tmp_path):
    q, a = write_cmedqa2(tmp_path, answers_extra="13,99,孤立的回答\n")
    with pytest.raises(DataError, match=r"answers\.csv:5: question_id '99' is not in"):
        list(data.convert_cmedqa2(q, a))
    q, a = write_cmedqa2(tmp_path, answers_extra="14,3\n")
    with pytest.raises(DataError, match=r"answers\.csv:5: expected 3 fields, got 2"):
        list(data.convert_cmedqa2(q, a))


# ---------------------------------------------------------------- mixing, prompts, stats


def sourced_rows(counts):
    return [conv(s, q=f"{s} 问题 {i}", id=f"{s}-{i}") for s, n in counts.items() for i in range(n)]


def test_mix_sources_follows_weights_and_seed():
    rows = sourced_rows({"distilled_instructions": 100, "real_doctor_instructions": 50, "other": 30})
    weights = {"distilled_instructions": 0.5, "real_doctor_instructions": 2.5}
    mixed = data.mix_sources(rows, weights, seed=0)
    assert Counter(r["source"] for r in mixed) == {"distilled_instructions": 50, "real_doctor_instructions": 125}
    ids = Counter(r["id"] for r in mixed if r["source"] == "real_doctor_instructions")
    assert len(ids) == 50 and set(ids.values()) <= {2, 3}  # every real row kept at least twice
    assert len({r["id"] for r in mixed if r["source"] == "distilled_instructions"}) == 50
    assert [r["id"] for r in data.mix_sources(rows, weights, seed=0)] == [r["id"] for r in mixed]
    assert [r["id"] for r in data.mix_sources(rows, weights, seed=1)] != [r["id"] for r in mixed]
    sized = data.mix_sources(rows, {"distilled_instructions": 1, "real_doctor_instructions": 2}, seed=0, total=100)
    assert Counter(r["source"] for r in sized) == {"distilled_instructions": 50, "real_doctor_instructions": 50}
    with pytest.raises(ValueError, match="no row has it"):
        data.mix_sources(rows, {"distilled_conversations": 1}, seed=0)


def test_split_heldout_is_disjoint_and_deterministic():
    rows = sourced_rows({"other": 40})
    train, held = data.split_heldout(rows, 0.25, seed=3)
    assert len(train) == 30 and len(held) == 10
    assert {r["id"] for r in train} | {r["id"] for r in held} == {r["id"] for r in rows}
    assert data.split_heldout(rows, 0.25, seed=3) == (train, held)
    assert data.split_heldout(rows, 0.25, seed=4) != (train, held)


def test_to_prompt():
    row = {"messages": [SYS, U, A, U, {"role": "assistant", "content": "去医院"}], "source": "other",
           "department": "急诊", "id": "p1"}
    assert data.to_prompt(row) == {"id": "p1", "messages": [SYS, U, A, U], "reference": "去医院", "department": "急诊"}
    several = data.to_prompt({**row, "references": ["去医院", "先观察"]})
    assert several["reference"] == "去医院" and several["references"] == ["去医院", "先观察"]
    anon = data.to_prompt(conv("other"))
    assert "department" not in anon and anon["id"] == data.to_prompt(conv("other"))["id"]
    with pytest.raises(DataError, match="ending with an assistant"):
        data.to_prompt({"messages": [U], "source": "other"})


def test_stats():
    rows = [conv("other", department="内科"), {"messages": [U, A, U, A], "source": "other"}]
    s = data.stats(rows)
    assert s["rows"] == 2 and s["sources"] == {"other": 2}
    assert s["departments"] == {"内科": 1, "(none)": 1} and s["turns"] == {1: 1, 2: 1}
    assert s["chars"]["assistant"] == {"min": 3, "mean": 5.3, "median": 3.0, "max": 10}


# ---------------------------------------------------------------- CLI


def test_cli_convert_mix_prompts_stats(tmp_path, capsys):
    sft = write_lines(tmp_path / "sft.jsonl", [jl({"data": [f"问：问题{i}", f"答：回答{i}"]}) for i in range(20)])
    q, a = write_cmedqa2(tmp_path)
    assert prepare.main(["convert", "--format", "huatuo_sft", "--data", str(sft), "--out", str(tmp_path / "d.jsonl")]) == 0
    assert prepare.main(["convert", "--format", "cmedqa2", "--data", str(q), str(a), "--all-answers", "--limit", "2",
                      "--out", str(tmp_path / "r.jsonl")]) == 0
    assert "wrote 20 rows" in capsys.readouterr().out
    assert [r["id"] for r in data.load_conversations(tmp_path / "r.jsonl")] == ["cmedqa2-1-10", "cmedqa2-1-12"]

    assert prepare.main(["mix", "--data", str(tmp_path / "d.jsonl"), str(tmp_path / "r.jsonl"),
                      "--weights", "distilled_instructions=1,real_doctor_instructions=2", "--seed", "0",
                      "--heldout", "0.1", "--heldout-out", str(tmp_path / "h.jsonl"), "--out", str(tmp_path / "m.jsonl")]) == 0
    mixed, held = data.load_conversations(tmp_path / "m.jsonl"), data.load_conversations(tmp_path / "h.jsonl")
    held_sources = Counter(r["source"] for r in held)
    assert len(held) == 2 and Counter(r["source"] for r in mixed) == {
        "distilled_instructions": 20 - held_sources["distilled_instructions"],
        "real_doctor_instructions": 2 * (2 - held_sources["real_doctor_instructions"])}
    assert not {r["id"] for r in held} & {r["id"] for r in mixed}

    assert prepare.main(["prompts", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert data.read_jsonl(tmp_path / "p.jsonl")[0] == {
        "id": "sft-1", "messages": [{"role": "user", "content": "问题0"}], "reference": "回答0"}
    capsys.readouterr()
    assert prepare.main(["stats", "--data", str(tmp_path / "d.jsonl")]) == 0
    assert "20 rows" in capsys.readouterr().out
    # the earlier spelling of --data, kept for one release with a one-line warning
    assert prepare.main(["stats", "--in", str(tmp_path / "d.jsonl")]) == 0
    got = capsys.readouterr()
    assert "20 rows" in got.out
    assert got.err == "warning: --in is deprecated and will be removed in the next release; use --data\n"


def test_cli_mix_drops_flagged_rows_unless_asked(tmp_path, capsys):
    rows = [conv("real_doctor_instructions", id=f"r{i}", **({"flagged": True} if i < 2 else {})) for i in range(5)]
    rows += [conv("real_doctor_conversations", id="c0", flagged=True), conv("distilled_instructions", id="d0")]
    path = tmp_path / "polished.jsonl"
    data.write_jsonl(path, rows)
    argv = ["mix", "--data", str(path), "--out", str(tmp_path / "m.jsonl"), "--weights",
            "real_doctor_instructions=1,real_doctor_conversations=0,distilled_instructions=1"]
    assert prepare.main(argv) == 0
    out = capsys.readouterr().out
    assert "dropped 3 flagged rows" in out and "real_doctor_conversations 1, real_doctor_instructions 2" in out
    assert sorted(r["id"] for r in data.read_jsonl(tmp_path / "m.jsonl")) == ["d0", "r2", "r3", "r4"]
    assert prepare.main(argv + ["--keep-flagged"]) == 0
    assert "kept 3 flagged rows (--keep-flagged)" in capsys.readouterr().out
    assert sorted(r["id"] for r in data.read_jsonl(tmp_path / "m.jsonl")) == ["d0", "r0", "r1", "r2", "r3", "r4"]


def test_cli_reports_bad_input(tmp_path, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", [jl({"data": ["问：a"]})])
    out = tmp_path / "out.jsonl"
    assert prepare.main(["convert", "--format", "huatuo_sft", "--data", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1:" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize("command", [
    ["convert", "--format", "huatuo_sft"], ["convert", "--format", "cmd_csv"], ["prompts"],
    ["mix", "--weights", "other=1"], ["stats"]])
def test_cli_empty_input_is_an_error(tmp_path, capsys, command):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = tmp_path / "out.jsonl"
    assert prepare.main(command + ["--data", str(empty)] + (["--out", str(out)] if command != ["stats"] else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(empty) in err and "empty" in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [empty]


def test_outputs_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        data.write_jsonl(tmp_path / "rows.jsonl", [conv("other")])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "rows.jsonl").st_mode) == 0o644


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    def rows():
        yield conv("other")
        raise KeyboardInterrupt  # a Ctrl-C mid-write: the temp file is removed
    with pytest.raises(KeyboardInterrupt):
        data.write_jsonl(tmp_path / "rows.jsonl", rows())
    assert list(tmp_path.iterdir()) == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(gone.stdout), os.getpid()
    (tmp_path / f".rows.jsonl.{dead}-0.tmp").write_text("half a row from a SIGKILLed writ")  # a kill leaves it
    (tmp_path / f".rows.jsonl.{live}-999.tmp").write_text("another writer's, still running")
    assert data.write_jsonl(tmp_path / "rows.jsonl", [conv("other")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".rows.jsonl.{live}-999.tmp", "rows.jsonl"]
    assert data.read_jsonl(tmp_path / "rows.jsonl") == [conv("other")]


def test_iter_conversations_names_each_row(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [jl(conv("other")), "", jl(conv("other", q="咳嗽"))])
    assert [w for w, _ in data.iter_conversations(path)] == [f"{path}:1", f"{path}:3"]
    assert parse_kv("a=1,b=2.5") == {"a": 1.0, "b": 2.5}  # what mix --weights reads


def test_module_cli_bad_input_one_line_exit_2(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "nanohuatuo.data", "prompts", "--data", str(tmp_path / "none.jsonl"),
                        "--out", str(tmp_path / "p.jsonl")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "none.jsonl" in r.stderr, r.stderr


def test_old_in_spelling_still_works_with_a_deprecation_line(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"id": "a", "source": "real_doctor_instructions", "messages": [
        {"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多休息"}]}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    assert prepare.main(["prompts", "--in", str(src), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert capsys.readouterr().err == "warning: --in is deprecated and will be removed in the next release; use --data\n"
    assert data.read_jsonl(tmp_path / "p.jsonl")[0]["id"] == "a"
