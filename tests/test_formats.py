"""Tests for nanohuatuo.formats and the formats SFT reads: ShareGPT, Alpaca, OpenAI messages, JSON
arrays, Parquet and datasets folders (skipped, saying why, without their libraries), the webMedQA
converter, the errors that name file and line, and one SFT step on each format (the same
conversations in every shape give the same loss as the schema file)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_base, write_jsonl

from nanohuatuo import data, prepare, sft
from nanohuatuo.formats import DataError, iter_jsonl, iter_records

ROOT = Path(__file__).resolve().parents[1]
QA = [("我头疼三天了，怎么办？", "多休息，必要时就医。"), ("孩子发烧38度要紧吗？", "先物理降温，观察精神。"),
      ("胃痛吃什么药？", "可用奥美拉唑，饭前服。"), ("失眠怎么调理？", "规律作息，睡前少看手机。")]
SYSTEM = "你是医生。"
FOLLOW = ("需要吃药吗？", "先观察两天。")


def schema_rows():
    """The reference: what every shape below must read as (source and id aside)."""
    rows = []
    for i, (q, a) in enumerate(QA):
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i == 1:
            messages = [{"role": "system", "content": SYSTEM}] + messages
        if i == 2:
            messages += [{"role": "user", "content": FOLLOW[0]}, {"role": "assistant", "content": FOLLOW[1]}]
        rows.append({"messages": messages, "source": "other"})
    return rows


def sharegpt(row):
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in row["messages"]]}


def openai(row):
    # content as text parts on one message, as the OpenAI API allows
    messages = [dict(m) for m in row["messages"]]
    messages[-1]["content"] = [{"type": "text", "text": messages[-1]["content"][:3]},
                               {"type": "text", "text": messages[-1]["content"][3:]}]
    return {"messages": messages}


def alpaca(row):
    msgs = [m for m in row["messages"] if m["role"] != "system"]
    out = {"instruction": msgs[-2]["content"], "input": "", "output": msgs[-1]["content"]}
    if len(msgs) > 2:
        out["history"] = [[msgs[0]["content"], msgs[1]["content"]]]
    if row["messages"][0]["role"] == "system":
        out["system"] = row["messages"][0]["content"]
    return out


SHAPES = {"sharegpt": sharegpt, "alpaca": alpaca, "openai": openai}


def write_json_array(path, objs):
    """A pretty-printed JSON array, as Alpaca's files are: each object starts on its own line."""
    path.write_text("[\n" + ",\n".join(json.dumps(o, ensure_ascii=False, indent=1) for o in objs) + "\n]\n",
                    encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- reading each shape


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_reads_as_the_schema_rows(tmp_path, shape):
    path = write_jsonl(tmp_path / f"{shape}.jsonl", [SHAPES[shape](r) for r in schema_rows()])
    assert data.load_conversations(path) == schema_rows()
    assert [r["source"] for r in data.load_conversations(path, source="distilled_instructions")] == \
        ["distilled_instructions"] * 4


def test_alpaca_input_follows_the_instruction_and_own_source_and_id_are_kept(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "解释这个指标", "input": "  ALT 80 U/L ", "output": "偏高。",
                                               "source": "distilled_instructions", "id": "a-1"}])
    assert data.load_conversations(path) == [{"messages": [{"role": "user", "content": "解释这个指标\nALT 80 U/L"},
                                                           {"role": "assistant", "content": "偏高。"}],
                                              "source": "distilled_instructions", "id": "a-1"}]


def test_a_file_may_mix_shapes_and_a_json_array_names_each_item_by_its_line(tmp_path):
    objs = [sharegpt(schema_rows()[0]), alpaca(schema_rows()[1]), {**schema_rows()[2], "id": "s-3"}]
    path = write_json_array(tmp_path / "mixed.json", objs)
    places = [w for w, _ in iter_records(path)]
    text = Path(path).read_text(encoding="utf-8").splitlines()
    assert [text[int(w.rpartition(":")[2]) - 1] for w in places] == ["{"] * 3  # each place is where the item starts
    assert [r["messages"] for r in data.load_conversations(path)] == [r["messages"] for r in schema_rows()[:3]]


@pytest.mark.parametrize("obj, message", [
    ({"question": "头疼？", "reply": "休息。"}, r"f.jsonl:2: unknown row shape \(keys: question, reply\)"),
    ({"conversations": [{"from": "doctor", "value": "x"}]}, r"f.jsonl:2: ShareGPT row: conversations\[0\]: unknown speaker"),
    ({"conversations": [{"from": "human", "value": "头疼"}, {"from": "human", "value": "x"}]},
     r"f.jsonl:2: messages\[1\]: broken alternation"),
    ({"messages": [{"role": "user", "content": "几点了"}, {"role": "tool", "content": "3"}]},
     r"f.jsonl:2: OpenAI row: messages\[1\] is a tool call"),
    ({"messages": [{"role": "user", "content": 3}]}, r"f.jsonl:2: messages\[0\].content must be a string"),
    ({"instruction": "头疼", "output": "休息", "history": [["只有问"]]}, r"f.jsonl:2: Alpaca row: history\[0\]"),
])
def test_a_row_of_the_wrong_shape_names_file_and_line(tmp_path, obj, message):
    path = write_jsonl(tmp_path / "f.jsonl", [sharegpt(schema_rows()[0]), obj])
    with pytest.raises(DataError, match=message):
        data.load_conversations(path)


def test_a_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json:3: bad JSON: Expecting ',' delimiter"):
        data.load_conversations(path)
    path.write_text('[\n {"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json:3: bad JSON: expected ',' or '\]'"):
        data.load_conversations(path)


def test_train_sft_answers_a_bad_row_with_one_line_and_exit_2(tmp_path, base):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "头疼", "completion": "休息"}])
    r = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--model", base, "--data", path,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{path}:1: unknown row shape (keys: completion, prompt)" in r.stderr


# ----------------------------------------------------------------------------- Parquet and datasets folders


def table(objs):
    """An Arrow table of objs; every column in every row (a table takes its columns from the first row)."""
    import pyarrow as pa
    keys = list(dict.fromkeys(k for o in objs for k in o))
    return pa.Table.from_pylist([{k: o.get(k) for k in keys} for o in objs])


def write_parquet(path, objs):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install \".[parquet]\")")
    pq.write_table(table(objs), path)
    return str(path)


def test_parquet_rows_are_read_with_their_row_number(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", [sharegpt(r) for r in schema_rows()])
    assert data.load_conversations(path) == schema_rows()
    assert [w for w, _ in iter_records(path)][-1] == f"{path}: row 4"


def test_a_datasets_folder_is_read(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets library is not installed "
                                                      "(pip install \".[datasets]\")")
    from datasets.table import InMemoryTable
    # a fixed fingerprint: nothing to hash (some datasets and dill versions fail hashing pyarrow's types)
    rows = InMemoryTable(table([alpaca(r) for r in schema_rows()]))
    datasets.DatasetDict({"train": datasets.Dataset(rows, fingerprint="t")}).save_to_disk(str(tmp_path / "ds"))
    assert data.load_conversations(tmp_path / "ds") == schema_rows()


def test_without_pyarrow_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what a missing library looks like to an import
    path = tmp_path / "s.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"s.parquet: reading Parquet needs the pyarrow library: "
                                        r"pip install \"\.\[parquet\]\" in the repository"):
        data.load_conversations(path)


# ----------------------------------------------------------------------------- converting


@pytest.mark.parametrize("shape", SHAPES)
def test_convert_writes_schema_rows_with_ids(tmp_path, shape):
    src = write_json_array(tmp_path / f"{shape}.json", [SHAPES[shape](r) for r in schema_rows()])
    out = tmp_path / "out.jsonl"
    assert prepare.main(["convert", "--format", shape, "--data", src, "--out", str(out)]) == 0
    rows = data.read_jsonl(out)
    assert rows == [{**r, "id": f"{shape}-{i}"} for i, r in enumerate(schema_rows(), start=1)]
    assert data.load_conversations(out) == rows


def test_convert_source_replaces_the_rows_own_and_limit_names_what_it_left(tmp_path, capsys):
    rows = schema_rows()
    src = write_jsonl(tmp_path / "s.jsonl", [{**sharegpt(r), "source": "web"} for r in rows])  # their own source
    again = write_jsonl(tmp_path / "t.jsonl", [sharegpt(r) for r in rows])
    out = tmp_path / "out.jsonl"
    assert prepare.main(["convert", "--format", "sharegpt", "--data", src, again, "--out", str(out),
                         "--source", "real_doctor_conversations", "--limit", str(len(rows))]) == 0
    assert {r["source"] for r in data.read_jsonl(out)} == {"real_doctor_conversations"}
    said = capsys.readouterr().out
    assert f"converted {len(rows)} rows from {src}" in said
    assert f"not read: {again} (--limit {len(rows)} reached)" in said
    assert prepare.main(["convert", "--format", "sharegpt", "--data", src, "--out", str(out), "--source", " "]) == 2
    assert "error: --source ' ': give a source name" in capsys.readouterr().err


def test_any_jsonl_input_may_be_a_json_array(tmp_path):
    """Public corpora and preference sets are often shipped as one JSON array: every JSONL reader takes one."""
    rows = [{"department": "内科", "title": "头疼", "question": "头疼三天", "answer": "测血压。"},
            {"department": "儿科", "title": "咳嗽", "question": "孩子咳嗽", "answer": "观察体温。"}]
    lines, array = write_jsonl(tmp_path / "c.jsonl", rows), write_json_array(tmp_path / "c.json", rows)
    want = list(data.convert("cmd_jsonl", [lines]))
    assert [r["messages"] for r in data.convert("cmd_jsonl", [array])] == [r["messages"] for r in want]
    assert [n for n, _ in iter_jsonl(array)] == [2, 8]  # each object where it starts
    # from a pipe (`<(...)` in a shell), which cannot seek back: either form
    for path in (lines, array):
        r, w = os.pipe()
        os.write(w, open(path, "rb").read())
        os.close(w)
        try:
            assert [o for _, o in iter_jsonl(f"/dev/fd/{r}")] == rows
        finally:
            os.close(r)


def test_convert_refuses_a_row_of_another_shape(tmp_path, capsys):
    src = write_jsonl(tmp_path / "s.jsonl", [sharegpt(schema_rows()[0]), alpaca(schema_rows()[0])])
    assert prepare.main(["convert", "--format", "sharegpt", "--data", src, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"error: {src}:2: not a sharegpt row (keys: input, instruction, output)" in capsys.readouterr().err


WEBMEDQA = [  # id, label, category, question, answer: one positive and four negatives a question
    ("101", "0", "内科", "头疼三天怎么办？", "多喝水。"),
    ("101", "1", "内科", "头疼三天怎么办？", "建议测血压，注意休息。"),
    ("101", "0", "内科", "头疼三天怎么办？", "可以用药膏。"),
    ("202", "1", "儿科", "孩子咳嗽要紧吗？", "观察精神和体温。"),
    ("101", "0", "内科", "头疼三天怎么办？", "注意保暖。"),
    ("101", "0", "内科", "头疼三天怎么办？", "去皮肤科。"),
    ("303", "0", "外科", "伤口发红？", "多吃水果。"),  # no positive: skipped
]


def test_webmedqa_keeps_each_questions_positive_answer(tmp_path):
    path = tmp_path / "medQA_test.txt"
    path.write_bytes("\n".join("\t".join(f) for f in WEBMEDQA).encode("gb18030"))  # either encoding is read
    rows = list(data.convert("webmedqa", [path]))
    assert rows == [
        {"messages": [{"role": "user", "content": "头疼三天怎么办？"}, {"role": "assistant", "content": "建议测血压，注意休息。"}],
         "source": "real_doctor_instructions", "department": "内科", "id": "webmedqa-101"},
        {"messages": [{"role": "user", "content": "孩子咳嗽要紧吗？"}, {"role": "assistant", "content": "观察精神和体温。"}],
         "source": "real_doctor_instructions", "department": "儿科", "id": "webmedqa-202"}]
    # the label first, the id second reads the same
    path.write_text("\n".join("\t".join((f[1], f[0]) + f[2:]) for f in WEBMEDQA), encoding="utf-8")
    assert list(data.convert("webmedqa", [path])) == rows


def test_webmedqa_errors_name_the_line(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("101\t1\t内科\t头疼？\t休息。\n101\t1\t内科\t头疼？\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"w.txt:2: expected 5 tab-separated fields \(id, label, category, question, "
                                        r"answer\), got 4"):
        list(data.convert("webmedqa", [path]))
    path.write_text("101\t7\t内科\t头疼？\t休息。\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"w.txt:1: neither of the first two fields is a 0/1 label"):
        list(data.convert("webmedqa", [path]))
    # a scraped answer holding a form feed or U+2028 is one line; CRLF endings are read; line numbers hold
    path.write_text("101\t1\t内科\t头疼？\t休息。\x0c多喝水\u2028。\r\n\r\n202\t1\t儿科\t咳嗽？\r\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"w.txt:3: expected 5 tab-separated fields"):
        list(data.convert("webmedqa", [path]))
    path.write_text("101\t1\t内科\t头疼？\t休息。\x0c多喝水\u2028。\r\n", encoding="utf-8")
    assert [r["messages"][1]["content"] for r in data.convert("webmedqa", [path])] == ["休息。\x0c多喝水\u2028。"]


# ----------------------------------------------------------------------------- one SFT step on each format


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    texts = ["system user assistant", SYSTEM, *FOLLOW] + [t for qa in QA for t in qa]
    return tiny_base(tmp_path_factory.mktemp("fmt_base"), texts, vocab_size=300, max_seq_len=256,
                     extra_tokens=("<|im_start|>", "<|im_end|>")).dir


def first_loss(base, path, out):
    cfg = sft.SFTConfig(model=base, data=[str(path)], out=str(out), template="chatml", batch_size=4,
                        micro_batch_size=4, max_steps=1, eval_frac=0.0, lr=1e-3, device="cpu", allow_high_lr=True,
                        save_every=1000, eval_every=1000, lora_r=0)
    return sft.train(cfg)["train_loss"]


def test_one_sft_step_on_each_format_gives_the_schema_files_loss(tmp_path, base):
    files = {"schema": write_jsonl(tmp_path / "schema.jsonl", schema_rows())}
    for shape, make in SHAPES.items():
        files[shape] = write_jsonl(tmp_path / f"{shape}.jsonl", [make(r) for r in schema_rows()])
    files["json array"] = write_json_array(tmp_path / "alpaca.json", [alpaca(r) for r in schema_rows()])
    try:
        files["parquet"] = write_parquet(tmp_path / "s.parquet", [sharegpt(r) for r in schema_rows()])
    except pytest.skip.Exception:
        pass  # the other formats still train; the Parquet reading test says why it skipped
    losses = {name: first_loss(base, path, tmp_path / name.replace(" ", "_")) for name, path in files.items()}
    assert losses["schema"] > 0 and all(v == losses["schema"] for v in losses.values()), losses
